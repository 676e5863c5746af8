"""The bytes the KV cache really holds with kvfx's slot store, as ratios to the full cache, measured in one run.

    python benchmarks/memory.py            # SmolLM2-135M, a 2048-token prompt
    python benchmarks/memory.py --quick    # a tiny random model: checks the script runs

Per policy, after the prompt and after ``generate`` decoded ``--decode-tokens`` tokens: bytes held (every
page of every slot store, used or not, with its slot state and tables; the full cache: K and V
of the same model without kvfx after the same tokens), the slots the (batch, KV head) rows keep,
and what a rectangular cache (every head as long as its layer's longest) would hold -- the
layout kvfx used before the slot store. RazorAttention uses the model's own retrieval heads
(``kvfx.find_retrieval_heads``). The checks of issue 14 are printed last: RazorAttention at 20%
holds <= 0.35x, AdaKV at 35% keeps 0.35x of the slots within one page per (batch, KV head) row.
Writes ``memory.json`` and ``memory.md`` to ``--out`` (default docs/results/) and refreshes the
table in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kvfx  # noqa: E402
from kvfx.integrations.transformers import cache_entries, entry_bytes, is_store  # noqa: E402

POLICIES = (("RazorAttention", 0.2), ("AdaKV", 0.35), ("SnapKV", 0.35), ("PyramidKV", 0.35), ("ZeroMerge", 0.05))


def layer_slots(cache) -> tuple[int, int, int]:
    """(slots the rows keep, slots a rectangular cache would hold, slot capacity of the pages) over all layers."""
    kept = rectangle = capacity = 0
    for entry in cache_entries(cache):
        if is_store(entry):
            lengths = entry.lengths
            kept += int(lengths.sum())
            rectangle += int(lengths.max()) * lengths.numel()
            capacity += entry.k_pages.shape[0] * entry.page
        else:
            k = entry[0]
            n = k.shape[0] * k.shape[1] * k.shape[2]
            kept, rectangle, capacity = kept + n, rectangle + n, capacity + n
    return kept, rectangle, capacity


@torch.no_grad()
def run(model, ids: torch.Tensor, decode_tokens: int) -> dict[str, Any]:
    """What the cache holds after the prompt, and after ``generate`` fed it
    ``decode_tokens`` more (kvfx makes room for generate's tokens at once)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    after = {"prompt": _holds(out.past_key_values)}
    del out
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_tokens + 1,
                         min_new_tokens=decode_tokens + 1, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
    after["decode"] = _holds(out.past_key_values)
    return after


def _holds(cache) -> dict[str, int]:
    kept, rectangle, capacity = layer_slots(cache)
    held = sum(entry_bytes(e) for e in cache_entries(cache))
    return {"bytes": held, "slots": kept, "rectangle_slots": rectangle, "page_slots": capacity}


def measure_model(name: str, context: int, decode_tokens: int, policies, inner: str) -> dict[str, Any]:
    model, _, description = common.load(name)
    common.progress(f"[memory] {description}")
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    heads = kvfx.find_retrieval_heads(model, block=min(256, context // 4), repeats=4)
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    pairs = model.config.num_hidden_layers * kv_heads
    common.progress(f"[memory] {len(heads)} retrieval heads of {pairs} (layer, KV head) pairs")
    rows = {"full cache": run(model, ids, decode_tokens)}
    for pname, budget in policies:
        policy = common.policy_grid([pname], budget, context, retrieval_heads=heads)[pname]
        common.fresh_compile(model, policy, inner)
        rows[f"{pname}@{budget:g}"] = dict(run(model, ids, decode_tokens), spec=repr(policy), policy=pname,
                                           budget=budget)
        kvfx.restore(model)
        common.progress(f"[memory] {pname}@{budget:g}: {rows[f'{pname}@{budget:g}']['prompt']['bytes']:,} bytes "
                        "after the prompt")
    torch._dynamo.reset()
    full = rows["full cache"]
    for row in rows.values():
        for phase in ("prompt", "decode"):
            f, r = full[phase], row[phase]
            r["ratio"] = r["bytes"] / f["bytes"]
            r["slot_ratio"] = r["slots"] / f["slots"]
            r["rectangle_ratio"] = r["rectangle_slots"] / f["slots"]
    return {"description": description, "context": context, "decode_tokens": decode_tokens,
            "retrieval_heads": [list(h) for h in heads], "head_pairs": pairs, "kv_rows": kv_heads * ids.shape[0],
            "layers": model.config.num_hidden_layers, "page": kvfx.store.PAGE, "rows": rows}


def checks(m: dict[str, Any]) -> list[str]:
    """Issue 14's memory claims, each with the measured value."""
    lines = []
    rows = m["rows"]
    razor = next((r for k, r in rows.items() if k.startswith("RazorAttention@0.2")), None)
    if razor is not None:
        value = razor["decode"]["ratio"]
        lines.append(f"RazorAttention @ 20% with {len(m['retrieval_heads'])} retrieval heads of {m['head_pairs']}: "
                     f"holds {value:.3f}x the full cache (claim: <= 0.35x): {'PASS' if value <= 0.35 else 'FAIL'}")
    ada = next((r for k, r in rows.items() if k.startswith("AdaKV@0.35")), None)
    if ada is not None:
        slots = ada["prompt"]["page_slots"] / rows["full cache"]["prompt"]["slots"]
        page = m["page"] / m["context"]        # one page per (batch, KV head) row, as a fraction of the full cache
        ok = abs(slots - 0.35) <= page
        lines.append(f"AdaKV @ 35%: its pages hold {slots:.4f}x the full cache's slots (claim: 0.35 +- one page per "
                     f"head = +-{page:.4f}): {'PASS' if ok else 'FAIL'}; bytes with slot state and tables "
                     f"{ada['prompt']['ratio']:.4f}x")
    return lines


def tables(data: dict[str, Any]) -> str:
    parts = []
    for name, m in data["models"].items():
        full = m["rows"]["full cache"]
        header = ["policy", "after prompt: held", "slots kept", "rectangular layout", f"after {m['decode_tokens']} "
                  "tokens: held", "slots kept"]
        table = [["full cache", f"{full['prompt']['bytes'] / 2**20:.2f} MiB", f"{full['prompt']['slots']:,}", "",
                  f"{full['decode']['bytes'] / 2**20:.2f} MiB", f"{full['decode']['slots']:,}"]]
        for key, row in m["rows"].items():
            if key == "full cache":
                continue
            p, d = row["prompt"], row["decode"]
            table.append([key.replace("@", " @ "), f"{p['ratio']:.3f}×", f"{p['slot_ratio']:.3f}×",
                          f"{p['rectangle_ratio']:.3f}×", f"{d['ratio']:.3f}×", f"{d['slot_ratio']:.3f}×"])
        parts.append(
            f"### {name}, {m['context']} tokens\n\n{m['description']}. First row: the full cache's bytes (K and V); "
            "other rows: ratios to it. *held* = every byte kvfx's slot stores hold (all pages, used or not, slot "
            "state, tables); *slots kept* = the slots the (batch, KV head) rows keep; *rectangular layout* = the "
            "slots a cache padded to each layer's longest head would hold (kvfx before the slot store). "
            f"RazorAttention uses the model's {len(m['retrieval_heads'])} retrieval heads of {m['head_pairs']} "
            "(layer, KV head) pairs.\n\n" + common.markdown_table(header, table) + "\n\n"
            + "\n".join(f"- {line}" for line in checks(m)) + "\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model, a short prompt (a smoke run)")
    parser.add_argument("--models", type=common.list_of(str), help="comma-separated; default smollm2-135m")
    parser.add_argument("--context", type=int, help="prompt length in tokens; default 2048")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens after the prompt; default 16")
    parser.add_argument("--inner", default="aot_eager", choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    context = args.context or (128 if args.quick else 2048)
    if context < 16 or args.decode_tokens < 1:
        parser.error("--context must be >= 16 and --decode-tokens >= 1")
    models = args.models or ([common.QUICK_MODEL] if args.quick else ["smollm2-135m"])
    started = time.perf_counter()
    data: dict[str, Any] = {"machine": common.machine(), "models": {}}
    for name in models:
        data["models"][name] = measure_model(name, context, args.decode_tokens, POLICIES, args.inner)
    data["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "memory.json", data)
    text = tables(data)
    (args.out / "memory.md").write_text(text)
    if not args.quick and args.out.resolve() == common.RESULTS.resolve():
        common.update_doc("memory", text)
    print(text)
    common.progress(f"[memory] done in {data['seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
