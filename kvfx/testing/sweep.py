"""Every family of transformers' causal-LM mapping, built at tiny size from its
default config and run through kvfx: does it compress, and if not, why.

    python -m kvfx.testing.sweep                   # every family, JSON to stdout
    python -m kvfx.testing.sweep llama gpt_oss     # some
    python -m kvfx.testing.sweep --jobs 2 --out sweep.json

Each family runs in its own process (a family that hangs or crashes the
interpreter costs one row, not the sweep). A row's ``status``:
  * ``compressed``: kvfx rewrote at least one layer, a budget above the prompt
    gives eager's greedy tokens (logits within 1e-3), and SnapKV at 50% shrinks
    the cache;
  * ``left alone``: kvfx rewrote nothing; ``reasons`` are the left-alone reasons
    it printed (what it saw);
  * ``wrong``: kvfx rewrote something and the output changed at a budget above
    the prompt (a kvfx bug);
  * ``no build`` / ``no generate`` / ``no compile``: the family does not
    build or generate at tiny size on this machine, eager included, or plain
    ``torch.compile`` fails on it too (not counted either way);
  * ``no kv cache``: eager generation keeps no attention keys (Mamba, RWKV,
    GPT-1): nothing for any KV-cache method to compress (not counted).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import warnings

# Sizes set wherever a config has the field (nested text configs too).
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
    d_model=64, n_positions=256, n_layers=2, n_heads=4, num_layers=2, num_heads=4, ffn_dim=128, d_ff=128, decoder_layers=2,
    decoder_attention_heads=4, decoder_ffn_dim=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8, partial_rotary_factor=0.5, hidden_dropout=0.0,
    attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, dropout=0.0,
)
PROMPT, STEPS = 24, 8


def tiny_config(model_type: str):
    """The family's default config at tiny size: built from the tiny values
    (so fields derived from them agree), else the default with the values set."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        config = cls(**_tiny_fields(cls().to_dict()))
        _shrink_nested(config)
    except Exception:  # noqa: BLE001 -- a config that validates its fields differently
        config = cls()
        _shrink(config)
    config.use_cache = True
    if "is_decoder" in config.to_dict():  # BERT-style families are causal LMs only as decoders
        config.is_decoder = True
    for name in ("pad_token_id", "bos_token_id"):
        if getattr(config, name, None) is not None and getattr(config, name) >= TINY["vocab_size"]:
            setattr(config, name, 0)
    config.eos_token_id = None
    return config


def _tiny_fields(fields: dict) -> dict:
    """The tiny values of the fields a config has (see TINY), its layer kinds
    kept one each, hybrids' attention placement kept."""
    out = {}
    for name, value in TINY.items():
        old = fields.get(name)
        if old is not None and not isinstance(old, (list, dict, bool)):
            out[name] = type(old)(value) if isinstance(old, (int, float)) else value
    if isinstance(fields.get("qk_rope_head_dim"), int):  # MLA: rotary over the rope part of each head
        out["head_dim"] = TINY["qk_rope_head_dim"]
    types = fields.get("layer_types")
    if isinstance(types, list) and types:  # one of each kind (full and sliding, linear, ...)
        kinds = list(dict.fromkeys(types))
        out["layer_types"] = (kinds * 2)[: max(2, len(kinds))]
        for name in ("num_hidden_layers", "num_layers", "n_layer"):
            if name in fields:
                out[name] = len(out["layer_types"])
    # hybrids that place attention by index or period: keep one attention layer among the two
    for name, value in (("attn_layer_indices", [1]), ("attn_layer_period", 2), ("attn_layer_offset", 1),
                        ("layers_block_type", ["mamba", "attention"]), ("expert_layer_period", 1),
                        ("expert_layer_offset", 0)):
        if fields.get(name) is not None:
            out[name] = value
    return out


def _shrink(config) -> None:
    fields = config.to_dict()
    for name, value in _tiny_fields(fields).items():
        if fields.get(name) != value:
            _set(config, name, value)
    _shrink_nested(config)


def _shrink_nested(config) -> None:
    """Shrink the configs a config holds (a multimodal model's text config)."""
    from transformers import PretrainedConfig

    for sub, value in config.to_dict().items():
        if not isinstance(value, dict):
            continue
        try:
            value = getattr(config, sub, None)
        except Exception:  # noqa: BLE001 -- a per-layer attribute read globally (Gemma 4)
            continue
        if isinstance(value, PretrainedConfig):
            _shrink(value)


def _set(config, name: str, value) -> bool:
    try:
        setattr(config, name, value)
        return True
    except (AttributeError, TypeError, ValueError):  # a derived property or a validated field
        return False


