"""RazorAttention's retrieval-head probe, and its head map on disk.

Probe (golden-stick code, DESIGN.md §5): a block of random token ids repeated
``repeats`` times, one prefill with attention probabilities. For a query in a
repeated block, the *echo* score is the attention paid to earlier occurrences
of the same token and the *induction* score the attention paid to the token
after each of them. Scores are averaged over queries, GQA takes the max over
the query heads of a KV head, and the top ``induction_top`` / ``echo_top``
fractions of all (layer, KV head) pairs are retrieval heads.

``RazorAttention()`` without ``retrieval_heads`` gets its heads here when
kvfx compiles the model (``with_retrieval_heads``): probed once per model
(config and weights), the map cached in the user's cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

HeadMap = tuple[tuple[int, int], ...]

log = logging.getLogger("kvfx")

# The probe keeps every layer's attention probabilities [H, T, T] at once
# (output_attentions): its block is sized to hold them in about this many bytes.
PROBE_BYTES = 1 << 30
PROBE_REPEATS = 4


def kv_heads(config) -> int:
    """KV heads per layer (a config without grouped queries names none: one per query head)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


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
    device = next((p.device for p in model.parameters() if not p.is_meta), ids.device)
    # The model's own forward, not one kvfx compiled onto it (set_policy probes an installed model).
    forward = getattr(model, "_kvfx_original_forward", None) or model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities need the eager path
    try:
        attentions = forward(ids.to(device), output_attentions=True, use_cache=False).attentions
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
    kv = kv_heads(config)
    for attn in attentions:                                   # [1, H, T, T]
        rows = attn[0, :, block:, :].float().cpu()            # queries in repeated blocks
        e = (rows * echo_mask).sum(-1).mean(-1)               # [H]
        i = (rows * induction_mask).sum(-1).mean(-1)
        groups = attn.shape[1] // kv
        echo.append(e.view(kv, groups).amax(-1))
        induction.append(i.view(kv, groups).amax(-1))
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
    kv = kv_heads(model.config)
    if any(not (0 <= l < layers and 0 <= h < kv) for l, h in heads):
        raise ValueError(f"head map {path}: a (layer, head) pair is outside {layers} layers x {kv} KV heads")
    return heads


# -- found for you: RazorAttention() with no heads ----------------------------------


