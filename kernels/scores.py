"""Slot scores for eviction policies (plain-torch references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D], each KV head next to its queries."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def recency(k: torch.Tensor) -> torch.Tensor:
    """Later slots score higher (StreamingLLM keeps the most recent). -> [B, Hkv, S]"""
    b, hkv, s, _ = k.shape
    return torch.arange(s, device=k.device, dtype=torch.float32).expand(b, hkv, s)


def window_attention_reference(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, window: int, kernel: int
) -> torch.Tensor:
    """SnapKV's score: attention the last ``window`` queries pay each key,
    summed over those queries, average-pooled over ``kernel`` slots, averaged
    over the query heads of a KV head.

    q: [B, H, Sq, D] (aligned with the end of k), k: [B, Hkv, S, D], valid: [B, S].
    Returns [B, Hkv, S] float32.
    """
    b, h, sq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    w = min(window, sq)
    qw = q[:, :, sq - w :].float()
    logits = qw @ repeat_kv(k.float(), h // hkv).transpose(-1, -2) * scale  # [B, H, w, S]
    query_pos = torch.arange(s - w, s, device=k.device)[:, None]
    visible = (torch.arange(s, device=k.device)[None, :] <= query_pos) & valid[:, None, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    score = probs.sum(dim=-2)  # [B, H, S]
    if kernel > 1:
        score = pool_valid(score, valid, kernel)
    return score.view(b, hkv, h // hkv, s).mean(dim=2)


def pool_valid(score: torch.Tensor, valid: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average of each slot's ``kernel`` neighbours that are real tokens (not
    pads, not past either end), so a left-padded row pools as it would alone.
    score: [B, R, S], valid: [B, S]."""
    pad = kernel // 2
    real = valid.to(score.dtype)[:, None, :]
    total = F.avg_pool1d(score * real, kernel, stride=1, padding=pad, count_include_pad=True) * kernel
    count = F.avg_pool1d(real, kernel, stride=1, padding=pad, count_include_pad=True) * kernel
    return total / count.round().clamp(min=1.0)


def query_attention(q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query over all slots, averaged over each KV
    head's query heads (TOVA, ZeroMerge). q: [B, H, Sq, D], k: [B, Hkv, S, D],
    slot_bias: [B, Hkv, S] (the new tokens' slots included). -> [B, Hkv, S]"""
    b, h = q.shape[:2]
    hkv, s = k.shape[1], k.shape[2]
    logits = q[:, :, -1:].float() @ repeat_kv(k.float(), h // hkv).transpose(-1, -2) * scale  # [B, H, 1, S]
    logits = logits[:, :, 0] + repeat_kv(slot_bias[:, :, :, None], h // hkv)[..., 0]
    return logits.softmax(-1).view(b, hkv, h // hkv, s).mean(dim=2)


def protect(key: torch.Tensor, valid: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Rank key so the first ``sinks`` and last ``window`` real tokens always
    win and padding always loses. key: [B, Hkv, S], valid: [B, S]."""
    rank = valid.long().cumsum(-1)  # 1-based position among real tokens
    n_real = rank[:, -1:]
    kept = valid & ((rank <= sinks) | (rank > n_real - window))
    key = key.masked_fill(kept[:, None, :], float("inf"))
    return key.masked_fill(~valid[:, None, :], float("-inf"))


def window_attention(q, k, valid, scale, window, kernel):
    from kvfx.kernels.dispatch import triton_module, use_triton  # lazy: kvfx imports without triton

    if use_triton(q, k):
        return triton_module("scores").window_attention(q, k, valid, scale, window, kernel)
    return window_attention_reference(q, k, valid, scale, window, kernel)
