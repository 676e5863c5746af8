"""Accumulated causal attention per key (H2O, KVMerger pivots, ZeroMerge)."""

from __future__ import annotations

import torch

from kvfx.kernels.scores import repeat_kv


def column_sums_reference(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, decay: float = 1.0
) -> torch.Tensor:
    """sum_i a_ij * decay^(Sq-1-i): attention each key j receives from every
    query i of the prompt (causal), older queries down-weighted by ``decay``.

    q: [B, H, Sq, D] aligned with the end of k: [B, Hkv, S, D]; valid: [B, S].
    Returns [B, Hkv, S] float32, summed over the query heads of each KV head.
    """
    b, h, sq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    logits = q.float() @ repeat_kv(k.float(), h // hkv).transpose(-1, -2) * scale  # [B, H, Sq, S]
    query_pos = torch.arange(s - sq, s, device=k.device)[:, None]
    visible = (torch.arange(s, device=k.device)[None, :] <= query_pos) & valid[:, None, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    weights = decay ** torch.arange(sq - 1, -1, -1, device=k.device, dtype=torch.float32)  # [Sq]
    score = (probs * weights[:, None]).sum(dim=-2)  # [B, H, S]
    return score.view(b, hkv, h // hkv, s).sum(dim=2)


def column_sums(q, k, valid, scale, decay: float = 1.0):
    from kvfx.kernels.dispatch import triton_module, use_triton  # lazy: kvfx imports without triton

    if use_triton(q, k):
        return triton_module("column_sums").column_sums(q, k, valid, scale, decay)
    return column_sums_reference(q, k, valid, scale, decay)
