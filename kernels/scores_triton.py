"""Triton kernels for ``window_attention`` (reference: ``kernels/scores.py``).

SnapKV's score is the column sum of the causal softmax of the last ``window``
queries (``column_sums_triton`` computes it without the [window, S] matrix),
averaged over a GQA group, then average-pooled along the keys. Pooling is
linear, so pooling the group mean equals the reference's mean of pooled heads.
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
def _avg_pool_kernel(x_ptr, valid_ptr, out_ptr, length, rows_per_batch, KERNEL: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean of the real-token neighbours (``valid``) within KERNEL // 2 of each
    slot, for contiguous rows of ``length`` float32 (see ``pool_valid``)."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    offs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    radius: tl.constexpr = KERNEL // 2
    acc = tl.zeros([BLOCK_S], tl.float32)
    count = tl.zeros([BLOCK_S], tl.float32)
    for t in tl.static_range(KERNEL):
        src = offs + (t - radius)
        inside = (src >= 0) & (src < length)
        real = tl.load(valid_ptr + batch * length + src, mask=inside, other=0).to(tl.float32)
        acc += tl.load(x_ptr + row * length + src, mask=inside, other=0.0) * real
        count += real
    # At least 1: a slot with no real neighbour (a pad) scores 0, and lanes past the end do not divide by zero.
    tl.store(out_ptr + row * length + offs, acc / tl.maximum(count, 1.0), mask=offs < length)


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
    if kernel <= 1 or score.numel() == 0:
        return score
    s = score.shape[-1]
    pooled = torch.empty_like(score)
    grid = lambda meta: (score.shape[0] * score.shape[1], triton.cdiv(s, meta["BLOCK_S"]))  # noqa: E731
    _avg_pool_kernel[grid](score, valid.to(torch.int8).contiguous(), pooled, s, score.shape[1], KERNEL=kernel)
    return pooled
