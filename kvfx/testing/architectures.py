"""Write docs/architectures.md from a run of the architecture matrix, the
hand-written gallery and (when given) a sweep of transformers' causal-LM
families, so the supported-architectures page is measured, never hand-kept.

    python -m kvfx.testing.sweep --out sweep.json          # every family, ~30 min on 2 cores
    python -m kvfx.testing.architectures docs/architectures.md sweep.json
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

import kvfx
from kvfx.testing import assert_equivalent, cache_lengths, generate
from kvfx.testing.zoo import ZOO, tiny_model

PROMPT, STEPS = 24, 32


def measure(name: str, attn: str) -> dict:
    model = tiny_model(name, attn=attn)
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    try:
        assert_equivalent(model, ids, steps=16, require_rewrite=False)
        equivalent = "yes"
    except AssertionError as err:
        equivalent = f"NO: {err}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = generate(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=STEPS)
    sites = [s for s in run.records[0].sites] if run.records else []
    rewritten = sorted({s.layer for s in sites if s.compressible})
    alone = sorted({f"{s.layer}: {s.reason}" for s in sites if not s.compressible})
    return dict(name=name, attn=attn, equivalent=equivalent, rewritten=rewritten, alone=alone,
                lengths=cache_lengths(run.cache), graphs=len(run.records), breaks=run.graph_breaks,
                forms=sorted({f"{s.attention}/{s.gqa}" + (f", softcap {s.softcap:g}" if s.softcap else "")
                              for s in sites}))


FORMS = """
## The forms kvfx recognises (`kvfx/passes/sites.py`)

Attention forms: `scaled_dot_product_attention` (GQA native or repeated), and eager attention
`softmax(q @ k^T * scale [softcap] [+ mask | masked_fill(cond, -inf) | where(keep, s, lowest)]) @ v` over
`[B, H, S, D]` or, with `torch.bmm`/`baddbmm`, over heads folded into the batch `[B*H, S, D]`; learned
sink logits joined before the softmax and dropped after (gpt-oss) or applied as
`out * sigmoid(logsumexp - sink)` (Granite-SWA) -- kvfx's attention takes the sinks too -- and one
per-head additive bias beside the attention mask (below).