def cache_dir() -> Path:
    """Where kvfx caches what it computes once per model: ``$KVFX_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/kvfx``, else ``~/.cache/kvfx``."""
    if os.environ.get("KVFX_CACHE_DIR"):
        return Path(os.environ["KVFX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvfx"


def weights_key(model) -> str:
    """sha256 of every parameter's name, shape, dtype and 64 values spread
    over it: a fine-tune of the same architecture gets its own head map."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        if not local.is_meta and local.numel():
            flat = local.detach().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def head_map_path(model) -> Path:
    """The cached head map of ``model``: one file per config and weights."""
    return cache_dir() / f"retrieval-heads-{config_key(model)[:16]}-{weights_key(model)[:16]}.json"


def probe_block(model, repeats: int = PROBE_REPEATS, max_bytes: int = PROBE_BYTES) -> int:
    """Tokens per probe block: the paper's 2,500, fewer where every layer's
    attention probabilities at ``repeats`` blocks would exceed ``max_bytes``
    or the model's positions; at least 16."""
    config = model.config
    heads = config.num_attention_heads * config.num_hidden_layers
    itemsize = next(model.parameters()).element_size()
    tokens = math.isqrt(max_bytes // max(1, heads * itemsize))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        tokens = min(tokens, positions)
    return max(16, min(2500, tokens // repeats))


def _unprobeable(model) -> Optional[str]:
    """Why the probe cannot run on ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    missing = [name for name in ("num_hidden_layers", "num_attention_heads", "vocab_size")
               if not isinstance(getattr(config, name, None), int)]
    if config is None or missing or not hasattr(model, "set_attn_implementation"):
        return (f"{type(model).__name__} is not a transformers model kvfx can probe (it needs model.config with "
                "num_hidden_layers, num_attention_heads and vocab_size, and eager attention with output_attentions)")
    if (getattr(model, "_tp_size", None) or 1) > 1:
        return (f"{type(model).__name__} is split over {model._tp_size} ranks, and each rank sees only its own heads: "
                "probe it in one process (kvfx.find_retrieval_heads(model, path=...)) and pass "
                "retrieval_heads=kvfx.load_head_map(path, model)")
    return None


def cached_retrieval_heads(model) -> HeadMap:
    """``model``'s retrieval heads from its cached map, else probed once
    (``find_retrieval_heads`` with the paper's fractions) and cached.
    A cached map that cannot be read is probed again and replaced."""
    path = head_map_path(model)
    if path.is_file():
        try:
            heads = load_head_map(path, model)
        except ValueError as err:
            log.warning("kvfx: %s; probing the model again", err)
        else:
            log.info("kvfx: RazorAttention's retrieval heads of %s from %s: %d (layer, KV head) pairs",
                     type(model).__name__, path, len(heads))
            return heads
    block = probe_block(model)
    started = time.perf_counter()
    heads = find_retrieval_heads(model, block=block, repeats=PROBE_REPEATS)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_head_map(partial, model, heads)
    os.replace(partial, path)   # never a half-written map for a concurrent run to read
    layers = model.config.num_hidden_layers
    kv = kv_heads(model.config)
    log.warning("kvfx: RazorAttention found the retrieval heads of %s: probed %d tokens (%d-token block x %d) in %.1f s; "
                "%d of %d (layer, KV head) pairs, in %d of %d layers; cached in %s (pass retrieval_heads=... to skip "
                "the probe, () for none)", type(model).__name__, block * PROBE_REPEATS, block, PROBE_REPEATS, seconds,
                len(heads), layers * kv, len({l for l, _ in heads}), layers, path)
    return heads


def needs_heads(policy) -> bool:
    """Whether ``policy`` (or a policy inside it) is a RazorAttention whose
    retrieval heads are still to be found."""
    from kvfx.policies import RazorAttention

    if isinstance(policy, RazorAttention):
        return policy.retrieval_heads is None
    return any(needs_heads(value) for value in _inner_policies(policy).values())


def _inner_policies(policy) -> dict[str, Any]:
    from kvfx.policies import Policy

    if not dataclasses.is_dataclass(policy):
        return {}
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)
            if f.init and isinstance(getattr(policy, f.name), Policy)}


def with_retrieval_heads(policy, model):
    """``policy`` with every RazorAttention in it given ``model``'s retrieval
    heads where it names none (``cached_retrieval_heads``). A model kvfx
    cannot probe is an error naming why: never a silent window + sinks."""
    if not needs_heads(policy):
        return policy
    from kvfx.policies import RazorAttention

    if isinstance(policy, RazorAttention):
        why = _unprobeable(model)
        if why is not None:
            raise ValueError(f"kvfx: RazorAttention(retrieval_heads=None) finds its retrieval heads by probing the "
                             f"model, but {why}. Pass retrieval_heads=((layer, kv_head), ...), or () for none "
                             "(every head then keeps only sinks + a recent window + a compensation token)")
        try:
            heads = cached_retrieval_heads(model)
        except (RuntimeError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"kvfx: RazorAttention could not probe {type(model).__name__} for its retrieval heads "
                             f"({type(err).__name__}: {err}); pass retrieval_heads=... "
                             "(kvfx.find_retrieval_heads on a model it can run), or () for none") from err
        return dataclasses.replace(policy, retrieval_heads=heads)
    inner = {name: with_retrieval_heads(value, model) for name, value in _inner_policies(policy).items()}
    return dataclasses.replace(policy, **inner)
