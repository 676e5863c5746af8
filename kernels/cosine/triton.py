"""Triton kernel for ``adjacent_cosine`` (reference: ``kernels/cosine/reference.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.triton_utils import block, interpreting, tune

INTERPRETED = interpreting()


@tune(
    configs=[triton.Config({"BLOCK_S": bs}, num_warps=w) for bs in (32, 64, 128) for w in (2, 4)],
    key=["BLOCK_D"],
    interpreter={"BLOCK_S": 16},
)
@triton.jit
def _adjacent_cosine_kernel(
    k_ptr, out_ptr,
    heads, length, dim,
    stride_kb, stride_kh, stride_ks, stride_kd,
    eps,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = k_ptr + b * stride_kb + h * stride_kh
    in_d = offs_d[None, :] < dim
    cur_mask = (offs_s[:, None] < length) & in_d
    prev_mask = (offs_s[:, None] >= 1) & cur_mask
    # Row s and row s-1: the second load overlaps the first but for one row,
    # so it is served from cache rather than memory.
    cur = tl.load(base + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=cur_mask, other=0.0)
    prev = tl.load(base + (offs_s[:, None] - 1) * stride_ks + offs_d[None, :] * stride_kd, mask=prev_mask, other=0.0)
    cur, prev = cur.to(tl.float32), prev.to(tl.float32)
    dot = tl.sum(cur * prev, axis=1)
    # torch.cosine_similarity clamps each norm at eps separately.
    norm_cur = tl.maximum(tl.sqrt(tl.sum(cur * cur, axis=1)), eps)
    norm_prev = tl.maximum(tl.sqrt(tl.sum(prev * prev, axis=1)), eps)
    cos = tl.where(offs_s >= 1, dot / (norm_cur * norm_prev), -1.0)
    tl.store(out_ptr + bh * length + offs_s, cos, mask=offs_s < length)


def adjacent_cosine(k: torch.Tensor) -> torch.Tensor:
    """k: [B, Hkv, S, D] -> [B, Hkv, S] float32 (see the reference)."""
    b, hkv, s, d = k.shape
    out = torch.empty(b, hkv, s, device=k.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    grid = lambda meta: (b * hkv, triton.cdiv(s, meta["BLOCK_S"]))  # noqa: E731
    _adjacent_cosine_kernel[grid](k, out, hkv, s, d, *k.stride(), 1e-8, BLOCK_D=block(d))
    return out
