"""Plain-torch slot scores of the policies (the attention-based scores that
need kernels live in ``kvfx.kernels``: column sums, window scores)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from kvfx.kernels.column_sums import column_sums
from kvfx.kernels.window_scores import window_attention

# (queries, their log-sum-exp, their column sums, the sums' (decay, queries))
# lent by the op compressing a layer's prompt.
_PROMPT_LSE: contextvars.ContextVar = contextvars.ContextVar("kvfx_prompt_lse", default=None)


def _given(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is not None and t.numel() else None


@contextlib.contextmanager
def prompt_lse(q: Optional[torch.Tensor], lse: Optional[torch.Tensor], sums: Optional[torch.Tensor] = None,
               terms: tuple = (1.0, 0)) -> Iterator[None]:
    """Lend what the prompt's attention computed for queries ``q`` to the
    scores computed inside (``attention_sums``): its log-sum-exp ``lse`` [B,
    H, Sq] (``kvfx::attention_lse``), or the column sums themselves ``sums``
    [B, Hkv, S] (``kvfx::attention_column_sums``) with the (decay, queries)
    they were summed with. Empty or missing tensors lend nothing."""
    lse, sums = _given(lse), _given(sums)
    token = _PROMPT_LSE.set((q, lse, sums, terms) if q is not None and (lse is not None or sums is not None)
                            else None)
    try:
        yield
    finally:
        _PROMPT_LSE.reset(token)


def lent_lse(q: torch.Tensor) -> Optional[torch.Tensor]:
    """The log-sum-exp [B, H, Sq] the prompt's attention lent for these very queries, or None."""
    lent = _PROMPT_LSE.get()
    return lent[1] if lent is not None and lent[0] is q else None


_OUT_PROJECTION: contextvars.ContextVar = contextvars.ContextVar("kvfx_out_projection", default=None)


@contextlib.contextmanager
def out_projection(weight: Optional[torch.Tensor]) -> Iterator[None]:
    """Lend the weight [hidden, H x Dv] of the linear layer that reads the
    layer's attention output (its ``o_proj``) to the scores computed inside
    (``CriticalKV``); the rewrite finds it in the graph."""
    token = _OUT_PROJECTION.set(weight)
    try:
        yield
    finally:
        _OUT_PROJECTION.reset(token)


def lent_out_projection() -> Optional[torch.Tensor]:
    return _OUT_PROJECTION.get()


