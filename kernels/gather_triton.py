"""Triton kernel for ``gather_slots`` (reference: ``kernels/gather.py``)."""

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