| cache form | seen in | what kvfx does |
|---|---|---|
| transformers `DynamicCache` / `StaticCache` layer (`kvfx.compile`) | every HF family | kvfx's slot store takes the layer's place: compressed per head, decode writes in place |
| sliding-window layer whose window never binds (prompt + new tokens <= window) | Mistral 4k window, Gemma3 local layers | compressed inside the window, as a full layer |
| sliding-window layer whose window binds | Mistral/Gemma2/3 short windows | left alone: the window already bounds the cache |
| `torch.cat([past, new], -2)` written back (tuple, list, dict or module-attribute cache) | HF under the bare backend, hand-written decode | compressed on the rectangular path (state rides on the key tensor) |
| the prompt's keys returned as they are (`present = (k, v)`) | nanoGPT/minGPT, fairseq | compressed at the prompt |
| latent `[B, 1, S, r]` + rotary key `[B, 1, S, dr]`, re-expanded every call | DeepSeek-V2/V3 and other MLA models in transformers, hand-written MLA | compressed on the rectangular path: slots scored on the expanded keys, one selection for every head |
| KV heads tiled over the query heads (`k.repeat(1, r, 1, 1)`: head h reads KV head h % Hkv) | JetMoE | compressed: kvfx reorders the query heads for its ops and the output back |
| keys computed every call from another cache shape | DiffLlama's value halves | left alone, naming the cache shape |
| an attention mask computed from, or shared with, a cache kvfx leaves whole | HY-V4's sparse-attention indexer | left alone: a compressed layer would shorten a mask the whole cache needs |
| preallocated buffer written at each call's positions: `buf[:, :, positions] = k` read whole, or `buf[:b, start:end] = k` read up to `end` | gpt-fast and torchtune `KVCache`, Meta reference Llama | compressed: after the prompt kvfx holds the kept slots (plus room that grows by doubling) and empties the module's buffers in place into placeholders of the same shape that hold one position; decode writes and reads kvfx's store. One token per call after the prompt |
| `index_copy_` into a transformers `StaticCache` buffer | HF under the bare backend | left alone; `kvfx.compile` replaces the layers with its slot store |
| per-head linear position bias (ALiBi) built from the cache length | BLOOM, MPT, hand-written ALiBi | compressed on the rectangular path by one-shot policies: each kept slot's bias gains slope x (its original position - its slot - the tokens evicted), so the model's own bias reads original positions; the slope is read off the model's bias |
| per-head bias computed from the cached keys or values | Doge's dynamic mask | compressed: the model recomputes the bias from the kept slots, kvfx's attention adds it |
| per-head bias that differs per query (relative position buckets) | Inkling | left alone: it would need each slot's original position |
| an attention block split by a graph break | data-dependent Python control flow | left alone, naming where dynamo broke and why |
"""


def measure_gallery(name: str) -> dict:
    """One hand-written model: equal to eager with a budget above the prompt,
    and the bytes its cache holds after the prompt at a 50% budget."""
    from kvfx.testing import no_compression
    from kvfx.testing.gallery import GALLERY

    entry = GALLERY[name]
    ids = torch.randint(2, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    eager, _ = entry.run(ids, 8)
    out = {}
    for label, policy in (("same", no_compression()), ("half", kvfx.StreamingLLM(budget=0.5, sinks=4))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[label], backend = entry.run(ids, 8, policy)
        out[label + "_sites"] = [s for r in backend.records for s in r.sites]
    same = torch.equal(out["same"].tokens, eager.tokens)
    alone = sorted({s.reason for s in out["half_sites"] if not s.compressible})
    return dict(name=name, upstream=entry.upstream, form=entry.form, same="yes" if same else "NO",
                compressed=any(s.compressible for s in out["half_sites"]),
                bytes=out["half"].cache_bytes / eager.cache_bytes, alone=alone)


def main(path: str = "docs/architectures.md", sweep: str = "") -> None:
    from kvfx.testing.gallery import GALLERY

    rows = []
    for name, entry in ZOO.items():
        for attn in entry.attn_impls:
            print(f"measuring {name} ({attn})", file=sys.stderr, flush=True)
            rows.append(measure(name, attn))
    lines = [
        "# Supported architectures",
        "",
        "Generated by `python -m kvfx.testing.architectures` from a run of the tiny-model zoo",
        f"(`kvfx.testing.zoo`): prompt {PROMPT} tokens, {STEPS} new tokens, `SnapKV(budget=0.5, window=4)`,",
        "inner compiler aot_eager. *Same as eager*: a budget above the prompt gives logits within 1e-4 and",
        "identical greedy tokens over 16 steps. *Cache*: slots per layer at the end (prompt layers",
        f"compress to {(PROMPT + 1) // 2}, + {STEPS - 1} decode tokens). The same checks run in",
        "`tests/test_matrix.py`, which also runs them on a hand-written `nn.Module` with a tuple cache (`kvfx.testing.handwritten.TinyGPT`).",
        "",
        FORMS,
        "## The tiny-model zoo (`kvfx.testing.zoo`)",
        "",
        "| model | attention | forms found | same as eager | layers rewritten | cache slots | graphs | breaks | left alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['attn']} | {'; '.join(r['forms'])} | {r['equivalent']} | "
                     f"{r['rewritten'] or 'none'} | {r['lengths']} | {r['graphs']} | {r['breaks']} | "
                     f"{'<br>'.join(r['alone']) or '-'} |")
    lines += [
        "",
        "## Hand-written models (`kvfx.testing.gallery`)",
        "",
        "Each written the way its upstream project writes attention and its cache, run by its own greedy loop",
        "(explicit positions), through `kvfx.compile`. *Same as eager*: budget above the prompt, 8 new tokens.",
        "*Cache bytes*: what the cache holds after the prompt (kvfx state included) at",
        "`StreamingLLM(budget=0.5, sinks=4)`, over eager's. `tests/test_gallery.py` runs the same checks with the",
        "bare backend too, and compares each compressed run with an eager reference that applies the same selection.",
        "",
        "| model | written like | form | same as eager | compressed | cache bytes | left alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in GALLERY:
        print(f"measuring gallery {name}", file=sys.stderr, flush=True)
        g = measure_gallery(name)
        lines.append(f"| {g['name']} | {g['upstream']} | {g['form']} | {g['same']} | "
                     f"{'yes' if g['compressed'] else 'no'} | {g['bytes']:.3f}x | {'<br>'.join(g['alone']) or '-'} |")
    if sweep:
        lines += sweep_section(sweep)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def sweep_section(path: str) -> list[str]:
    """The table of ``python -m kvfx.testing.sweep --out`` (every causal-LM family)."""
    with open(path) as f:
        result = json.load(f)
    summary = result["summary"]
    lines = [
        "",
        "## Every causal-LM family of transformers (`python -m kvfx.testing.sweep`)",
        "",
        f"Each family of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` built at tiny size from its default config",
        f"(`kvfx.testing.sweep.TINY`), 24-token prompt, 8 new tokens. Of {summary['families']} families,",
        f"{summary['counted']} build and generate at tiny size (eager and plain torch.compile) and keep a KV cache",
        f"({summary['no_kv_cache']} more keep none: SSMs, GPT-1); kvfx compresses **{summary['compressed']}** of",
        f"them (**{summary['share']:.1%}**): equal to eager with a budget above the prompt, a smaller cache with",
        "SnapKV at 50%. The rest, and why (*wrong*: kvfx raised or changed the output on a model eager runs):",
        "",
        "| family | status | what kvfx saw / why it did not run |",
        "|---|---|---|",
    ]
    for row in result["rows"]:
        if row["status"] != "compressed":
            why = "<br>".join(r.replace("|", "/").replace("\n", " ")[:240] for r in row.get("reasons", []))
            lines.append(f"| {row['family']} | {row['status']} | {why} |")
    compressed = [r["family"] for r in result["rows"] if r["status"] == "compressed"]
    lines += ["", "Compressed: " + ", ".join(compressed) + "."]
    return lines


if __name__ == "__main__":
    main(*sys.argv[1:])
