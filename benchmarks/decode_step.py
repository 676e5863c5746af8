"""What a continuous policy's decode step costs per layer and token on the CPU
under Inductor: one layer's compiled decode attention over the store alone
(what every policy's decode runs), the same attention with TOVA's and
ZeroMerge's step in the graph (``kvfx.decode_step.attention_and_step``), and
plain SDPA over the uncompressed prompt (the full cache). Each is its own
compiled function, timed in interleaved rounds in one run; a function's time
includes the call's fixed cost (guards, wrapper), which a whole model pays
once per graph, not per layer, so the step's cost is the difference to the
attention alone.

    python benchmarks/decode_step.py            # SmolLM2's layer: 9 query / 3 KV heads of dim 64, 2048 tokens, 35%
    python benchmarks/decode_step.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kvfx  # noqa: E402
from kvfx import store as slot_store  # noqa: E402
from kvfx.decode_step import attention_and_step  # noqa: E402
from kvfx.kernels.paged_attention.reference import paged_attention_uniform  # noqa: E402
from kvfx.policies import budget_tokens, key_of  # noqa: E402

STEPPED = ("TOVA", "ZeroMerge")


def make_store(kv_heads: int, width: int, dim: int, generator: torch.Generator) -> slot_store.Store:
    """A layer's store at batch 1 whose rows hold ``width`` slots, canonical
    layout, the first two slots merged (bias ln 2), random running scores."""
    k = torch.randn(1, kv_heads, width, dim, generator=generator)
    v = torch.randn(1, kv_heads, width, dim, generator=generator)
    bias = torch.zeros(1, kv_heads, width)
    bias[..., :2] = math.log(2)
    per_row = slot_store.cdiv(width, slot_store.PAGE)
    return slot_store.pack(k, v, bias, torch.rand(1, kv_heads, width, generator=generator),
                           torch.full((1, kv_heads), width), kv_heads * per_row, per_row)


def cases(heads: int, kv_heads: int, dim: int, length: int, budget: float) -> dict:
    """name -> (compiled function, its arguments); a stepped case's arguments
    hold its store's tensors, which each call changes in place."""
    g = torch.Generator().manual_seed(0)
    width, scale = budget_tokens(budget, length), dim ** -0.5
    q = torch.randn(1, heads, 1, dim, generator=g)

    def attention(q, k_pages, v_pages, slot_bias):
        return paged_attention_uniform(q, k_pages, v_pages, slot_bias, kv_heads, scale)

    def full(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    store = make_store(kv_heads, width, dim, g)
    out = {f"attention over {width} slots": (attention, (q, store.k_pages, store.v_pages, store.slot_bias))}
    for name in STEPPED:
        spec, stepped = key_of(getattr(kvfx, name)(budget=budget)), make_store(kv_heads, width, dim, g)

        def step(q, *tensors, spec=spec):
            return attention_and_step(q, *tensors, kv_heads, scale, spec, 0, 1)

        out[f"{name}: attention + step"] = (step, (q, *stepped.tensors(), torch.empty(0, width)))
    k, v = (torch.randn(1, kv_heads, length, dim, generator=g) for _ in range(2))
    out[f"full cache: SDPA over {length}"] = (full, (q, k, v))
    return {name: (torch.compile(fn, backend="inductor", fullgraph=True), args) for name, (fn, args) in out.items()}


def measure(compiled: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median microseconds per call over ``rounds`` interleaved rounds of ``calls`` calls."""
    for fn, args in compiled.values():
        for _ in range(3):
            fn(*args)
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, (fn, args) in compiled.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def report(data: dict) -> str:
    us = data["us_per_call"]
    alone = next(v for k, v in us.items() if k.startswith("attention"))
    full = next(v for k, v in us.items() if k.startswith("full"))
    rows = [[name, f"{t:.1f}", f"{t - alone:+.1f}", f"{t / full:.2f}×"] for name, t in us.items()]
    s = data["shape"]
    head = (f"One layer, batch 1, {s['heads']} query / {s['kv_heads']} KV heads of dim {s['dim']}, "
            f"{s['length']} tokens, budget {s['budget']}; median of {data['rounds']} interleaved rounds of "
            f"{data['calls']} calls, {data['machine']['cpu']}, {data['machine']['torch_threads']} threads.")
    return head + "\n\n" + common.markdown_table(
        ["compiled function", "µs per call", "minus the attention alone", "ratio to the full cache"], rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (a smoke run)")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens; default 2048")
    parser.add_argument("--budget", type=float, default=0.35, help="fraction of the prompt kept; default 0.35")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="folder for decode_step.{json,md}")
    args = parser.parse_args(argv)
    if not 0 < args.budget < 1:
        parser.error(f"--budget must be a fraction in (0, 1), got {args.budget}")
    if args.quick:
        args.length, args.heads, args.kv_heads, args.dim, args.rounds, args.calls = 256, 4, 2, 16, 3, 5
    compiled = cases(args.heads, args.kv_heads, args.dim, args.length, args.budget)
    before = {name: fn_args[1].clone() for name, (_, fn_args) in compiled.items() if "step" in name}   # k_pages
    data = {"machine": common.machine(), "rounds": args.rounds, "calls": args.calls,
            "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, "length": args.length,
                      "budget": args.budget},
            "us_per_call": measure(compiled, args.rounds, args.calls)}
    # The step must really have run: its store's slots moved (the scores alone always change).
    data["keys_moved"] = {name: not torch.equal(compiled[name][1][1], k_pages) for name, k_pages in before.items()}
    text = report(data)
    common.write_json(args.out / "decode_step.json", data)
    (args.out / "decode_step.md").write_text(text)
    if not args.quick:
        common.update_doc("decode_step", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
