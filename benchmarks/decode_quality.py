"""Quality while decoding: the next-token loss of a long continuation fed one token at a time, each
policy wrapped in ``kvfx.Recompress`` so the cache is compressed again as it grows, against the full cache.

    python benchmarks/decode_quality.py            # SmolLM2-135M: docs/results/decode_quality.{json,md}
    python benchmarks/decode_quality.py --quick    # a tiny random model: checks the script runs

The texts are stretches of Python's reference manual (``pydoc_data``, as quality.py's loss). The
first ``--context`` tokens of each are the prompt, compressed to ``target = budget x context`` slots
per KV head; the next ``--tokens`` are fed one at a time (teacher forcing), and every ``--every``
of them the cache is compressed back to ``target``. The loss is the mean cross-entropy of
predicting each fed token (and the first one, from the prompt). Rows: the full cache (plain
``torch.compile``, the same inner compiler) and ``Recompress(policy)`` for each policy: its mean
loss, the difference to the full cache's, and the KV bytes the cache holds at the end (every
tensor it keeps, kvfx's slot state included) as a fraction of the full cache's. Quality only:
no timing is reported (compare_decoding.py times the decode against kvpress).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import quality  # noqa: E402

import kvfx  # noqa: E402

DEFAULT_OUT = HERE.parent / "docs" / "results"
# "CriticalKV+SnapKV": SnapKV's score corrected by CriticalKV (benchmarks' "A+B" names).
POLICIES = ("StreamingLLM", "KNorm", "SnapKV", "AdaKV", "H2O", "CriticalKV+SnapKV", "KeyDiff")


def recompressed(name: str, budget: float, context: int, every: int) -> kvfx.Policy:
    """``Recompress`` of the named preset at ``budget`` (its sinks and window fitted to the budget
    as in every benchmark), to ``budget x context`` slots every ``every`` tokens."""
    inner = common.policy_grid([name], budget, context)[name]
    return kvfx.Recompress(inner, every=every, target=int(budget * context))


@torch.no_grad()
def fed_loss(model, ids: torch.Tensor, context: int) -> tuple[list[float], int]:
    """Each fed token's loss (the first predicted from the prompt, every later one from the token
    before it fed alone) and the cache bytes held at the end."""
    out = model(input_ids=ids[:, :context], use_cache=True, **quality._last_logits(model))
    logits, cache = [out.logits[:, -1]], out.past_key_values
    for i in range(context, ids.shape[1] - 1):
        out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        cache = out.past_key_values
    losses = torch.nn.functional.cross_entropy(torch.cat(logits).float(), ids[0, context:], reduction="none")
    return losses.tolist(), common.cache_bytes(cache)


def run_side(model, texts: list[torch.Tensor], context: int) -> dict[str, Any]:
    losses, held = [], []
    for ids in texts:
        per_token, nbytes = fed_loss(model, ids, context)
        losses += per_token
        held.append(nbytes)
    return {"loss": statistics.mean(losses), "kv_bytes_end": max(held)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, short texts")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", type=common.list_of(str), default=list(POLICIES))
    parser.add_argument("--budget", type=float, default=0.25, help="target = budget x context")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512, help="tokens fed one at a time after the prompt")
    parser.add_argument("--every", type=int, default=64)
    parser.add_argument("--texts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.context, args.tokens, args.every, args.texts = common.QUICK_MODEL, 64, 24, 8, 1
    if not 0 < args.budget < 1:
        parser.error(f"--budget: {args.budget} is not a fraction in (0, 1)")
    for name in ("context", "tokens", "every", "texts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: {getattr(args, name)} is not >= 1")
    for name in args.policies:
        base, _, scorer = name.partition("+")
        if base not in kvfx.PRESETS and base not in common.WRAPPERS or scorer and scorer not in kvfx.PRESETS:
            parser.error(f"--policies: {name!r} is not a preset or a wrapper+preset; presets are: "
                         f"{', '.join(kvfx.PRESETS)}; wrappers: {', '.join(common.WRAPPERS)}")
    policies = {name: recompressed(name, args.budget, args.context, args.every) for name in args.policies}
    model, tokenizer, description = common.load(args.model)
    model.eval()
    texts = quality.natural_texts(tokenizer, SimpleNamespace(
        seed=args.seed, loss_context=args.context, loss_tokens=args.tokens, loss_texts=args.texts))
    started = time.perf_counter()
    data: dict[str, Any] = {
        "settings": {"model": args.model, "description": description, "context": args.context,
                     "tokens": args.tokens, "every": args.every, "budget": args.budget,
                     "target": int(args.budget * args.context), "texts": args.texts, "seed": args.seed,
                     "inner": args.inner},
        "machine": common.machine(), "rows": {},
    }
    eager_forward = model.forward
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=args.inner)
    full = run_side(model, texts, args.context)
    model.forward = eager_forward
    data["rows"]["full cache"] = full
    common.progress(f"[decode quality] full cache: loss {full['loss']:.4f}")
    for name, policy in policies.items():
        common.fresh_compile(model, policy, args.inner)
        row = run_side(model, texts, args.context)
        kvfx.restore(model)
        row.update(spec=repr(policy), loss_vs_full=round(row["loss"] - full["loss"], 4),
                   kv_bytes_end_vs_full=round(row["kv_bytes_end"] / full["kv_bytes_end"], 3))
        data["rows"][name] = row
        common.progress(f"[decode quality] {name}: loss {row['loss']:.4f} ({row['loss_vs_full']:+.4f}), KV "
                        f"{row['kv_bytes_end_vs_full']:.2f}x")
    data["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "decode_quality.json", data)
    (args.out / "decode_quality.md").write_text(markdown(data))
    return 0


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"{s['description']}; {s['texts']} texts: a {s['context']}-token prompt compressed to {s['target']} "
             f"slots per KV head, then {s['tokens']} tokens fed one at a time, compressed back to {s['target']} "
             f"every {s['every']} (Recompress; inner compiler {s['inner']}).", "",
             "| policy | mean loss of the fed tokens | vs full cache | KV bytes at the end vs full |",
             "|---|---|---|---|"]
    for name, row in data["rows"].items():
        vs = f"{row['loss_vs_full']:+.4f}" if "loss_vs_full" in row else ""
        ratio = f"{row['kv_bytes_end_vs_full']:.2f}x" if "kv_bytes_end_vs_full" in row else "1.00x"
        lines.append(f"| {name} | {row['loss']:.4f} | {vs} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