def measure(model_type: str) -> dict:
    """One family's row (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    import kvfx
    from kvfx.testing import cache_lengths, generate, no_compression

    row = dict(family=model_type)
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
            row["attention"] = "sdpa"
        except (ValueError, ImportError):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            row["attention"] = "eager"
        model.generation_config.eos_token_id = None
    except Exception as err:  # noqa: BLE001 -- any failure to build is a row, not a crash
        return dict(row, status="no build", reasons=[f"{type(err).__name__}: {str(err)[:200]}"])
    vocab = min(TINY["vocab_size"], getattr(model.config.get_text_config(), "vocab_size", 0) or TINY["vocab_size"])
    ids = torch.randint(4, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    try:
        eager = generate(model, ids, steps=STEPS)
    except Exception as err:  # noqa: BLE001
        return dict(row, status="no generate", reasons=[f"{type(err).__name__}: {str(err)[:200]}"])
    try:
        has_cache = bool(cache_lengths(eager.cache))
    except Exception:  # noqa: BLE001 -- a cache of its own kind: let kvfx say what it sees
        has_cache = True
    if not has_cache:
        return dict(row, status="no kv cache", reasons=[f"eager generate keeps no attention keys "
                                                         f"(cache: {type(eager.cache).__name__})"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            same = generate(model, ids, policy=no_compression(), steps=STEPS)
            half = generate(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=STEPS)
        except Exception as err:  # noqa: BLE001
            plain = _plain_compile_error(model, ids)
            if plain is not None:  # torch.compile fails on it without kvfx too
                return dict(row, status="no compile", reasons=[f"torch.compile alone: {plain}"])
            return dict(row, status="wrong", reasons=[f"kvfx raised {type(err).__name__}: {str(err)[:300]}"])
    sites = [s for r in half.records for s in r.sites]
    row["reasons"] = sorted({s.reason for s in sites if not s.compressible})
    row["rewritten"] = sorted({s.layer for s in sites if s.compressible}, key=str)
    if not row["rewritten"]:
        row["reasons"] = row["reasons"] or ["no attention call was found in the traced graph"]
        return dict(row, status="left alone")
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager.logits, same.logits))
    if not torch.equal(eager.tokens, same.tokens) or diff > 1e-3:
        return dict(row, status="wrong", reasons=row["reasons"] + [f"budget above the prompt: logits differ by {diff:.3g}"])
    try:
        row["slots"] = [cache_lengths(eager.cache), cache_lengths(half.cache)]
    except Exception:  # noqa: BLE001 -- a cache kvfx cannot read the lengths of
        row["slots"] = None
    if row["slots"] and not any(b < a for a, b in zip(*row["slots"])):
        return dict(row, status="left alone", reasons=row["reasons"] + ["no layer's cache shrank"])
    return dict(row, status="compressed")


def _plain_compile_error(model, ids) -> "str | None":
    """What plain ``torch.compile(backend="aot_eager")`` raises on a short
    generation of ``model``, or None when it runs."""
    import torch

    from kvfx.testing import generate

    torch._dynamo.reset()
    original = model.forward
    model.forward = torch.compile(original, backend="aot_eager")
    try:
        generate(model, ids, steps=2)
        return None
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        model.forward = original


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def run_one(model_type: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "kvfx.testing.sweep", "--one", model_type]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(family=model_type, status="no generate", reasons=[f"timed out after {timeout} s"])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return dict(family=model_type, status="no build", reasons=[f"process failed: {done.stderr.strip()[-300:]}"])
    return json.loads(lines[-1])


def summary(rows: list[dict]) -> dict:
    """Counts; ``share``: compressed of the families that build, generate and
    keep a KV cache (``counted``)."""
    counted = [r for r in rows if r["status"] in ("compressed", "left alone", "wrong")]
    compressed = [r for r in counted if r["status"] == "compressed"]
    return dict(families=len(rows), no_kv_cache=sum(r["status"] == "no kv cache" for r in rows),
                counted=len(counted), compressed=len(compressed), share=round(len(compressed) / max(1, len(counted)), 3))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types (default: every causal-LM family)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per family")
    parser.add_argument("--out", help="write the rows and summary as JSON here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)), flush=True)
        return
    names = args.families or families()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(lambda name: run_one(name, args.timeout), names):
            rows.append(row)
            print(f"{row['family']:28s} {row['status']:12s} {'; '.join(row.get('reasons', []))[:160]}",
                  file=sys.stderr, flush=True)
    result = dict(summary=summary(rows), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
