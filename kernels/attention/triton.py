"""Triton kernels for ``slot_attention`` (reference: ``kernels/attention/reference.py``).

Split-K (flash-decoding) attention: at decode there are few queries per KV
head, so besides (batch, KV head, query rows) the grid also splits the slots;
each split writes a partial (max, normaliser, unnormalised output) and
``_combine_kernel`` merges them. The query rows of one KV head are packed
together (row = g * Sq + i for query head g of the group, query i) so that a
GQA group reads each K/V tile once. Any Sq is correct; large Sq just gets
fewer splits.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from kvfx.kernels.triton_utils import block, interpreting, splits_for, tune, upcast_dot

INTERPRETED = interpreting()


@tune(
    configs=[
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for st in (2, 3)
    ],
    key=["BLOCK_M", "BLOCK_D", "BLOCK_DV", "HAS_SOFTCAP"],
    interpreter={"BLOCK_N": 16},
)
@triton.jit
def _split_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, part_max_ptr, part_norm_ptr, part_out_ptr,
    kv_heads, groups, q_len, length, dim, dim_v, split_len, scale, softcap,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_bb, stride_bh, stride_bs,
    HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    bhkv = tl.program_id(0).to(tl.int64)
    b, hkv = bhkv // kv_heads, bhkv % kv_heads
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = groups * q_len
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < rows
    head = hkv * groups + offs_m // q_len
    query = offs_m % q_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=in_m[:, None] & (offs_d[None, :] < dim), other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    past = length - q_len  # slots before the queries' own tokens
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    bias_base = bias_ptr + b * stride_bb + hkv * stride_bh
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_norm = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < end
        k = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=in_n[:, None] & (offs_d[None, :] < dim), other=0.0,
        )
        if UPCAST_DOT:
            k = k.to(tl.float32)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            mask=in_n[:, None] & (offs_dv[None, :] < dim_v), other=0.0,
        )
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if HAS_SOFTCAP:
            # softcap * tanh(x / softcap), tanh written with exp so it runs on
            # every backend and in the interpreter; exp overflowing to inf
            # still gives the right limit (1 - 0 = 1).
            logits = softcap * (1.0 - 2.0 / (tl.exp(2.0 * logits / softcap) + 1.0))
        is_past = offs_n < past
        bias = tl.load(bias_base + offs_n * stride_bs, mask=in_n & is_past, other=0.0).to(tl.float32)
        # Past slots: visible with their bias (-inf hides them). New tokens:
        # causal among the queries.
        visible = in_n[None, :] & (is_past[None, :] | (offs_n[None, :] - past <= query[:, None]))
        logits = tl.where(visible, (logits + bias[None, :]) * LOG2E, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(row_max - shift)
        probs = tl.exp2(logits - shift[:, None])
        row_norm = row_norm * alpha + tl.sum(probs, axis=1)
        # Probabilities stay float32 (the reference's precision); decode is
        # bound by reading K/V, not by this product.
        acc = acc * alpha[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        row_max = new_max

    part = (bhkv * rows + offs_m) * n_splits + split  # [B*Hkv, rows, splits]
    tl.store(part_max_ptr + part, row_max, mask=in_m)
    tl.store(part_norm_ptr + part, row_norm, mask=in_m)
    tl.store(
        part_out_ptr + part[:, None] * dim_v + offs_dv[None, :], acc,
        mask=in_m[:, None] & (offs_dv[None, :] < dim_v),
    )


@triton.jit
def _combine_kernel(
    part_max_ptr, part_norm_ptr, part_out_ptr, out_ptr, n_splits, dim_v,
    BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One output row from its splits' partials. Rows are ordered
    (batch, KV head, group member, query), which is exactly the row order of a
    contiguous [B, H, Sq, Dv] output."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_s = offs_s < n_splits
    part_max = tl.load(part_max_ptr + row * n_splits + offs_s, mask=in_s, other=float("-inf"))
    part_norm = tl.load(part_norm_ptr + row * n_splits + offs_s, mask=in_s, other=0.0)
    part_out = tl.load(
        part_out_ptr + (row * n_splits + offs_s[:, None]) * dim_v + offs_dv[None, :],
        mask=in_s[:, None] & (offs_dv[None, :] < dim_v), other=0.0,
    )
    top = tl.max(part_max, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(part_max - top)  # a split that saw only masked slots weighs 0
    norm = tl.sum(part_norm * weight, axis=0)
    out = tl.sum(part_out * weight[:, None], axis=0) / norm
    tl.store(out_ptr + row * dim_v + offs_dv, out.to(out_ptr.dtype.element_ty), mask=offs_dv < dim_v)


def slot_attention(q, k, v, slot_bias, scale: float, softcap: float = 0.0, splits: int | None = None) -> torch.Tensor:
    """q: [B, H, Sq, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv]; slot_bias:
    [B, Hkv, S - Sq]. Returns [B, H, Sq, Dv] in q's dtype (see the reference).
    ``splits`` forces the number of slot splits (tests use it)."""
    b, h, sq, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = h // hkv
    out = torch.empty(b, h, sq, dv, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    rows = groups * sq
    block_m = min(block(rows), 64)
    m_blocks = triton.cdiv(rows, block_m)
    if splits is None:
        splits = splits_for(b * hkv * m_blocks, s, q.device)
    split_len = triton.cdiv(s, splits)
    part_max = torch.empty(b * hkv, rows, splits, device=q.device, dtype=torch.float32)
    part_norm = torch.empty_like(part_max)
    part_out = torch.empty(b * hkv, rows, splits, dv, device=q.device, dtype=torch.float32)
    # float() so that an int scale or cap of 1 is not specialised as a constant.
    _split_attention_kernel[(b * hkv, m_blocks, splits)](
        q, k, v, slot_bias, part_max, part_norm, part_out,
        hkv, groups, sq, s, d, dv, split_len, float(scale), float(softcap) if softcap else 1.0,
        *q.stride(), *k.stride(), *v.stride(), *slot_bias.stride(),
        HAS_SOFTCAP=bool(softcap), UPCAST_DOT=upcast_dot(q.dtype), BLOCK_M=block_m, BLOCK_D=block(d), BLOCK_DV=block(dv),
    )
    _combine_kernel[(b * h * sq,)](
        part_max, part_norm, part_out, out, splits, dv,
        BLOCK_SPLITS=block(splits, minimum=2), BLOCK_DV=block(dv),
    )
    return out
