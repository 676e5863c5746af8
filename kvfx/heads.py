"""RazorAttention's retrieval-head probe, and its head map on disk.

Probe (golden-stick code, DESIGN.md §5): a block of random token ids repeated
``repeats`` times, one prefill with attention probabilities. For a query in a
repeated block, the *echo* score is the attention paid to earlier occurrences
of the same token and the *induction* score the attention paid to the token
after each of them. Scores are averaged over queries, GQA takes the max over
the query heads of a KV head, and the top ``induction_top`` / ``echo_top``
fractions of all (layer, KV head) pairs are retrieval heads.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch

HeadMap = tuple[tuple[int, int], ...]


def config_key(model) -> str:
    """sha256 of the model's config: a head map belongs to one architecture."""
    text = model.config.to_json_string(use_diff=False) if hasattr(model, "config") else repr(model)
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def probe_scores(model, *, block: int = 2500, repeats: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(echo, induction) scores, each [layers, KV heads]."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (1, block), generator=gen).repeat(1, repeats)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities need the eager path
    try:
        attentions = model(ids, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    total = ids.shape[1]
    queries = torch.arange(block, total)
    echo_cols = [queries - m * block for m in range(1, repeats)]
    echo_mask = torch.zeros(total - block, total, dtype=torch.bool)
    induction_mask = torch.zeros_like(echo_mask)
    for cols in echo_cols:
        ok = cols >= 0
        echo_mask[ok.nonzero()[:, 0], cols[ok]] = True
        nxt = cols + 1
        ok = (cols >= 0) & (nxt < queries)
        induction_mask[ok.nonzero()[:, 0], nxt[ok]] = True
    echo, induction = [], []
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for attn in attentions:                                   # [1, H, T, T]
        rows = attn[0, :, block:, :].float()                  # queries in repeated blocks
        e = (rows * echo_mask).sum(-1).mean(-1)               # [H]
        i = (rows * induction_mask).sum(-1).mean(-1)
        groups = attn.shape[1] // kv_heads
        echo.append(e.view(kv_heads, groups).amax(-1))
        induction.append(i.view(kv_heads, groups).amax(-1))
    return torch.stack(echo), torch.stack(induction)


def find_retrieval_heads(model, *, induction_top: float = 0.14, echo_top: float = 0.01, block: int = 2500,
                         repeats: int = 4, seed: int = 0, path: Optional[str] = None) -> HeadMap:
    """The retrieval heads of ``model`` as sorted (layer, KV head) pairs;
    written to ``path`` (JSON, keyed by the model's config) when given."""
    for name, value in (("induction_top", induction_top), ("echo_top", echo_top)):
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"find_retrieval_heads: {name}={value!r} is invalid: {name} must be a fraction in [0, 1]")
    if not isinstance(repeats, int) or repeats < 2 or not isinstance(block, int) or block < 2:
        raise ValueError(f"find_retrieval_heads: block={block!r}, repeats={repeats!r} are invalid: "
                         "both must be ints >= 2")
    echo, induction = probe_scores(model, block=block, repeats=repeats, seed=seed)
    n_heads = echo.numel()
    picked = set()
    for scores, fraction in ((induction, induction_top), (echo, echo_top)):
        count = math.ceil(fraction * n_heads)
        if count:
            flat = torch.sort(scores.flatten(), descending=True, stable=True).indices[:count]
            picked |= {(int(f) // echo.shape[1], int(f) % echo.shape[1]) for f in flat}
    heads = tuple(sorted(picked))
    if path is not None:
        save_head_map(path, model, heads)
    return heads


def save_head_map(path, model, heads: HeadMap) -> None:
    Path(path).write_text(json.dumps({"kvfx_head_map": 1, "config_sha256": config_key(model),
                                      "retrieval_heads": [list(p) for p in heads]}, indent=1))


def load_head_map(path, model) -> HeadMap:
    """Read a head map saved for this model's config; a map of another model
    or a corrupted file is an error, never silently used."""
    try:
        data = json.loads(Path(path).read_text())
        heads = tuple(sorted((int(l), int(h)) for l, h in data["retrieval_heads"]))
        key = data["config_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"head map {path}: not a kvfx head map ({type(err).__name__}: {err})") from None
    if key != config_key(model):
        raise ValueError(f"head map {path} was computed for another model config "
                         f"(sha256 {key[:12]}..., this model {config_key(model)[:12]}...); recompute it with "
                         "kvfx.find_retrieval_heads(model, path=...)")
    layers = model.config.num_hidden_layers
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    if any(not (0 <= l < layers and 0 <= h < kv) for l, h in heads):
        raise ValueError(f"head map {path}: a (layer, head) pair is outside {layers} layers x {kv} KV heads")
    return heads
