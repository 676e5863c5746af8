"""The ``kvfx`` command: ``demo``, ``inspect``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_POLICY = "SnapKV(budget=0.35, window=16)"


def _policy(text: str):
    from kvfx.policies import parse_policy

    try:
        return parse_policy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _model(name: str, attn: str):
    from kvfx.testing.zoo import ZOO, tiny_model

    if name not in ZOO:
        raise SystemExit(f"kvfx: --model {name!r} is unknown; tiny models: {', '.join(sorted(ZOO))}")
    entry = ZOO[name]
    return tiny_model(name, attn=attn if attn in entry.attn_impls else entry.attn_impls[0])


def _prompt(model, length: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (1, length), generator=gen)


def cmd_demo(args) -> dict:
    import torch

    from kvfx.explain import _cache_bytes
    from kvfx.testing import generate

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    t0 = time.perf_counter()
    full = generate(model, ids, steps=args.steps)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = generate(model, ids, policy=args.policy, inner=args.inner, steps=args.steps)
    t_kvfx = time.perf_counter() - t0
    new = slice(ids.shape[1], None)
    agree = (full.tokens[:, new] == run.tokens[:, new]).float().mean().item()
    from kvfx.explain import Report

    report = Report(args.policy, run.records, _cache_bytes(full.cache), _cache_bytes(run.cache))
    result = {
        "model": f"tiny random {args.model} (built from a config, no weights downloaded)",
        "policy": repr(args.policy),
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.steps,
        "kv_bytes_full": report.cache_bytes_full,
        "kv_bytes_kvfx": report.cache_bytes_kept,
        "greedy_agreement_with_full_cache": agree,
        "graphs_compiled": len(run.records),
        "seconds_full_eager": round(t_full, 2),
        "seconds_kvfx_incl_compile": round(t_kvfx, 2),
    }
    if not args.json:
        print(f"kvfx demo: {result['model']}, prompt {ids.shape[1]} tokens, {args.steps} new tokens")
        print(f"policy: {args.policy!r}  (inner compiler: {args.inner})\n")
        print(report.table())
        saved = 1 - report.cache_bytes_kept / report.cache_bytes_full
        print(f"\nKV cache held after generation: {report.cache_bytes_kept:,} bytes with kvfx vs "
              f"{report.cache_bytes_full:,} with the full cache ({saved:.0%} freed)")
        print(f"greedy tokens identical to the full cache: {agree:.0%} of {args.steps}")
        print(f"graphs compiled: {len(run.records)}; time: full eager {t_full:.1f}s, kvfx {t_kvfx:.1f}s incl. compile")
        prefill = run.records[0]
        print("\nrewritten prefill graph, kvfx lines:")
        for line in prefill.code_after.splitlines():
            if "kvfx" in line:
                print("   ", line.strip()[:160])
    return result


def cmd_inspect(args) -> dict:
    from kvfx.testing import assert_rewritten, generate

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    run = generate(model, ids, policy=args.policy, inner=args.inner, steps=2)
    from kvfx.explain import Report

    report = Report(args.policy, run.records, 0, 0)
    if not args.json:
        print(report.table())
    return {"sites": [dict(zip(("graph", "layer", "module", "attention", "cache", "phase", "heads", "action"), row))
                      for row in report.rows()]}


def cmd_bench(args) -> dict:
    from kvfx.explain import _cache_bytes
    from kvfx.testing import generate

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    rows = {}
    for label, policy in (("full", None), ("kvfx", args.policy)):
        generate(model, ids, policy=policy, inner=args.inner, steps=2)  # warm up / compile
        t0 = time.perf_counter()
        run = generate(model, ids, policy=policy, inner=args.inner, steps=args.steps)
        rows[label] = {"seconds": time.perf_counter() - t0, "kv_bytes": _cache_bytes(run.cache)}
    ratio = {"time_ratio_kvfx_over_full": rows["kvfx"]["seconds"] / rows["full"]["seconds"],
             "kv_bytes_ratio_kvfx_over_full": rows["kvfx"]["kv_bytes"] / rows["full"]["kv_bytes"]}
    if not args.json:
        for label, row in rows.items():
            print(f"{label:5s} {row['seconds']:.2f}s  KV bytes {row['kv_bytes']:,}")
        print(f"ratios kvfx/full: time {ratio['time_ratio_kvfx_over_full']:.2f}, "
              f"KV bytes {ratio['kv_bytes_ratio_kvfx_over_full']:.2f}  (includes recompiles; tiny CPU model)")
    return {**rows, **ratio}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfx", description="Compress the KV cache of any model via torch.compile.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("demo", cmd_demo, "compress a small model's cache and report what changed"),
                            ("inspect", cmd_inspect, "print the attention sites kvfx finds and what it does"),
                            ("bench", cmd_bench, "a short speed/memory comparison, full vs compressed")):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--policy", type=_policy, default=_policy(DEFAULT_POLICY),
                       help=f'a preset and its parameters, e.g. "SnapKV(budget=0.25)" (default {DEFAULT_POLICY})')
        p.add_argument("--model", default="llama", help="a tiny model of kvfx.testing.zoo (default llama)")
        p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
        p.add_argument("--inner", default="inductor" if name != "inspect" else "aot_eager",
                       choices=("inductor", "aot_eager", "eager"), help="compiler for the rewritten graph")
        p.add_argument("--prompt-len", type=int, default=256)
        p.add_argument("--steps", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.steps < 1:
        parser.error("--prompt-len and --steps must be >= 1")
    result = args.fn(args)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
