"""Measure NVIDIA kvpress behaviour on a tiny random Llama (facts for docs/kvpress-comparison.md).

kvpress 0.5.5 pins transformers<5.3, so this script runs in its OWN virtual environment,
never in kvfx's environment:

    python3 -m venv /tmp/kvpress_venv
    /tmp/kvpress_venv/bin/pip install torch==2.13.0 'transformers>=4.56,<5.3' kvpress==0.5.5
    /tmp/kvpress_venv/bin/python benchmarks/compare_kvpress.py --out /tmp/compare_kvpress.json

(Always pin torch so that pip does not pull a different (CUDA) torch build; the numbers in the
docs came from torch 2.13.0+cpu, transformers 5.2.0, kvpress 0.5.5, Python 3.11.7.)
CPU only, no downloads: the model is a random LlamaForCausalLM built from a LlamaConfig, and
the pipeline's tokenizer is a word-level tokenizer built in memory.  The eager, padding and
generation parts take well under a second; the torch.compile part ~20-35 s on 2 cores
(--skip-inductor drops the torch.compile(model) cases).

The script only *uses* kvpress through its public API (press context managers and
KVPressTextGenerationPipeline); it prints a markdown table and, with --out, writes all raw
measurements as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback

import torch

PROMPT_LEN = 64
PAD_LEN = 16
NEW_TOKENS = 8


def err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # random model: never stop early
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt(batch=1, length=PROMPT_LEN, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (batch, length), generator=g)


def cache_stats(cache):
    lens, nbytes, storage = [], 0, 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        lens.append(int(k.shape[-2]))
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        storage += k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
    return {"layer_lengths": lens, "bytes": nbytes, "storage_bytes": storage}


def kept_positions(pressed_keys, full_keys, tol=1e-4):
    """Original positions of the kept key rows of one (batch row, kv head).

    pressed_keys: (n_kept, d), full_keys: (L, d) from an unpressed run with the same inputs.
    Compression happens after attention, so kept rows are copies of full-cache rows.
    Returns (positions, number of rows with no match within tol).
    """
    d = (pressed_keys[:, None, :].float() - full_keys[None, :, :].float()).abs().amax(-1)
    best = d.min(-1)
    return best.indices.tolist(), int((best.values > tol).sum())


def masked_stats(model):
    out = []
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        out.append(0 if idx is None else int(len(idx[0])))
    return out


def prefill(model, ids, press=None, attention_mask=None):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in model.model.layers:  # reset head-wise masking state between runs
        layer.self_attn.masked_key_indices = None
    with torch.no_grad():
        if press is None:
            out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache)
        else:
            with press(model):
                out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache)
    return out, cache


# --------------------------------------------------------------------------- 1. eager
def eager_section(res):
    import kvpress

    model = build_model()
    ids = prompt()
    _, base = prefill(model, ids)
    rows = {"no press": cache_stats(base) | {"masked_per_layer": [0, 0]}}

    presses = {
        "SnapKVPress(0.5) [default window_size=64]": lambda: kvpress.SnapKVPress(compression_ratio=0.5),
        "SnapKVPress(0.5, window_size=8)": lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8),
        "KnormPress(0.5)": lambda: kvpress.KnormPress(compression_ratio=0.5),
        "StreamingLLMPress(0.5)": lambda: kvpress.StreamingLLMPress(compression_ratio=0.5),
        "AdaKVPress(KnormPress(0.5))": lambda: kvpress.AdaKVPress(kvpress.KnormPress(compression_ratio=0.5)),
    }
    # DMSPress threshold: median KnormPress score of layer-0 keys of the unpressed run
    # (so that roughly half of the evictable positions fall under it).
    knorm_scores = -torch.linalg.vector_norm(base.layers[0].keys.float(), dim=-1)
    dms_thr = float(knorm_scores.median())
    presses[f"DMSPress(KnormPress(), threshold={dms_thr:.3f}, sliding_window_size=16)"] = (
        lambda: kvpress.DMSPress(kvpress.KnormPress(), threshold=dms_thr, sliding_window_size=16)
    )
    for name, make in presses.items():
        try:
            press = make()
            _, cache = prefill(model, ids, press)
            rows[name] = cache_stats(cache) | {"masked_per_layer": masked_stats(model)}
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": err(e)}
    res["eager"] = {"prompt_len": PROMPT_LEN, "rows": rows}


# --------------------------------------------------------------------------- 2. torch.compile
def compile_section(res, skip_inductor=False):
    import torch._dynamo
    from torch._dynamo.utils import counters

    import kvpress
    from transformers import DynamicCache

    out = {}
    ids = prompt()
    ref_model = build_model()
    ref_logits, ref_cache = prefill(ref_model, ids, kvpress.KnormPress(compression_ratio=0.5))
    _, full_cache = prefill(ref_model, ids)

    def kept_sets(cache):
        return [
            [sorted(kept_positions(l.keys[0, h], f.keys[0, h])[0]) for h in range(l.keys.shape[1])]
            for l, f in zip(cache.layers, full_cache.layers)
        ]

    ref_sets = kept_sets(ref_cache)

    cases = {
        'model.forward = torch.compile(model.forward, backend="aot_eager")': "forward_aot_eager",
        "torch.compile(model)  [default inductor backend]": "module_inductor",
    }
    press_makers = {
        "KnormPress(0.5)": lambda: kvpress.KnormPress(compression_ratio=0.5),
        "SnapKVPress(0.5, window_size=8)": lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8),
    }
    if skip_inductor:
        cases = {k: v for k, v in cases.items() if v != "module_inductor"}
    for case, kind in cases.items():
        for pname, make in press_makers.items():
            torch._dynamo.reset()
            counters.clear()
            model = build_model()
            if kind == "forward_aot_eager":
                model.forward = torch.compile(model.forward, backend="aot_eager")
                target = model
            else:
                target = torch.compile(model)
            entry = {}
            t0 = time.perf_counter()
            try:
                o, cache = prefill(target, ids, make())
                entry.update(cache_stats(cache))
                if pname.startswith("Knorm"):
                    entry["logits_match_eager"] = bool(torch.allclose(o.logits, ref_logits.logits, atol=1e-5))
                    # same kept token positions as eager (order of kept rows may differ)
                    entry["kept_positions_match_eager"] = kept_sets(cache) == ref_sets
                    entry["kept_rows_same_order_as_eager_per_layer"] = [
                        bool(torch.allclose(l.keys, r.keys, atol=1e-5)) for l, r in zip(cache.layers, ref_cache.layers)
                    ]
            except Exception as e:  # noqa: BLE001
                entry["error"] = err(e)
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            gb = counters["graph_break"]
            entry["graph_breaks"] = int(sum(gb.values()))
            entry["graph_break_reasons"] = {k[:200]: int(v) for k, v in gb.items()}
            entry["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
            out[f"{case} + {pname}"] = entry
    # Where the graph breaks come from: torch._dynamo.explain on the uncompiled forward.
    where = {}
    model = build_model()
    for pname, make in press_makers.items():
        torch._dynamo.reset()
        try:
            with torch.no_grad(), make()(model):
                ex = torch._dynamo.explain(model.forward)(input_ids=ids, past_key_values=DynamicCache())
            locs = set()
            for br in ex.break_reasons:
                fr = br.user_stack[-1] if br.user_stack else None
                loc = f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno}" if fr else "?"
                locs.add(f"{br.reason.splitlines()[0][:80]} @ {loc}")
            where[pname] = {
                "explain_graph_count": ex.graph_count,
                "explain_graph_break_count": ex.graph_break_count,
                "break_sites": sorted(locs),
            }
        except Exception as e:  # noqa: BLE001
            where[pname] = {"error": err(e)}
    out["graph break sites (torch._dynamo.explain)"] = where
    torch._dynamo.reset()
    res["compile"] = out


# --------------------------------------------------------------------------- 3. padding
def padding_section(res, nonzero_pad_embedding=False):
    import kvpress

    model = build_model()
    if nonzero_pad_embedding:
        # HF initialises the pad_token_id embedding row to zeros, which makes every pad key
        # a zero vector; this variant gives the pad token an ordinary random embedding.
        with torch.no_grad():
            g = torch.Generator().manual_seed(4)
            w = model.model.embed_tokens.weight
            w[0] = torch.randn(w.shape[1], generator=g) * model.config.initializer_range
    ids = prompt(batch=2, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :PAD_LEN] = 0
    mask[1, :PAD_LEN] = 0
    _, full = prefill(model, ids, attention_mask=mask)
    out = {
        "batch": 2,
        "prompt_len": PROMPT_LEN,
        "row1_pad_positions": PAD_LEN,
        "pad_embedding": "random (non-zero)" if nonzero_pad_embedding else "zero (HF default init)",
    }
    for pname, make in {
        "SnapKVPress(0.5, window_size=8)": lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8),
        "KnormPress(0.5)": lambda: kvpress.KnormPress(compression_ratio=0.5),
    }.items():
        try:
            _, cache = prefill(model, ids, make(), attention_mask=mask)
        except Exception as e:  # noqa: BLE001
            out[pname] = {"error": err(e)}
            continue
        per = []
        unmatched = ambiguous = 0
        for li, (lf, lp) in enumerate(zip(full.layers, cache.layers)):
            for h in range(lp.keys.shape[1]):
                positions, miss = kept_positions(lp.keys[1, h], lf.keys[1, h], tol=1e-6)
                unmatched += miss
                # Several pad rows can hold identical keys (the pad embedding row is zero in a
                # randomly initialised HF model), so classify each kept row by *all* of its exact
                # matches: pad if every matching full-cache row is a pad position.
                eq = (lp.keys[1, h][:, None, :] == lf.keys[1, h][None, :, :]).all(-1)  # (kept, L)
                is_pad = eq[:, :PAD_LEN].any(-1) & ~eq[:, PAD_LEN:].any(-1)
                mixed = eq[:, :PAD_LEN].any(-1) & eq[:, PAD_LEN:].any(-1)
                ambiguous += int(mixed.sum())
                per.append(
                    {
                        "layer": li,
                        "kv_head": h,
                        "kept": len(positions),
                        "kept_pad": int(is_pad.sum()),
                        "kept_positions": sorted(positions),
                        "pad_keys_distinct": int(torch.unique(lf.keys[1, h, :PAD_LEN], dim=0).shape[0]),
                    }
                )
        out[pname] = {
            "per_layer_head": per,
            "kept_pad_total": sum(p["kept_pad"] for p in per),
            "kept_total": sum(p["kept"] for p in per),
            "unmatched_rows": unmatched,
            "ambiguous_rows": ambiguous,
            "cache_lengths": [int(l.keys.shape[-2]) for l in cache.layers],
        }
    res["padding_nonzero_pad_embedding" if nonzero_pad_embedding else "padding"] = out


# --------------------------------------------------------------------------- 4. generation
class PosRecorder:
    """forward pre-hook on model.model recording the positions each step is run at."""

    def __init__(self, model):
        self.steps = []
        self.h = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, mod, args, kwargs):
        cp = kwargs.get("cache_position")
        pid = kwargs.get("position_ids")
        pkv = kwargs.get("past_key_values")
        self.steps.append(
            {
                "cache_len_before": None if pkv is None else int(pkv.get_seq_length()),
                "cache_position": None if cp is None else cp.flatten().tolist()[-1:],
                "position_ids": None if pid is None else pid.flatten().tolist()[-1:],
            }
        )

    def remove(self):
        self.h.remove()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1} | {f"t{i}": i for i in range(2, 128)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", unk_token="<pad>")


def generation_section(res):
    import kvpress
    from transformers import DynamicCache

    out = {}
    model = build_model()
    ids = prompt(seed=3)
    ctx, q = ids[:, :-2], ids[:, -2:]  # 62 context tokens + 2 "question" tokens
    press_make = lambda: kvpress.KnormPress(compression_ratio=0.5)  # noqa: E731

    def gen(press):
        rec = PosRecorder(model)
        cache = DynamicCache()
        try:
            with torch.no_grad():
                if press is None:
                    g = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
                else:
                    with press(model):
                        g = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
            return {
                "tokens": g[0, ids.shape[1]:].tolist(),
                "final_cache_lengths": [int(l.keys.shape[-2]) for l in cache.layers],
                "steps": rec.steps,
            }
        except Exception as e:  # noqa: BLE001
            return {"error": err(e), "steps": rec.steps}
        finally:
            rec.remove()

    out["model.generate, no press"] = gen(None)
    out["with KnormPress(0.5)(model): model.generate"] = gen(press_make())

    # Pipeline (context compressed, question not), in-memory word-level tokenizer.
    try:
        tok = make_tokenizer()
        pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tok, device="cpu")
        context = " ".join(f"t{i}" for i in ctx[0, 1:].tolist())  # pipeline prepends bos itself
        ctx_ids = torch.cat([torch.tensor([[1]]), ctx[:, 1:]], 1)
        question = " ".join(f"t{i}" for i in q[0].tolist())
        for label, press in [("pipeline, no press", None), ("pipeline, KnormPress(0.5)", press_make())]:
            rec = PosRecorder(model)
            try:
                ans = pipe(context, question=question, press=press, max_new_tokens=NEW_TOKENS)["answer"]
                out[label] = {"answer": ans, "steps": rec.steps}
            except Exception as e:  # noqa: BLE001
                out[label] = {"error": err(e), "steps": rec.steps}
            finally:
                rec.remove()
        # reference: what plain generate gives for exactly the pipeline's token ids, no press
        full = torch.cat([ctx_ids, q], 1)
        with torch.no_grad():
            g = model.generate(full, max_new_tokens=NEW_TOKENS, do_sample=False)
        out["reference: model.generate on the pipeline's ids, no press"] = {
            "answer": tok.decode(g[0, full.shape[1]:], skip_special_tokens=True)
        }
    except Exception as e:  # noqa: BLE001
        out["pipeline setup"] = {"error": err(e), "trace": traceback.format_exc()[-800:]}
    res["generation"] = out


# --------------------------------------------------------------------------- report
def markdown(res):
    L = []
    v = res["versions"]
    L.append(f"kvpress {v['kvpress']}, transformers {v['transformers']}, torch {v['torch']}, python {v['python']}\n")
    L.append("| press (eager, 64-token prompt) | cache length per layer | KV bytes | masked (batch,head,pos) per layer |")
    L.append("|---|---|---|---|")
    for name, r in res["eager"]["rows"].items():
        if "error" in r:
            L.append(f"| {name} | error: {r['error']} | | |")
        else:
            L.append(f"| {name} | {r['layer_lengths']} | {r['bytes']} | {r['masked_per_layer']} |")
    L.append("")
    L.append("| torch.compile case | cache length per layer | graph breaks | error |")
    L.append("|---|---|---|---|")
    for name, r in res["compile"].items():
        if name.startswith("graph break sites"):
            continue
        L.append(f"| {name} | {r.get('layer_lengths', '-')} | {r['graph_breaks']} | {r.get('error', '')} |")
    for pname, w in res["compile"].get("graph break sites (torch._dynamo.explain)", {}).items():
        L.append(f"\ngraph-break sites with {pname}: {w.get('break_sites', w.get('error'))}")
    L.append("")
    L.append("| padding (batch 2, row 1 has 16 of 64 left pads) | pad embedding | row-1 kept slots that are pads |")
    L.append("|---|---|---|")
    for sec in ("padding", "padding_nonzero_pad_embedding"):
        p = res.get(sec, {})
        for k, r in p.items():
            if isinstance(r, dict):
                if "error" in r:
                    L.append(f"| {k} | {p.get('pad_embedding')} | error: {r['error']} |")
                else:
                    L.append(f"| {k} | {p.get('pad_embedding')} | {r['kept_pad_total']} of {r['kept_total']} |")
    L.append("")
    L.append("| generation (8 greedy tokens) | result |")
    L.append("|---|---|")
    for k, r in res["generation"].items():
        val = r.get("error") or r.get("answer") or r.get("tokens")
        L.append(f"| {k} | {val} |")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write raw JSON results here")
    ap.add_argument("--skip-inductor", action="store_true", help="skip the slower torch.compile(model) cases")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import kvpress  # noqa: F401  (patches attention functions)
    import transformers

    res = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": __import__("importlib.metadata").metadata.version("kvpress"),
            "python": platform.python_version(),
        }
    }
    sections = (
        eager_section,
        padding_section,
        lambda r: padding_section(r, nonzero_pad_embedding=True),
        generation_section,
        lambda r: compile_section(r, skip_inductor=args.skip_inductor),
    )
    names = ("eager", "padding", "padding_nonzero_pad_embedding", "generation", "compile")
    for sec, name in zip(sections, names):
        t0 = time.perf_counter()
        try:
            sec(res)
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": err(e), "trace": traceback.format_exc()[-1500:]}
        print(f"[{name}] {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        print(markdown(res))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
