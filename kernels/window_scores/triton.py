"""Triton kernels for ``window_attention`` (reference: ``kernels/window_scores/reference.py``).

SnapKV's score is the column sum of the causal softmax of the last ``window``
queries (``column_sums``' Triton kernels compute it without the [window, S]
matrix), averaged over a GQA group, then the prefix is average-pooled along
the keys. Pooling is linear, so pooling the group mean equals the
reference's mean of pooled heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.dispatch import triton_module
from kvfx.kernels.triton_utils import interpreting, tune

INTERPRETED = interpreting()


@tune(
    configs=[triton.Config({"BLOCK_S": bs}, num_warps=w) for bs in (256, 1024) for w in (2, 4)],
    key=["KERNEL"],
    interpreter={"BLOCK_S": 32},
)
@triton.jit
def _avg_pool_kernel(x_ptr, out_ptr, length, prefix, KERNEL: tl.constexpr, BLOCK_S: tl.constexpr):
    """For contiguous rows of ``length`` float32: slots before ``prefix`` get the
    zero-padded mean of their KERNEL neighbours within the prefix (divided by
    KERNEL, as F.avg_pool1d with count_include_pad); the rest are copied."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    radius: tl.constexpr = KERNEL // 2
    acc = tl.zeros([BLOCK_S], tl.float32)
    for t in tl.static_range(KERNEL):
        src = offs + (t - radius)
        acc += tl.load(x_ptr + row * length + src, mask=(src >= 0) & (src < prefix), other=0.0)
    own = tl.load(x_ptr + row * length + offs, mask=offs < length, other=0.0)
    tl.store(out_ptr + row * length + offs, tl.where(offs < prefix, acc / KERNEL, own), mask=offs < length)


def window_attention(q, k, valid, scale, window: int, kernel: int, splits: int | None = None) -> torch.Tensor:
    """SnapKV's score. q: [B, H, Sq, D], k: [B, Hkv, S, D], valid: [B, S] ->
    [B, Hkv, S] float32 (see the reference; ``kernel`` odd)."""
    h, sq = q.shape[1], q.shape[2]
    groups = h // k.shape[1]
    w = min(window, sq)
    # Looked up per call, not imported: triton_module may have rebuilt that
    # module's kernels for the other mode (compiled / interpreted).
    column_sums_triton = triton_module("column_sums")
    score = column_sums_triton.attention_column_sums(
        q[:, :, sq - w :], k, valid, scale, out_scale=1.0 / groups, splits=splits
    )
    s = score.shape[-1]
    if kernel <= 1 or score.numel() == 0 or s <= w:
        return score
    pooled = torch.empty_like(score)
    grid = lambda meta: (score.shape[0] * score.shape[1], triton.cdiv(s, meta["BLOCK_S"]))  # noqa: E731
    _avg_pool_kernel[grid](score, pooled, s, s - w, KERNEL=kernel)
    return pooled
