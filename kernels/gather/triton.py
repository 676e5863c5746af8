"""Triton kernel for ``gather_slots`` (reference: ``kernels/gather/reference.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.triton_utils import block, interpreting, tune

INTERPRETED = interpreting()


@tune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (16, 32, 64) for w in (2, 4)],
    key=["BLOCK_D"],
    interpreter={"BLOCK_N": 16},
)
@triton.jit
def _gather_slots_kernel(
    x_ptr, index_ptr, out_ptr,
    heads, kept, dim,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ib, stride_ih, stride_in,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < kept
    slot = tl.load(index_ptr + b * stride_ib + h * stride_ih + offs_n * stride_in, mask=in_n, other=0).to(tl.int64)
    mask = in_n[:, None] & (offs_d[None, :] < dim)
    rows = tl.load(
        x_ptr + b * stride_xb + h * stride_xh + slot[:, None] * stride_xs + offs_d[None, :] * stride_xd, mask=mask
    )
    # The output is contiguous [B, Hkv, n, D]: row (bh, n) starts at (bh * n + n) * D.
    tl.store(out_ptr + (bh * kept + offs_n[:, None]) * dim + offs_d[None, :], rows, mask=mask)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, S, D], index: [B, Hkv, n] -> [B, Hkv, n, D] contiguous."""
    b, hkv, _, d = x.shape
    n = index.shape[-1]
    out = torch.empty(b, hkv, n, d, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid = lambda meta: (b * hkv, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _gather_slots_kernel[grid](x, index, out, hkv, n, d, *x.stride(), *index.stride(), BLOCK_D=block(d))
    return out


@tune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (16, 32, 64) for w in (2, 4)],
    key=["BLOCK_D", "BLOCK_DV"],
    interpreter={"BLOCK_N": 16},
)
@triton.jit
def _gather_kv_bias_kernel(
    k_ptr, v_ptr, bias_ptr, index_ptr, out_k_ptr, out_v_ptr, out_bias_ptr,
    heads, kept, dim, dim_v,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_bb, stride_bh, stride_bs,
    stride_ib, stride_ih, stride_in,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_n = offs_n < kept
    # The index is read once for all three tensors.
    slot = tl.load(index_ptr + b * stride_ib + h * stride_ih + offs_n * stride_in, mask=in_n, other=0).to(tl.int64)
    out_row = bh * kept + offs_n
    mask_k = in_n[:, None] & (offs_d[None, :] < dim)
    keys = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=mask_k
    )
    tl.store(out_k_ptr + out_row[:, None] * dim + offs_d[None, :], keys, mask=mask_k)
    mask_v = in_n[:, None] & (offs_dv[None, :] < dim_v)
    values = tl.load(
        v_ptr + b * stride_vb + h * stride_vh + slot[:, None] * stride_vs + offs_dv[None, :] * stride_vd, mask=mask_v
    )
    tl.store(out_v_ptr + out_row[:, None] * dim_v + offs_dv[None, :], values, mask=mask_v)
    bias = tl.load(bias_ptr + b * stride_bb + h * stride_bh + slot * stride_bs, mask=in_n)
    tl.store(out_bias_ptr + out_row, bias, mask=in_n)


def gather_kv_bias(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, index: torch.Tensor):
    """k [B, Hkv, S, D], v [B, Hkv, S, Dv], bias [B, Hkv, S], index [B, Hkv, n] ->
    (k [B, Hkv, n, D], v [B, Hkv, n, Dv], bias [B, Hkv, n]), contiguous, in one launch."""
    b, hkv, _, d = k.shape
    dv = v.shape[-1]
    n = index.shape[-1]
    out_k = torch.empty(b, hkv, n, d, device=k.device, dtype=k.dtype)
    out_v = torch.empty(b, hkv, n, dv, device=v.device, dtype=v.dtype)
    out_bias = torch.empty(b, hkv, n, device=bias.device, dtype=bias.dtype)
    if out_bias.numel() == 0:
        return out_k, out_v, out_bias
    grid = lambda meta: (b * hkv, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _gather_kv_bias_kernel[grid](
        k, v, bias, index, out_k, out_v, out_bias, hkv, n, d, dv,
        *k.stride(), *v.stride(), *bias.stride(), *index.stride(),
        BLOCK_D=block(d), BLOCK_DV=block(dv),
    )
    return out_k, out_v, out_bias
