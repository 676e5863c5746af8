"""The kvfx command line."""

import json

import pytest

from kvfx.cli import main


def test_inspect_prints_the_site_table_as_json(capsys):
    assert main(["inspect", "--model", "gemma3", "--prompt-len", "24", "--policy", "SnapKV(budget=0.5, window=4)",
                 "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    actions = [s["action"] for s in sites]
    assert any(a.startswith("rewritten -> kvfx.compress") for a in actions)
    assert any("sliding-window" in a for a in actions)


def test_demo_on_a_tiny_model_reports_bytes_and_agreement(capsys):
    assert main(["demo", "--model", "llama", "--prompt-len", "32", "--steps", "4", "--json",
                 "--policy", "KNorm(budget=8)"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_bytes_kvfx"] < result["kv_bytes_full"]
    assert 0.0 <= result["greedy_agreement_with_full_cache"] <= 1.0


@pytest.mark.parametrize("argv,message", [
    (["demo", "--policy", "SnapKV(budget=1.5)"], "SnapKV.budget=1.5"),
    (["demo", "--policy", "__import__('os')"], "policy '__import__' is unknown"),
    (["inspect", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "--attn", "flash"], "invalid choice"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
