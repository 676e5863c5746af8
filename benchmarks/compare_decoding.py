"""Decode-time compression side by side: kvpress's PrefillDecodingPress(press,
DecodingPress(press)) and kvfx's Recompress(policy), in one process, on the
same model, prompts and fed tokens.

Runs in the kvpress environment (benchmarks/compare_kvpress.py's docstring has its set-up command):

    /tmp/kvpress_venv/bin/python benchmarks/compare_decoding.py --quick     # tiny random model, ~1 min
    /tmp/kvpress_venv/bin/python benchmarks/compare_decoding.py             # SmolLM2-135M (writes docs/results/)

The prompts and the fed tokens are random token ids (seeded): no repeated token, so no two keys
tie in a score and a kept set has one answer (a retrieval prompt's repeated filler ties in layer 0,
and one slot kept differently there moves every later key a little). Each prompt is compressed to
``target`` = budget x length slots per KV head, then ``3 x every`` tokens are fed one at a time
(the same ones to every row): both sides compress back to ``target`` after ``every`` steps, three
times. After each
recompression, per (layer, KV head), the Jaccard index of the keys kvfx holds and the keys kvpress
holds (a key row counts as shared when the other side holds one within 1e-3 relative distance: a
key of a token fed after a recompression that kept other slots differs, so a first difference
lowers the later indices too). Also: decode seconds per token (median), and the KV bytes the
cache holds at its largest and at the end (every tensor it keeps), beside the full cache through
plain torch.compile with the same inner compiler as kvfx, all measured in one run.

Diagnostics for SnapKV (what keeps kvpress's decode-time kept sets from kvfx's): ``--kernel 1``
turns SnapKV's pooling off on both sides (kvpress pools over its cache's order, which after a
compression is score order); ``--own-positions`` rotates each query kvpress recomputes from its
buffer at its own position (stock kvpress rotates them all at the current token's). For AdaKV,
``--dropped-unseen`` keeps kvpress's window queries from attending to the slots AdaKVPress
dropped (it keeps them, holding a key built to be ignored by the current query only).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_OUT = HERE.parent / "docs" / "results" / "compare_decoding.json"
METHODS = ("KNorm", "KeyDiff", "SnapKV", "AdaKV", "CriticalKV", "CriticalKV-KNorm")   # CriticalKV: of SnapKV
SNAPKV_WINDOW = 32   # below the `every` hidden states DecodingPress buffers between recompressions (it asserts so)
RECOMPRESSIONS = 3


def make_sides(method: str, budget: float, every: int, target: int, kernel: int = 5):
    import kvfx
    import kvpress

    window = min(SNAPKV_WINDOW, every // 2)
    snap = lambda **kw: kvpress.SnapKVPress(window_size=window, kernel_size=kernel, **kw)  # noqa: E731
    press = {"KNorm": kvpress.KnormPress, "KeyDiff": kvpress.KeyDiffPress, "SnapKV": snap,
             "AdaKV": lambda **kw: kvpress.AdaKVPress(snap(**kw)),
             "CriticalKV": lambda **kw: kvpress.CriticalKVPress(snap(**kw)),
             "CriticalKV-KNorm": lambda **kw: kvpress.CriticalKVPress(kvpress.KnormPress(**kw))}[method]
    policy = {"KNorm": lambda: kvfx.KNorm(budget=budget), "KeyDiff": lambda: kvfx.KeyDiff(budget=budget),
              "SnapKV": lambda: kvfx.SnapKV(budget=budget, window=window, kernel=kernel),
              "AdaKV": lambda: kvfx.AdaKV(budget=budget, window=window, kernel=kernel),
              "CriticalKV": lambda: kvfx.CriticalKV(kvfx.SnapKV(budget=budget, window=window, kernel=kernel)),
              "CriticalKV-KNorm": lambda: kvfx.CriticalKV(kvfx.KNorm(budget=budget))}[method]()
    combined = kvpress.PrefillDecodingPress(press(compression_ratio=1 - budget),
                                            kvpress.DecodingPress(press(), compression_interval=every,
                                                                  target_size=target))
    return combined, kvfx.Recompress(policy, every=every, target=target)


@contextlib.contextmanager
def queries_at_their_positions(model):
    """kvpress's SnapKVPress rotates the window's queries with the decode call's
    ``position_embeddings``: at a decode call, the current token's alone, so
    every buffered query gets the current position's rotation. Patched here
    (a diagnostic, ``--own-positions``) to rotate the query of ``j`` steps
    ago at its own position: cos/sin of (p - j) from those of p and RoPE's
    frequencies (the scaling factor carries through the product)."""
    import torch
    from kvpress.presses.snapkv_press import SnapKVPress

    inv_freq = model.model.rotary_emb.inv_freq
    original = SnapKVPress.compute_window_attention

    def compute_window_attention(module, hidden_states, keys, window_size, position_embeddings):
        cos, sin = position_embeddings
        if cos.shape[1] == 1 and hidden_states.shape[1] > 1:   # a decode call scoring buffered states
            back = torch.arange(window_size - 1, -1, -1, dtype=torch.float32, device=cos.device)
            angle = torch.cat([inv_freq, inv_freq]).float()[None, :] * back[:, None]      # [w, D]
            c, d = angle.cos().to(cos.dtype), angle.sin().to(cos.dtype)
            cos, sin = cos * c + sin * d, sin * c - cos * d
        return original(module, hidden_states, keys, window_size, (cos, sin))

    SnapKVPress.compute_window_attention = staticmethod(compute_window_attention)
    try:
        yield
    finally:
        SnapKVPress.compute_window_attention = staticmethod(original)


@contextlib.contextmanager
def dropped_slots_unseen():
    """kvpress's AdaKVPress drops a slot by writing, at each call, a key whose
    logit underflows for that call's query alone (``attention_patch``). At a
    decode-time compression SnapKV's window queries are earlier tokens', and
    they can give that fake key much of their attention (checked on the tiny
    model: 25-37% of it on average, all of it for some query heads), which
    lowers the real slots' scores of those heads in AdaKV's ranking across
    heads. Patched here (a diagnostic, ``--dropped-unseen``): before the
    window attention, the dropped slots get a key built the same way for the
    window's queries, so they take none of it, as if evicted."""
    import torch
    from kvpress.attention_patch import search_hyperplane
    from kvpress.presses.snapkv_press import SnapKVPress
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    original = SnapKVPress.compute_window_attention

    def compute_window_attention(module, hidden_states, keys, window_size, position_embeddings):
        index = getattr(module, "masked_key_indices", None)
        if index is not None and keys.shape[2] != hidden_states.shape[1]:
            cos, sin = (x[:, -window_size:] for x in position_embeddings)
            q = get_prerope_query_states(module, hidden_states[:, -window_size:])
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
            b, heads, w, d = q.shape
            kv_heads = keys.shape[1]
            fake = search_hyperplane(q.reshape(b * kv_heads, heads // kv_heads * w, d)).view(b, kv_heads, d)
            keys = keys.clone()
            keys[index] = fake[index[0], index[1]]
        return original(module, hidden_states, keys, window_size, position_embeddings)

    SnapKVPress.compute_window_attention = staticmethod(compute_window_attention)
    try:
        yield
    finally:
        SnapKVPress.compute_window_attention = staticmethod(original)


def jaccard(ours: list, theirs: list) -> list[list[float]]:
    import torch

    per_layer = []
    for a_layer, b_layer in zip(ours, theirs):
        row = []
        for a, b in zip(a_layer, b_layer):     # one KV head: the key rows each side holds
            a, b = a.float(), b.float()
            d = torch.cdist(a, b)
            nearest = d.min(-1)
            scale = b[nearest.indices].abs().amax(-1).clamp_min(1e-6)
            shared = int(((a - b[nearest.indices]).abs().amax(-1) / scale < 1e-3).sum())
            row.append(shared / (a.shape[0] + b.shape[0] - shared))
        per_layer.append(row)
    return per_layer


def unmasked_keys(model, cache, layers: int) -> list[list]:
    """kvpress's AdaKVPress keeps every slot and overwrites the keys it drops
    (``masked_key_indices``) with a fake key at each call: per layer and KV
    head, the keys of batch row 0 it did not drop."""
    from compare_kvpress import unmasked_positions

    out = []
    for layer, live in zip(model.model.layers[:layers], unmasked_positions(model, cache, layers)):
        keys = cache.layers[layer.self_attn.layer_idx].keys[0]
        out.append([keys[h][live[h].to(keys.device)] for h in range(keys.shape[0])])
    return out


def run_side(model, kind: str, prompts: list, steps: int, every: int, press=None) -> dict[str, Any]:
    """Prefill each prompt, then feed ``steps`` of its own tokens; keys after each recompression."""
    import torch
    from transformers import DynamicCache

    import common
    from compare_kvpress import Row, kept_rows
    from speed import _sync

    device = next(model.parameters()).device
    row, layers = Row(model, kind, press), model.config.num_hidden_layers
    step_s, peak, end, checkpoints = [], [], [], []
    for ids, fed in prompts:   # the prompt [1, S], the tokens fed one at a time [1, >= steps]
        length, keys = ids.shape[1], []
        with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
            if kind == "kvfx":
                cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            else:
                cache = DynamicCache()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            largest = common.cache_bytes(cache)
            masks = kind == "kvpress" and "AdaKVPress" in repr(press)   # (its kept keys: those not masked)
            for i in range(steps):
                kwargs = {"input_ids": fed[:, i:i + 1], "past_key_values": cache, "use_cache": True}
                if kind != "kvfx":
                    pos = torch.tensor([[length + i]], device=device)
                    kwargs.update(cache_position=pos[0], position_ids=pos)
                _sync(device)
                t0 = time.perf_counter()
                out = model(**kwargs)
                _sync(device)
                step_s.append(time.perf_counter() - t0)
                cache = out.past_key_values if out.past_key_values is not None else cache
                largest = max(largest, common.cache_bytes(cache))
                if (i + 1) % every == 0:
                    keys.append(unmasked_keys(model, cache, layers) if masks else kept_rows(row, cache, layers))
        peak.append(largest)
        end.append(common.cache_bytes(cache))
        checkpoints.append(keys)
    return {"decode_s_per_token": statistics.median(step_s), "kv_bytes_largest": max(peak),
            "kv_bytes_end": int(statistics.median(end)), "checkpoints": checkpoints}


def main(argv=None) -> int:
    import torch

    import common
    import compare_kvpress
    import kvfx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, short prompts")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--every", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.25, help="target = budget x prompt length")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--inner", default="inductor", choices=("aot_eager", "inductor"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--kernel", type=int, default=5, help="SnapKV's pooling kernel, both sides (kvpress's "
                        "default 5)")
    parser.add_argument("--own-positions", action="store_true",
                        help="diagnostic: kvpress's SnapKV rotates each buffered query at its own position "
                             "(stock kvpress rotates them all at the current token's)")
    parser.add_argument("--dropped-unseen", action="store_true",
                        help="diagnostic: kvpress's AdaKV window attention gives the slots it dropped no weight "
                             "(stock kvpress's fake keys there are built for the current query only)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.context, args.every, args.inner = "llama", 160, 8, "aot_eager"
    model, _, description = common.load(args.model)
    model.eval()
    # A length budget x length is a whole number of: both sides then keep exactly target slots
    # after the prompt, so they recompress at the same steps.
    length = args.context
    while (args.budget * length) % 1:
        length -= 1
    steps = RECOMPRESSIONS * args.every
    g = torch.Generator().manual_seed(0)
    ids = [(torch.randint(2, model.config.vocab_size, (1, length), generator=g),
            torch.randint(2, model.config.vocab_size, (1, steps), generator=g)) for _ in range(args.prompts)]
    budget, target = args.budget, int(args.budget * length)
    started = time.perf_counter()
    data: dict[str, Any] = {
        "settings": {"model": args.model, "description": description, "context": args.context,
                     "prompt_lengths": [x.shape[1] for x, _ in ids], "prompts": "random token ids",
                     "every": args.every, "target": target,
                     "budget": budget, "fed_tokens": steps, "inner": args.inner, "snapkv_window": SNAPKV_WINDOW,
                     "kvpress_queries_at_own_positions": args.own_positions, "snapkv_kernel": args.kernel,
                     "kvpress_dropped_slots_unseen": args.dropped_unseen},
        "machine": common.machine(), "versions": compare_kvpress.versions(), "rows": {},
    }
    torch._dynamo.reset()
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend=args.inner)
    run_side(model, "compiled", ids[:1], steps, args.every)                   # warm-up: every shape it meets
    full = run_side(model, "compiled", ids, steps, args.every)
    model.forward = eager_forward
    data["rows"]["full cache, torch.compile"] = {k: v for k, v in full.items() if k != "checkpoints"}
    for method in args.methods:
        press, policy = make_sides(method, budget, args.every, target, args.kernel)
        # (entered first, called last: the fake keys are built for the queries as SnapKV rotates them)
        with (dropped_slots_unseen() if args.dropped_unseen else contextlib.nullcontext(),
              queries_at_their_positions(model) if args.own_positions else contextlib.nullcontext()):
            run_side(model, "kvpress", ids[:1], steps, args.every, press=press)      # warm-up
            theirs = run_side(model, "kvpress", ids, steps, args.every, press=press)
        torch._dynamo.reset()
        kvfx.compile(model, policy, inner=args.inner)
        run_side(model, "kvfx", ids[:1], steps, args.every)                       # warm-up
        ours = run_side(model, "kvfx", ids, steps, args.every)
        kvfx.restore(model)
        overlap = []
        for mine, other in zip(ours.pop("checkpoints"), theirs.pop("checkpoints")):
            overlap.append([jaccard(a, b) for a, b in zip(mine, other)])
        by_checkpoint = []
        for c in range(RECOMPRESSIONS):   # overlap[prompt][checkpoint][layer][head]
            per_layer = [statistics.mean(statistics.mean(p[c][layer]) for p in overlap)
                         for layer in range(len(overlap[0][c]))]
            by_checkpoint.append({"after_steps": (c + 1) * args.every,
                                  "jaccard_mean": round(statistics.mean(per_layer), 4),
                                  "jaccard_min_layer": round(min(per_layer), 4),
                                  "jaccard_min_head": round(min(min(min(h) for h in p[c]) for p in overlap), 4)})
        data["rows"][method] = {
            "kvpress": {"spec": repr(press), **theirs}, "kvfx": {"spec": repr(policy), **ours},
            "overlap": by_checkpoint,
            "ratios_to_full_compiled": {
                side: {"decode_per_token": round(r["decode_s_per_token"] / full["decode_s_per_token"], 3),
                       "kv_bytes_end": round(r["kv_bytes_end"] / full["kv_bytes_end"], 3)}
                for side, r in (("kvpress", theirs), ("kvfx", ours))},
        }
        common.progress(f"[decoding] {method}: " + "; ".join(
            f"after {o['after_steps']}: Jaccard {o['jaccard_mean']:.3f} (min layer {o['jaccard_min_layer']:.3f})"
            for o in by_checkpoint) + f"; decode kvfx {1000 * ours['decode_s_per_token']:.1f}ms, kvpress "
            f"{1000 * theirs['decode_s_per_token']:.1f}ms, full {1000 * full['decode_s_per_token']:.1f}ms")
    data["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out, data)
    args.out.with_suffix(".md").write_text(markdown(data))
    return 0


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"{s['description']}; {len(s['prompt_lengths'])} prompts of {s['prompt_lengths']} tokens, compressed to "
             f"{s['target']} slots per KV head, then {s['fed_tokens']} fed tokens, recompressed to {s['target']} every "
             f"{s['every']} (inner compiler {s['inner']}).", "",
             "| method | Jaccard after each recompression, mean (min layer) | decode / token vs full compiled: kvfx, "
             "kvpress | KV bytes at the end vs full: kvfx, kvpress |", "|---|---|---|---|"]
    for method, row in data["rows"].items():
        if "overlap" not in row:
            continue
        r = row["ratios_to_full_compiled"]
        lines.append(f"| {method} | " + ", ".join(f"{o['jaccard_mean']:.3f} ({o['jaccard_min_layer']:.3f})"
                                                 for o in row["overlap"])
                     + f" | {r['kvfx']['decode_per_token']:.2f}x, {r['kvpress']['decode_per_token']:.2f}x"
                     + f" | {r['kvfx']['kv_bytes_end']:.2f}x, {r['kvpress']['kv_bytes_end']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
