"""Triton kernels for ``column_sums`` (reference: ``kernels/column_sums/reference.py``).

Column sums of a causal softmax without the [Sq, S] matrix, flash-style in two
passes:

1. ``_row_stats_kernel``: each query's running max and normaliser over the keys
   it sees (split over the key axis when there are few queries, as in
   flash-decoding; the partials are merged on the host, they are [B, H, Sq]);
2. ``_column_kernel``: each program owns a block of keys and walks the queries
   that can see it, adding exp(logit - max) * weight / normaliser, over all the
   query heads of its KV head.

The logits are recomputed in pass 2 instead of stored, which is what keeps the
memory linear in S. When the prompt's attention already returned each query's
log-sum-exp (``kvfx::attention_lse``), pass 1 is skipped: one pass over q.k. SnapKV's window score (``window_scores``) is the same
computation restricted to the last ``window`` queries, so it reuses these.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvfx.kernels.triton_utils import block, interpreting, splits_for, tune, upcast_dot

INTERPRETED = interpreting()
LOG2E = math.log2(math.e)  # exp2 is the fast exponential on GPUs: natural logs are scaled by this

def _configs(blocks: tuple[int, ...]) -> list[triton.Config]:
    """Every (BLOCK_Q, BLOCK_N) tile from ``blocks`` with 4 or 8 warps and 2 or 3 stages."""
    return [triton.Config({"BLOCK_Q": bq, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bq in blocks for bn in blocks for w in (4, 8) for st in (2, 3)]


_CONFIGS = _configs((32, 64))


@tune(configs=_CONFIGS, key=["BLOCK_D"], interpreter={"BLOCK_Q": 16, "BLOCK_N": 16})
@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, valid_ptr, max_ptr, norm_ptr,
    heads, groups, q_len, length, dim, split_len, scale_log2,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vs,
    UPCAST_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_q < q_len
    pos = length - q_len + offs_q  # queries sit at the end of the keys
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=in_q[:, None] & (offs_d[None, :] < dim), other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + (h // groups) * stride_kh
    # Keys after the block's last query are never visible: stop there.
    last_visible = length - q_len + tl.minimum(tl.program_id(1) * BLOCK_Q + BLOCK_Q, q_len)
    start = split * split_len
    end = tl.minimum(start + split_len, last_visible)
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    row_norm = tl.zeros([BLOCK_Q], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < end
        k = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=in_n[:, None] & (offs_d[None, :] < dim), other=0.0,
        )
        if UPCAST_DOT:
            k = k.to(tl.float32)
        valid = tl.load(valid_ptr + b * stride_vb + offs_n * stride_vs, mask=in_n, other=0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        visible = (offs_n[None, :] <= pos[:, None]) & (valid[None, :] != 0) & in_n[None, :]
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # A row that has seen nothing visible yet keeps max -inf; shift by 0
        # then so that exp2 gives 0 rather than NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_norm = row_norm * tl.exp2(row_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        row_max = new_max
    out = (bh * n_splits + split) * q_len + offs_q
    tl.store(max_ptr + out, row_max, mask=in_q)
    tl.store(norm_ptr + out, row_norm, mask=in_q)


# Pass 2 is where a whole prompt's time goes: larger tiles keep the tensor cores busier.
_COLUMN_CONFIGS = _configs((64, 128))


@tune(configs=_COLUMN_CONFIGS, key=["BLOCK_D"], interpreter={"BLOCK_Q": 16, "BLOCK_N": 16})
@triton.jit
def _column_kernel(
    q_ptr, k_ptr, valid_ptr, max_ptr, scale_ptr, out_ptr,
    kv_heads, groups, q_len, length, dim, scale_log2, out_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vs,
    UPCAST_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bhkv = tl.program_id(0).to(tl.int64)
    b, hkv = bhkv // kv_heads, bhkv % kv_heads
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < length
    in_d = offs_d[None, :] < dim
    k = tl.load(
        k_ptr + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=in_n[:, None] & in_d, other=0.0,
    )
    if UPCAST_DOT:
        k = k.to(tl.float32)
    valid = tl.load(valid_ptr + b * stride_vb + offs_n * stride_vs, mask=in_n, other=0)
    key_ok = in_n & (valid != 0)
    # Queries before the one at position n0 see none of these keys.
    first_q = tl.maximum(n0 - (length - q_len), 0)
    q_start = (first_q // BLOCK_Q) * BLOCK_Q
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(groups):
        h = hkv * groups + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        row_base = (b * kv_heads * groups + h) * q_len
        for q0 in range(q_start, q_len, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            in_q = offs_q < q_len
            q = tl.load(
                q_base + offs_q[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=in_q[:, None] & in_d, other=0.0,
            )
            if UPCAST_DOT:
                q = q.to(tl.float32)
            row_max = tl.load(max_ptr + row_base + offs_q, mask=in_q, other=0.0)
            row_scale = tl.load(scale_ptr + row_base + offs_q, mask=in_q, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            pos = length - q_len + offs_q
            visible = (offs_n[None, :] <= pos[:, None]) & key_ok[None, :] & in_q[:, None]
            # Mask before exp2: an invisible logit may exceed the row max by
            # more than exp2 can hold.
            probs = tl.exp2(tl.where(visible, logits - row_max[:, None], float("-inf"))) * row_scale[:, None]
            acc += tl.sum(probs, axis=0)
    tl.store(out_ptr + bhkv * length + offs_n, acc * out_scale, mask=in_n)


def attention_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    weights: torch.Tensor | None = None,
    out_scale: float = 1.0,
    splits: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over queries i and the query heads of each KV head of
    softmax_j(causal, valid)(q_i k_j * scale) * weights[i], times ``out_scale``.

    q: [B, H, Sq, D] aligned with the end of k: [B, Hkv, S, D]; valid: [B, S]
    bool; weights: [Sq] float32 or None (all 1). Returns [B, Hkv, S] float32.
    ``splits`` forces the number of key splits of pass 1 (tests use it).
    ``lse`` [B, H, Sq]: the softmax's log normaliser per query, known from the
    prompt's attention: pass 1 is skipped.
    """
    b, h, sq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = h // hkv
    out = torch.empty(b, hkv, s, device=k.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if sq == 0:
        return out.zero_()
    valid = valid.view(torch.uint8)  # same bytes; triton loads bytes more portably than bool
    # exp2 is the fast exponential on GPUs; fold log2(e) into the scale.
    scale_log2 = scale * LOG2E
    block_d = block(d)
    upcast = upcast_dot(q.dtype)
    row_scale = torch.ones(b * h, sq, device=k.device) if weights is None else weights.to(k.device).expand(b * h, sq)
    if lse is not None:
        top = lse.float().reshape(b * h, sq) * LOG2E
        # A query with no visible key (lse -inf) contributes nothing.
        row_scale = torch.where(torch.isfinite(top), row_scale, 0.0)
        top = torch.where(torch.isfinite(top), top, 0.0)
    else:
        top, norm = _row_stats(q, k, valid, scale_log2, splits, upcast, block_d)
        # A query that sees no key (all padding before it) contributes nothing,
        # as nan_to_num makes it in the reference.
        row_scale = torch.where(norm > 0, row_scale / norm, 0.0)

    grid = lambda meta: (b * hkv, triton.cdiv(s, meta["BLOCK_N"]))  # noqa: E731
    _column_kernel[grid](
        q, k, valid, top.contiguous(), row_scale.contiguous(), out, hkv, groups, sq, s, d, scale_log2, out_scale,
        *q.stride(), *k.stride(), *valid.stride(), UPCAST_DOT=upcast, BLOCK_D=block_d,
    )
    return out


def _row_stats(q, k, valid, scale_log2: float, splits: int | None, upcast: bool, block_d: int):
    """Pass 1: each query's max logit (log2 units) and softmax normaliser, [B*H, Sq] each."""
    b, h, sq, d = q.shape
    s = k.shape[2]
    if splits is None:
        # Pass 1 has B*H*ceil(Sq/32) programs: few when Sq is a short window.
        splits = splits_for(b * h * triton.cdiv(sq, 32), s, k.device)
    split_len = triton.cdiv(s, splits)
    row_max = torch.empty(b * h, splits, sq, device=k.device, dtype=torch.float32)
    row_norm = torch.empty_like(row_max)
    grid = lambda meta: (b * h, triton.cdiv(sq, meta["BLOCK_Q"]), splits)  # noqa: E731
    _row_stats_kernel[grid](
        q, k, valid, row_max, row_norm, h, h // k.shape[1], sq, s, d, split_len, scale_log2,
        *q.stride(), *k.stride(), *valid.stride(), UPCAST_DOT=upcast, BLOCK_D=block_d,
    )
    # Merge the splits' partial softmax statistics ([B*H, splits, Sq]: small).
    top = row_max.amax(dim=1)
    top = torch.where(top == float("-inf"), 0.0, top)
    return top, (row_norm * torch.exp2(row_max - top[:, None])).sum(dim=1)


def column_sums(q, k, valid, scale, decay: float = 1.0, splits: int | None = None,
                lse: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulated causal attention per key, decayed (see the reference)."""
    sq = q.shape[2]
    weights = None
    if decay != 1.0:
        # Same expression as the reference, so the weights agree bit for bit.
        weights = decay ** torch.arange(sq - 1, -1, -1, device=k.device, dtype=torch.float32)
    return attention_column_sums(q, k, valid, scale, weights, splits=splits, lse=lse)