def projected_value_norm(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CriticalKV: how much each value moves the layer's output, the L1 norm
    of v W_o[h] through each query head h's slice of the output projection
    ``weight`` [hidden, H x Dv], averaged over the query heads sharing the KV
    head. v: [B, Hkv, S, Dv] -> [B, Hkv, S] float32."""
    b, kv_heads, s, d = v.shape
    if weight.dim() != 2 or weight.shape[1] % d or (weight.shape[1] // d) % kv_heads:
        raise ValueError(f"the output projection's weight {tuple(weight.shape)} is not [hidden, heads x {d}] for "
                         f"{kv_heads} KV heads of values {tuple(v.shape)}")
    group = weight.shape[1] // d // kv_heads
    per_head = weight.float().t().reshape(kv_heads, group, d, -1)          # [Hkv, G, Dv, hidden]
    vf = v.float()
    # One query head of each group at a time: [B, Hkv, S, hidden] instead of G times that.
    total = sum(torch.matmul(vf, per_head[:, g]).abs().sum(-1) for g in range(group))
    return total / group


def attention_sums(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float,
                   decay: float = 1.0, queries: int = 0) -> torch.Tensor:
    """Causal attention each key receives over the whole prompt (H2O,
    KVMerger, ZeroMerge; ``column_sums``): no pass of its own when the
    prompt's attention lent the sums of these very queries with these very
    terms, one pass over q.k when it lent their log-sum-exp, else two.
    ``queries`` > 0: from the last ``queries`` queries only (the window
    approximation: its cost grows with ``queries``, not with the prompt).
    -> [B, Hkv, S] float32"""
    lent = _PROMPT_LSE.get()
    if lent is None or lent[0] is not q:
        lent = (None, None, None, None)
    if (lent[2] is not None and lent[3] == (decay, queries) and lent[2].shape == (k.shape[0], k.shape[1], k.shape[2])
            and bool(valid.all())):
        return lent[2]
    lse = lent[1]
    if 0 < queries < q.shape[2]:
        q = q[:, :, -queries:]
        lse = None if lse is None else lse[..., -queries:]
    return column_sums(q, k, valid, scale, decay, lse=lse)


def window_mean_attention(q, k: torch.Tensor, valid: torch.Tensor, scale: float, window: int,
                          kernel: int) -> torch.Tensor:
    """The attention the last ``window`` queries pay each slot, on average
    (kvpress's mean; the SnapKV authors sum, which ranks the same), prefix
    pooled over ``kernel`` neighbours: an attention weight whatever the
    window, so an additive constant (CriticalKV's epsilon) means the same for
    every window. -> [B, Hkv, S] float32"""
    return window_attention(q, k, valid, scale, window, kernel) / min(window, q.shape[-2])


def recency(k: torch.Tensor) -> torch.Tensor:
    """Later slots score higher (StreamingLLM keeps the most recent). -> [B, Hkv, S]"""
    b, hkv, s, _ = k.shape
    return torch.arange(s, device=k.device, dtype=torch.float32).expand(b, hkv, s)


def query_attention(q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query over all slots, averaged over each KV
    head's query heads (TOVA, ZeroMerge). q: [B, H, Sq, D], k: [B, Hkv, S, D],
    slot_bias: [B, Hkv, S] (the new tokens' slots included). -> [B, Hkv, S]"""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    groups = q[:, :, -1].float().view(b, hkv, h // hkv, d)      # a KV head's query heads, side by side
    logits = groups @ k.float().transpose(-1, -2) * scale + slot_bias[:, :, None, :]   # [B, Hkv, G, S]
    return logits.softmax(-1).mean(dim=2)


def by_real_tokens(score, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``score(k, v)`` -> [B, Hkv, S] computed on each batch row's real tokens
    alone, for scores whose structure starts at the first token (LagKV's
    partitions, CUR's windows), so a left-padded row scores as it would
    unpadded. Padding scores -inf. -> [B, Hkv, S] float32"""
    if bool(valid.all()):
        return score(k, v).float()
    out = torch.full(k.shape[:3], float("-inf"), device=k.device)
    for row in range(k.shape[0]):
        real = valid[row].nonzero().squeeze(-1)
        if real.numel():
            out[row, :, real] = score(k[row:row + 1, :, real], v[row:row + 1, :, real])[0].float()
    return out


def key_diff(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KeyDiff: minus the cosine similarity of each key to the mean of the
    row's normalised real keys, so the most distinctive keys score highest.
    -> [B, Hkv, S] float32"""
    k = k.float()
    weight = valid[:, None, :, None].float()
    anchor = (F.normalize(k, dim=-1) * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp_min(1)
    return -F.cosine_similarity(k, anchor, dim=-1)


def lag_relative(k: torch.Tensor, v: torch.Tensor, sinks: int, lag: int, cross: bool = False) -> torch.Tensor:
    """LagKV: after the ``sinks``, the prompt splits into partitions of ``lag``
    tokens; a token of partition i scores by the spread (std over channels) of
    its key and value min-max normalised by partition i + 1's range, softmaxed
    within the partition, then (unless ``cross``) ranked within it. The sinks
    (2) and then the last partition with the remainder (in (1, 2), recent
    first) outrank every scored token, so a budget too small for all of them
    keeps the sinks and the most recent tokens (the question); a prompt
    shorter than sinks + 2 partitions ranks by recency. -> [B, Hkv, S] float32"""
    b, h, s, d = k.shape
    if s < sinks + 2 * lag:
        score = torch.ones(b, h, s, device=k.device)
        if s > sinks:
            score[..., sinks:] = torch.arange(s - sinks, device=k.device) / (s - sinks)
        return score
    end = sinks + (s - sinks) // lag * lag

    def spread(x: torch.Tensor) -> torch.Tensor:
        parts = x[:, :, sinks:end].float().reshape(b, h, -1, lag, d)
        ref, scored = parts[:, :, 1:], parts[:, :, :-1]
        low, high = ref.amin(-2, keepdim=True), ref.amax(-2, keepdim=True)
        return ((scored - low) / (high - low)).std(-1).softmax(-1)

    score = (spread(k) + spread(v)) / 2                                  # [B, H, partitions - 1, lag]
    if not cross:
        score = score.argsort(-1).argsort(-1) / lag
    tail = s - end + lag
    recent = 1 + torch.arange(1, tail + 1, device=k.device) / (tail + 1)
    return torch.cat([torch.full((b, h, sinks), 2.0, device=k.device), score.reshape(b, h, -1).float(),
                      recent.expand(b, h, tail)], dim=-1)


LEVERAGES = ("key", "value", "kv_avg", "kv_product")


def leverage(k: torch.Tensor, v: torch.Tensor, sinks: int, kind: str = "kv_product", window: int = 16) -> torch.Tensor:
    """CUR (CurDKV): each token's squared key and value norms (their leverage
    in the rows of K and V), normalised within consecutive ``window``-token
    windows (0: over the prompt), combined as ``kind`` (LEVERAGES); the first
    ``sinks`` tokens score 1 (kept first). -> [B, Hkv, S] float32"""
    k2, v2 = k.float().pow(2).sum(-1), v.float().pow(2).sum(-1)
    if window:
        s = k2.shape[-1]

        def local(x: torch.Tensor) -> torch.Tensor:
            x = F.pad(x, (0, -s % window)).unflatten(-1, (-1, window))
            return (x / x.sum(-1, keepdim=True)).flatten(-2)[..., :s]

        k2, v2 = local(k2), local(v2)
    score = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[kind]
    score = score / score.sum(-1, keepdim=True)
    score[..., :sinks] = 1.0
    return score
