"""Triton kernels for ``gaussian_merge`` and ``segment_mean`` (reference:
``kernels/merge/reference.py``).

Segment ids need not be contiguous (RazorAttention's dropped tokens are
scattered), so the host groups each (batch, KV head)'s slots by segment with a
stable sort: ``order`` lists the slot positions of segment 0, then segment 1,
..., positions ascending inside each, and ``start`` / ``count`` say where each
segment's run begins and how long it is. Then one program per (segment,
batch x KV head) reads only its own members, in tiles of ``BLOCK_S`` rows, and
sums in float32 in a fixed order: no atomics, so results are deterministic.
Segments sit on grid axis 0 because KVMerger passes one per prompt token and
axes 1 and 2 stop at 65535.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.triton_utils import block, interpreting, tune

INTERPRETED = interpreting()

_CONFIGS = [triton.Config({"BLOCK_S": bs}, num_warps=w) for bs in (16, 32, 64) for w in (2, 4)]


def _group(seg: torch.Tensor, n_seg: int):
    """seg [B, Hkv, S] -> (order [B, Hkv, S] int64, start [B, Hkv, n_seg] int64,
    count [B, Hkv, n_seg] float32): members of segment j are
    order[..., start[j] : start[j] + count[j]], ascending; slots with id -1
    sort after every segment and are never read."""
    key = torch.where(seg >= 0, seg, n_seg).long()
    order = torch.sort(key, dim=-1, stable=True).indices.contiguous()
    count = torch.zeros(*seg.shape[:2], n_seg + 1, dtype=torch.int64, device=seg.device)
    count = count.scatter_add_(2, key, torch.ones_like(key))[..., :n_seg].contiguous()
    start = (count.cumsum(-1) - count).contiguous()
    return order, start, count


@tune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_DV"], interpreter={"BLOCK_S": 16})
@triton.jit
def _gaussian_merge_kernel(
    k_ptr, v_ptr, score_ptr, order_ptr, start_ptr, count_ptr,
    out_k_ptr, out_v_ptr, pivot_ptr,
    heads, length, n_seg, dim, dim_v,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_sb, stride_sh, stride_ss,
    two_sigma_sq,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    row = bh * n_seg + seg
    first = tl.load(start_ptr + row)
    members = tl.load(count_ptr + row)
    order = order_ptr + bh * length + first
    offs = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    # Pivot: the highest score, the first member on ties. Members ascend by
    # position, so a later tile wins only with a strictly higher score.
    best = tl.full([], float("-inf"), tl.float32)
    pivot = tl.full([], 0, tl.int64) + length
    for i in range(0, members, BLOCK_S):
        live = i + offs < members
        pos = tl.load(order + i + offs, mask=live, other=0)
        score = tl.load(score_ptr + b * stride_sb + h * stride_sh + pos * stride_ss, mask=live,
                        other=float("-inf")).to(tl.float32)
        tile_best = tl.max(score, axis=0)
        tile_pivot = tl.min(tl.where(live & (score == tile_best), pos, length), axis=0)
        tied = tl.where(tile_best == best, tl.minimum(pivot, tile_pivot), pivot)
        pivot = tl.where(tile_best > best, tile_pivot, tied)
        best = tl.maximum(best, tile_best)
    # An empty segment's pivot is the last slot, as in the reference.
    pivot = tl.minimum(pivot, length - 1)

    pivot_k = tl.load(k_base + pivot * stride_ks + offs_d * stride_kd, mask=offs_d < dim, other=0.0).to(tl.float32)
    total = tl.zeros([], tl.float32)
    acc_k = tl.zeros([BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_DV], tl.float32)
    for i in range(0, members, BLOCK_S):
        live = i + offs < members
        pos = tl.load(order + i + offs, mask=live, other=0)
        keys = tl.load(k_base + pos[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                       mask=live[:, None] & (offs_d[None, :] < dim), other=0.0).to(tl.float32)
        values = tl.load(v_base + pos[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                         mask=live[:, None] & (offs_dv[None, :] < dim_v), other=0.0).to(tl.float32)
        diff = keys - pivot_k[None, :]
        g = tl.where(live, tl.exp(-tl.sum(diff * diff, axis=1) / two_sigma_sq), 0.0)
        total += tl.sum(g, axis=0)
        acc_k += tl.sum(g[:, None] * keys, axis=0)
        acc_v += tl.sum(g[:, None] * values, axis=0)
    # The pivot's own weight is exp(0) = 1, so total >= 1 unless the segment is empty.
    total = tl.maximum(total, 1e-30)
    tl.store(out_k_ptr + row * dim + offs_d, (acc_k / total).to(out_k_ptr.dtype.element_ty), mask=offs_d < dim)
    tl.store(out_v_ptr + row * dim_v + offs_dv, (acc_v / total).to(out_v_ptr.dtype.element_ty), mask=offs_dv < dim_v)
    tl.store(pivot_ptr + row, pivot)


@tune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_DV"], interpreter={"BLOCK_S": 16})
@triton.jit
def _segment_mean_kernel(
    k_ptr, v_ptr, order_ptr, start_ptr, count_ptr,
    out_k_ptr, out_v_ptr,
    heads, length, n_seg, dim, dim_v,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    row = bh * n_seg + seg
    first = tl.load(start_ptr + row)
    members = tl.load(count_ptr + row)
    order = order_ptr + bh * length + first
    offs = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    acc_k = tl.zeros([BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_DV], tl.float32)
    for i in range(0, members, BLOCK_S):
        live = i + offs < members
        pos = tl.load(order + i + offs, mask=live, other=0)
        keys = tl.load(k_base + pos[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                       mask=live[:, None] & (offs_d[None, :] < dim), other=0.0)
        values = tl.load(v_base + pos[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                         mask=live[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
        acc_k += tl.sum(keys.to(tl.float32), axis=0)
        acc_v += tl.sum(values.to(tl.float32), axis=0)
    denom = tl.maximum(members.to(tl.float32), 1.0)  # an empty segment stays 0
    tl.store(out_k_ptr + row * dim + offs_d, (acc_k / denom).to(out_k_ptr.dtype.element_ty), mask=offs_d < dim)
    tl.store(out_v_ptr + row * dim_v + offs_dv, (acc_v / denom).to(out_v_ptr.dtype.element_ty), mask=offs_dv < dim_v)


def gaussian_merge(k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, seg: torch.Tensor, n_seg: int, sigma: float):
    """k [B, Hkv, S, D], v [B, Hkv, S, Dv], score/seg [B, Hkv, S] -> (k [B, Hkv, n_seg, D],
    v [B, Hkv, n_seg, Dv], count float32 [B, Hkv, n_seg], pivot int64) (see the reference)."""
    b, hkv, s, d = k.shape
    dv = v.shape[-1]
    out_k = torch.zeros(b, hkv, n_seg, d, device=k.device, dtype=k.dtype)
    out_v = torch.zeros(b, hkv, n_seg, dv, device=v.device, dtype=v.dtype)
    pivot = torch.full((b, hkv, n_seg), s - 1, device=k.device, dtype=torch.int64)
    if b * hkv * n_seg == 0 or s == 0:
        return out_k, out_v, torch.zeros(b, hkv, n_seg, device=k.device), pivot
    order, start, count = _group(seg, n_seg)
    _gaussian_merge_kernel[(n_seg, b * hkv)](
        k, v, score, order, start, count, out_k, out_v, pivot,
        hkv, s, n_seg, d, dv, *k.stride(), *v.stride(), *score.stride(), 2.0 * sigma**2,
        BLOCK_D=block(d), BLOCK_DV=block(dv),
    )
    return out_k, out_v, count.float(), pivot


def segment_mean(k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, n_seg: int):
    """k [B, Hkv, S, D], v [B, Hkv, S, Dv], seg [B, Hkv, S] -> (k [B, Hkv, n_seg, D],
    v [B, Hkv, n_seg, Dv], count float32 [B, Hkv, n_seg]) (see the reference)."""
    b, hkv, s, d = k.shape
    dv = v.shape[-1]
    out_k = torch.zeros(b, hkv, n_seg, d, device=k.device, dtype=k.dtype)
    out_v = torch.zeros(b, hkv, n_seg, dv, device=v.device, dtype=v.dtype)
    if b * hkv * n_seg == 0 or s == 0:
        return out_k, out_v, torch.zeros(b, hkv, n_seg, device=k.device)
    order, start, count = _group(seg, n_seg)
    _segment_mean_kernel[(n_seg, b * hkv)](
        k, v, order, start, count, out_k, out_v,
        hkv, s, n_seg, d, dv, *k.stride(), *v.stride(),
        BLOCK_D=block(d), BLOCK_DV=block(dv),
    )
    return out_k, out_v, count.float()
