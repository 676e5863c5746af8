"""Triton kernels for ``paged_attention`` (reference: ``kernels/paged_attention/reference.py``).

Split-K (flash-decoding) attention over a paged slot store, modelled on
``kernels/attention/triton.py``: the grid is (batch x KV head, query-row
blocks, slot splits); each program reads its row's length from ``lengths``
on the device and visits only the slots of its split below that length (a row
shorter than the split's start does no work), gathering each tile's slots
through the row's page table. Each split writes a partial (max, normaliser,
unnormalised output) and the rectangular kernel's ``_combine_kernel`` merges them. The query rows of
one KV head are packed together (row = g * Sq + i for query head g of the
group, query i) so that a GQA group reads each K/V tile once.

The number of splits and their length come from shapes only (the store's
capacity M * P), never from the lengths' values: the host reads no device
tensor, so a decode step does not synchronise and its launches keep static
shapes (CUDA-graph capturable).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from kvfx.kernels.dispatch import triton_module
from kvfx.kernels.triton_utils import block, interpreting, splits_for, tune, upcast_dot

INTERPRETED = interpreting()


@tune(
    configs=[
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for st in (2, 3)
    ],
    key=["BLOCK_M", "BLOCK_D", "BLOCK_DV", "PAGE", "HAS_SOFTCAP"],
    interpreter={"BLOCK_N": 16},
)
@triton.jit
def _split_paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, table_ptr, lengths_ptr, part_max_ptr, part_norm_ptr, part_out_ptr,
    kv_heads, groups, q_len, dim, dim_v, split_len, scale, softcap,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kn, stride_kp, stride_kd,
    stride_vn, stride_vp, stride_vd,
    stride_bn, stride_bp,
    stride_tb, stride_th, stride_tm,
    stride_lb, stride_lh,
    PAGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
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
    # This row's slot count, read on the device: the loop bound below.
    length = tl.load(lengths_ptr + b * stride_lb + hkv * stride_lh).to(tl.int32)
    past = length - q_len  # slots before the queries' own tokens
    table_base = table_ptr + b * stride_tb + hkv * stride_th
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_norm = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < end
        # Slot s lives at slot s % P of page table[s // P]; table entries past
        # the row's pages are never loaded (in_n keeps s < length).
        page = tl.load(table_base + (offs_n // PAGE) * stride_tm, mask=in_n, other=0).to(tl.int64)
        within = offs_n % PAGE
        k = tl.load(
            k_ptr + page[:, None] * stride_kn + within[:, None] * stride_kp + offs_d[None, :] * stride_kd,
            mask=in_n[:, None] & (offs_d[None, :] < dim), other=0.0,
        )
        if UPCAST_DOT:
            k = k.to(tl.float32)
        v = tl.load(
            v_ptr + page[:, None] * stride_vn + within[:, None] * stride_vp + offs_dv[None, :] * stride_vd,
            mask=in_n[:, None] & (offs_dv[None, :] < dim_v), other=0.0,
        )
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if HAS_SOFTCAP:
            # softcap * tanh(x / softcap), tanh written with exp so it runs on
            # every backend and in the interpreter; exp overflowing to inf
            # still gives the right limit (1 - 0 = 1).
            logits = softcap * (1.0 - 2.0 / (tl.exp(2.0 * logits / softcap) + 1.0))
        is_past = offs_n < past
        bias = tl.load(
            bias_ptr + page * stride_bn + within * stride_bp, mask=in_n & is_past, other=0.0
        ).to(tl.float32)
        # Past slots: visible with their bias (-inf hides them). New tokens:
        # causal among the queries. Slots >= length: invisible.
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

    # A split past the row's length stores the empty partial (-inf, 0, 0).
    part = (bhkv * rows + offs_m) * n_splits + split  # [B*Hkv, rows, splits]
    tl.store(part_max_ptr + part, row_max, mask=in_m)
    tl.store(part_norm_ptr + part, row_norm, mask=in_m)
    tl.store(
        part_out_ptr + part[:, None] * dim_v + offs_dv[None, :], acc,
        mask=in_m[:, None] & (offs_dv[None, :] < dim_v),
    )


def paged_attention(
    q, k_pages, v_pages, slot_bias, page_table, lengths, scale: float, softcap: float = 0.0,
    splits: int | None = None,
) -> torch.Tensor:
    """q: [B, H, Sq, D]; k_pages: [N, P, D]; v_pages: [N, P, Dv]; slot_bias:
    [N, P]; page_table: [B, Hkv, M]; lengths: [B, Hkv]. Returns [B, H, Sq, Dv]
    in q's dtype (see the reference). ``splits`` forces the number of slot
    splits (tests use it); splits cover whole pages, so at most M are used.

    Reads no device tensor on the host: launch shapes depend on shapes only.
    """
    b, h, sq, d = q.shape
    hkv, pages = page_table.shape[1], page_table.shape[2]
    page, dv = k_pages.shape[1], v_pages.shape[-1]
    groups = h // hkv
    out = torch.empty(b, h, sq, dv, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    rows = groups * sq
    block_m = min(block(rows), 64)
    m_blocks = triton.cdiv(rows, block_m)
    if splits is None:
        splits = splits_for(b * hkv * m_blocks, pages * page, q.device)
    # Whole pages per split, sized for the capacity: rows shorter than the
    # capacity leave their last splits idle rather than resizing the launch.
    pages_per_split = triton.cdiv(max(pages, 1), splits)
    splits = triton.cdiv(max(pages, 1), pages_per_split)
    split_len = pages_per_split * page
    part_max = torch.empty(b * hkv, rows, splits, device=q.device, dtype=torch.float32)
    part_norm = torch.empty_like(part_max)
    part_out = torch.empty(b * hkv, rows, splits, dv, device=q.device, dtype=torch.float32)
    # float() so that an int scale or cap of 1 is not specialised as a constant.
    _split_paged_attention_kernel[(b * hkv, m_blocks, splits)](
        q, k_pages, v_pages, slot_bias, page_table, lengths, part_max, part_norm, part_out,
        hkv, groups, sq, d, dv, split_len, float(scale), float(softcap) if softcap else 1.0,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *slot_bias.stride(),
        *page_table.stride(), *lengths.stride(),
        PAGE=page, HAS_SOFTCAP=bool(softcap), UPCAST_DOT=upcast_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_D=block(d), BLOCK_DV=block(dv),
    )
    # The partials merge exactly as the rectangular kernel's do (a split that saw
    # no visible slot, e.g. one past its row's length, weighs 0).
    triton_module("attention")._combine_kernel[(b * h * sq,)](
        part_max, part_norm, part_out, out, splits, dv,
        BLOCK_SPLITS=block(splits, minimum=2), BLOCK_DV=block(dv),
    )
    return out
