"""Attention of new queries over a paged slot store (reference)."""

from __future__ import annotations

import torch

from kvfx.kernels.common import sink_share


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
    b, h, sq, _ = q.shape
    rows, k, v, mask = _rows(q, k_pages, v_pages, slot_bias, page_table, lengths)
    if softcap:
        out = (_logits(rows, k, scale, softcap) + mask).softmax(-1) @ v
    else:
        out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(b, h, sq, -1).to(q.dtype)


def paged_sink_weight(
    q: torch.Tensor, k_pages: torch.Tensor, slot_bias: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
    sinks: torch.Tensor, scale: float, softcap: float = 0.0,
) -> torch.Tensor:
    """The share of each query's softmax mass the store's slots keep when a
    learned sink logit joins the scores (gpt-oss): sigmoid(logsumexp - sink).
    sinks broadcasts to [B, H, Sq, 1]; returns [B, H, Sq, 1] float32."""
    b, h, sq, _ = q.shape
    rows, k, _, mask = _rows(q, k_pages, k_pages, slot_bias, page_table, lengths)
    lse = torch.logsumexp(_logits(rows, k, scale, softcap) + mask, dim=-1).view(b, h, sq, 1)
    return sink_share(lse, sinks)


def _logits(rows: torch.Tensor, k: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """rows k^T * scale, soft-capped when ``softcap``."""
    logits = rows @ k.transpose(-1, -2) * scale
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _rows(q, k_pages, v_pages, slot_bias, page_table, lengths) -> tuple:
    """Queries as [B, Hkv, G * Sq, D] (a GQA group's heads share their KV
    head's row), each row's keys and values [B, Hkv, W, D] in float32 and the
    mask [B, Hkv, 1 or G * Sq, W]: slot bias, the new tokens causal, -inf past
    a row's length."""
    b, h, sq, d = q.shape
    hkv, page = page_table.shape[1], k_pages.shape[1]
    groups = h // hkv
    # Read only the pages the longest row uses (a host read: fine on the CPU,
    # where this runs; the Triton kernel bounds each row on the device).
    n = (int(lengths.max()) + page - 1) // page
    width = n * page
    k, v, bias = page_rows(page_table, n, k_pages, v_pages, slot_bias)
    k, v, bias = k.float(), v.float(), bias.view(b, hkv, 1, width)           # [B, Hkv, W, D]
    slot = torch.arange(width, device=q.device)
    if sq == 1:  # one new token, its row's last slot (no bias): it sees every slot of its row
        last = lengths[..., None, None] - 1
        mask = torch.where(slot < last, bias, torch.where(slot == last, 0.0, float("-inf")))  # [B, Hkv, 1, W]
    else:
        past = (lengths - sq)[..., None, None]                              # [B, Hkv, 1, 1]
        query = torch.arange(sq, device=q.device)[:, None]                  # [Sq, 1]
        own = (slot >= past) & (slot - past <= query) & (slot < lengths[..., None, None])
        mask = torch.where(slot < past, bias, torch.where(own, 0.0, float("-inf")))   # [B, Hkv, Sq, W]
        mask = mask[:, :, None].expand(b, hkv, groups, sq, width).reshape(b, hkv, groups * sq, width)
    return q.float().reshape(b, hkv, groups * sq, d), k, v, mask


def canonical(page_table: torch.Tensor, count: int, n: int) -> bool:
    """Whether every row's first ``n`` pages are the row's own consecutive run
    of a pool of ``count`` pages split evenly in row order (reads the table)."""
    rows = page_table.shape[0] * page_table.shape[1]
    per_row = count // rows
    starts = torch.arange(rows, device=page_table.device)[:, None] * per_row
    return count == rows * per_row and n <= per_row and torch.equal(
        page_table[:, :, :n].reshape(rows, n), starts + torch.arange(n, device=page_table.device))


def page_rows(page_table: torch.Tensor, n: int, *pages: torch.Tensor, in_place: bool = True) -> tuple:
    """Each row's first ``n`` pages of every tensor in ``pages`` ([N, P, ...])
    as [B, Hkv, n * P, ...]: with ``in_place``, a view of the pages when every
    row owns ``N / rows`` consecutive pages in row order (a slot store of
    equal rows is kept so); else a gathered copy."""
    b, hkv = page_table.shape[:2]
    rows, count, page = b * hkv, pages[0].shape[0], pages[0].shape[1]
    per_row = count // rows
    if in_place and canonical(page_table, count, n):
        return tuple(x.view(b, hkv, per_row * page, *x.shape[2:])[:, :, :n * page] for x in pages)
    ids = page_table[:, :, :n].reshape(-1)
    return tuple(x.index_select(0, ids).view(b, hkv, n * page, *x.shape[2:]) for x in pages)


def paged_attention_uniform(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_bias: torch.Tensor, kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """``paged_attention_reference`` for one new token per row over a store
    whose rows all own the same pages in the canonical layout (a policy that
    keeps as many slots in every head), written as plain tensor code so the
    rewrite can put it in the graph itself: the inner compiler fuses it, and a
    CPU decode step pays no custom-op dispatch and no mask building.

    It reads each row's whole capacity as a view of the pages (no copy) and
    relies on the store's invariant that every slot at or past a row's length
    has bias -inf (``kvfx.store``): the bias then is the whole mask. The new
    token's own slot has bias 0 (``store.append``). Computed in q's dtype
    (SDPA accumulates in float32). q: [B, H, 1, D]; returns [B, H, 1, Dv]."""
    b, h, sq, d = q.shape
    k = k_pages.view(b, kv_heads, -1, k_pages.shape[-1])
    v = v_pages.view(b, kv_heads, -1, v_pages.shape[-1])
    mask = slot_bias.view(b, kv_heads, 1, -1).to(q.dtype)
    rows = q.reshape(b, kv_heads, (h // kv_heads) * sq, d)  # a GQA group's heads share their KV head's row
    out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, sq, -1)
