"""Attention of new queries over a paged slot store (reference)."""

from __future__ import annotations

import torch


def paged_attention_reference(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_bias: torch.Tensor,
    page_table: torch.Tensor, lengths: torch.Tensor, scale: float, softcap: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale [softcapped] + bias) v over each (batch, KV head)
    row's own slots, computed in float32.

    q: [B, H, Sq, D]; k_pages: [N, P, D], v_pages: [N, P, Dv]; slot_bias: [N, P];
    page_table: [B, Hkv, M] page ids of each row in slot order; lengths:
    [B, Hkv] slots each row holds, whose last Sq are the queries' own tokens
    (causal among themselves, no bias). Returns [B, H, Sq, Dv] in q's dtype.
    """
    b, h, sq, d = q.shape
    hkv, page = page_table.shape[1], k_pages.shape[1]
    groups = h // hkv
    # Read only the pages the longest row uses (a host read: fine on the CPU,
    # where this runs; the Triton kernel bounds each row on the device).
    n = (int(lengths.max()) + page - 1) // page
    table = page_table[:, :, :n]
    width = n * page
    k = k_pages[table].reshape(b, hkv, width, d).float()                    # [B, Hkv, W, D]
    v = v_pages[table].reshape(b, hkv, width, -1).float()
    bias = slot_bias[table].reshape(b, hkv, 1, width)
    slot = torch.arange(width, device=q.device)
    past = (lengths - sq)[..., None, None]                                  # [B, Hkv, 1, 1]
    query = torch.arange(sq, device=q.device)[:, None]                      # [Sq, 1]
    own = (slot >= past) & (slot - past <= query) & (slot < lengths[..., None, None])
    mask = torch.where(slot < past, bias, torch.where(own, 0.0, float("-inf")))   # [B, Hkv, Sq, W]
    # A GQA group's query heads share their KV head's row: [B, Hkv, G * Sq, D].
    rows = q.float().reshape(b, hkv, groups * sq, d)
    mask = mask[:, :, None].expand(b, hkv, groups, sq, width).reshape(b, hkv, groups * sq, width)
    if softcap:
        logits = torch.tanh(rows @ k.transpose(-1, -2) * scale / softcap) * softcap
        out = (logits + mask).softmax(-1) @ v
    else:
        out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(b, h, sq, -1).to(q.dtype)
