"""Segment reductions: fold several cache slots into one (references).

Segments are given per (batch, KV head) as ids ``seg`` [B, Hkv, S] in
[0, n_seg); a slot with id -1 belongs to no segment.
"""

from __future__ import annotations

import torch


def _scatter(values: torch.Tensor, seg: torch.Tensor, n_seg: int, reduce: str) -> torch.Tensor:
    """values [B, Hkv, S, *] reduced into [B, Hkv, n_seg, *] by segment."""
    extra = values.shape[3:]
    index = seg.clamp(min=0)
    live = (seg >= 0).view(*seg.shape, *([1] * len(extra)))
    if values.dtype.is_floating_point:
        fill = {"sum": 0.0, "amax": float("-inf"), "amin": float("inf")}[reduce]
    else:
        info = torch.iinfo(values.dtype)
        fill = {"sum": 0, "amax": info.min, "amin": info.max}[reduce]
    values = values.masked_fill(~live, fill) if reduce != "sum" else values * live
    out = torch.full((*seg.shape[:2], n_seg, *extra), fill, dtype=values.dtype, device=values.device)
    index = index.view(*seg.shape, *([1] * len(extra))).expand_as(values)
    return out.scatter_reduce(2, index, values, reduce=reduce, include_self=True)


def gaussian_merge_reference(
    k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, seg: torch.Tensor, n_seg: int, sigma: float
):
    """KVMerger's merge: in each segment the pivot p is the member with the
    highest score (the first on ties); weights g_i = exp(-|k_p - k_i|^2 / 2 sigma^2),
    w_i = g_i / sum(g); merged key = sum w_i k_i, merged value = sum w_i v_i.

    k, v: [B, Hkv, S, D]; score: [B, Hkv, S]; seg: [B, Hkv, S].
    Returns (k [B, Hkv, n_seg, D], v, count [B, Hkv, n_seg], pivot [B, Hkv, n_seg]).
    """
    s = k.shape[2]
    position = torch.arange(s, device=k.device).expand_as(seg)
    best = _scatter(score.float(), seg, n_seg, "amax")                      # [B, Hkv, n_seg]
    is_best = (score.float() == best.gather(2, seg.clamp(min=0))) & (seg >= 0)
    pivot = _scatter(torch.where(is_best, position, s), seg, n_seg, "amin")  # first best member
    pivot_key = k.float().gather(2, pivot.clamp(max=s - 1).gather(2, seg.clamp(min=0))[..., None]
                                 .expand(-1, -1, -1, k.shape[-1]))         # [B, Hkv, S, D]: each slot's pivot
    g = torch.exp(-(pivot_key - k.float()).pow(2).sum(-1) / (2 * sigma**2))  # [B, Hkv, S]
    total = _scatter(g, seg, n_seg, "sum")
    w = g / total.gather(2, seg.clamp(min=0)).clamp_min(1e-30)
    merged_k = _scatter(w[..., None] * k.float(), seg, n_seg, "sum")
    merged_v = _scatter(w[..., None] * v.float(), seg, n_seg, "sum")
    count = _scatter(torch.ones_like(g), seg, n_seg, "sum")
    return merged_k.to(k.dtype), merged_v.to(v.dtype), count, pivot.clamp(max=s - 1)


def segment_mean_reference(k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, n_seg: int):
    """Plain mean of each segment's keys and values (RazorAttention's
    compensation token, ZeroMerge's residual slots).
    Returns (k [B, Hkv, n_seg, D], v, count [B, Hkv, n_seg]); empty segments are 0."""
    count = _scatter(torch.ones(seg.shape, device=k.device), seg, n_seg, "sum")
    denom = count.clamp_min(1)[..., None]
    mean_k = _scatter(k.float(), seg, n_seg, "sum") / denom
    mean_v = _scatter(v.float(), seg, n_seg, "sum") / denom
    return mean_k.to(k.dtype), mean_v.to(v.dtype), count
