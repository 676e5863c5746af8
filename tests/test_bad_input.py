"""Bad input everywhere gets an error naming the parameter and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

import kvfx

ROOT = Path(__file__).resolve().parent.parent

BAD_FIELDS = [
    (name, dict(budget=0), "budget") for name in sorted(kvfx.PRESETS)
] + [
    ("StreamingLLM", dict(sinks=-1), "sinks"), ("KNorm", dict(window=-2), "window"), ("H2O", dict(window=1.5), "window"),
    ("TOVA", dict(sinks="4"), "sinks"), ("SnapKV", dict(kernel=4), "kernel"), ("PyramidKV", dict(beta=0.5), "beta"),
    ("KVMerger", dict(epsilon=2.0), "epsilon"), ("KVMerger", dict(sigma=0), "sigma"),
    ("KVMerger", dict(recent=1.5), "recent"), ("KVMerger", dict(protect_top=-0.1), "protect_top"),
    ("KVMerger", dict(exempt_layers=[0]), "exempt_layers"), ("ChunkKV", dict(chunk=0), "chunk"),
    ("ChunkKV", dict(reuse_every=0), "reuse_every"), ("RazorAttention", dict(retrieval_heads=[(0, 0)]), "retrieval_heads"),
    ("RazorAttention", dict(retrieval_heads=((0, -1),)), "retrieval_heads"), ("ZeroMerge", dict(residual=0), "residual"),
    ("ZeroMerge", dict(decay=0.0), "decay"), ("ZeroMerge", dict(budget=5, window=8), "budget"),
    ("LagKV", dict(lag=0), "lag"), ("LagKV", dict(cross_scoring=1), "cross_scoring"),
    ("CUR", dict(leverage="keys"), "leverage"), ("CUR", dict(local_window=-1), "local_window"),
    ("ExpectedAttention", dict(n_future_positions=0), "n_future_positions"),
    ("ExpectedAttention", dict(use_covariance=1), "use_covariance"), ("ExpectedAttention", dict(use_vnorm="yes"), "use_vnorm"),
    ("ExpectedAttention", dict(epsilon=-1e-3), "epsilon"), ("ExpectedAttention", dict(epsilon=float("nan")), "epsilon"),
]


@pytest.mark.parametrize("name,kwargs,field", BAD_FIELDS, ids=[f"{n}-{f}-{i}" for i, (n, _, f) in enumerate(BAD_FIELDS)])
def test_every_preset_names_a_bad_field_and_its_range(name, kwargs, field):
    with pytest.raises(ValueError) as err:
        kvfx.PRESETS[name](**kwargs)
    message = str(err.value)
    assert name in message and field in message, message
    assert any(word in message for word in ("must", "exceeds", ">=", "in [", "in (")), message


@pytest.mark.parametrize("script,args,message", [
    ("quality.py", ["--budgets", "1.5"], "--budgets: 1.5 is not a fraction in (0, 1)"),
    ("quality.py", ["--policies", "SnapKV,Nope"], "--policies: 'Nope' is not a preset"),
    ("speed.py", ["--budgets", "half"], "expected comma-separated floats"),
    ("speed.py", ["--inner", "tvm"], "invalid choice: 'tvm'"),
    ("speed.py", ["--time-limit", "-5"], "--time-limit: -5.0 must be positive"),
])
def test_benchmark_scripts_reject_bad_arguments(script, args, message):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
