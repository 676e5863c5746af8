"""Accumulated causal attention per key (H2O, KVMerger pivots, ZeroMerge)."""

from __future__ import annotations

from typing import Optional

import torch

from kvfx.kernels.common import repeat_kv


def column_sums_reference(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, decay: float = 1.0,
    chunk_rows: int = 0, lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sum_i a_ij * decay^(Sq-1-i): attention each key j receives from every
    query i of the prompt (causal), older queries down-weighted by ``decay``.

    q: [B, H, Sq, D] aligned with the end of k: [B, Hkv, S, D]; valid: [B, S].
    Returns [B, Hkv, S] float32, summed over the query heads of each KV head.
    ``chunk_rows``: queries per chunk (0: sized to keep temporaries near 8 MB).
    ``lse`` [B, H, Sq]: each query's log-sum-exp over the keys it sees, as the
    prompt's attention computed it (``kvfx::attention_lse``); then a = exp(logit
    - lse) in one pass, instead of a softmax (max, exp, sum, divide) per chunk.
    """
    b, h, sq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    keys = repeat_kv(k.float(), h // hkv).transpose(-1, -2)  # [B, H, D, S]
    key_pos = torch.arange(s, device=k.device)
    # A query that sees no real key (left padding) contributes nothing: weight 0.
    sees_any = valid.cumsum(-1)[:, s - sq:] > 0  # [B, Sq]
    weights = decay ** torch.arange(sq - 1, -1, -1, device=k.device, dtype=torch.float32) * sees_any
    if lse is not None:
        # A query with no visible key has lse -inf: its row must add nothing, not exp(+inf).
        finite = torch.isfinite(lse)
        norm = lse.float().masked_fill(~finite, 0.0)
        weights = (weights[:, None] * finite)[:, :, None]   # [B, H, 1, Sq]
    else:
        weights = weights[:, None, None]
    score = q.new_zeros(b, h, 1, s, dtype=torch.float32)
    # Query chunks keep the [B, H, rows, S] temporaries small: a whole-prompt
    # matrix (150 MB at 2k tokens) is mmap'd and zero-filled afresh on every call.
    # A chunk reads only the keys its last query sees (causal): half the work.
    rows = chunk_rows or max(1, (1 << 21) // max(b * h * s, 1))
    for lo in range(0, sq, rows):
        hi = min(lo + rows, sq)
        end = s - sq + hi                                   # keys the chunk's queries see at most
        query_pos = key_pos[s - sq + lo:end, None]
        visible = (key_pos[None, :end] <= query_pos) & valid[:, None, None, :end]
        # A finite floor instead of -inf: a query that sees a real key has a
        # finite max, so the floor's exp is exactly 0 (and no row is all -inf).
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=k.device).masked_fill_(
            ~visible, torch.finfo(torch.float32).min)
        logits = torch.matmul(q[:, :, lo:hi].float(), keys[..., :end]).mul_(scale).add_(bias)  # [B, H, rows, end]
        if lse is None:
            probs = logits.softmax(-1)
        else:
            probs = logits.sub_(norm[:, :, lo:hi, None]).exp_()
        score[..., :end] += torch.matmul(weights[..., lo:hi], probs)
    return score.view(b, hkv, h // hkv, s).sum(dim=2)
