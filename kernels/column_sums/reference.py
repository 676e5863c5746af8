"""Accumulated causal attention per key (H2O, KVMerger pivots, ZeroMerge)."""

from __future__ import annotations

from typing import Optional

import torch

# Logit of a key a query may not see: finite, so a row that sees nothing
# stays finite (its weight is 0) instead of turning the sums into NaN.
_HIDDEN = torch.finfo(torch.float32).min


def column_sums_reference(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, decay: float = 1.0,
    chunk_rows: int = 0, lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sum_i a_ij * decay^(Sq-1-i): attention each key j receives from every
    query i of the prompt (causal), older queries down-weighted by ``decay``.

    q: [B, H, Sq, D] aligned with the end of k: [B, Hkv, S, D]; valid: [B, S].
    Returns [B, Hkv, S] float32, summed over the query heads of each KV head.
    ``chunk_rows``: queries per chunk (0: sized to keep temporaries near 4 MB).
    ``lse`` [B, H, Sq]: each query's log-sum-exp over the keys it sees, as the
    prompt's attention computed it (``kvfx::attention_lse``); then a = exp(logit
    - lse) in one pass, instead of a softmax (max, exp, sum, divide) per chunk.
    """
    b, h, sq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = h // hkv
    # The query heads of one KV head share its keys: one [G*rows, D] x [D, S]
    # product per KV head, with no copy of the keys per query head.
    keys = k.float().reshape(b * hkv, s, d).transpose(1, 2)  # [B*Hkv, D, S]
    # A query that sees no real key (left padding) contributes nothing: weight 0.
    sees_any = valid.cumsum(-1)[:, s - sq:] > 0  # [B, Sq]
    weights = decay ** torch.arange(sq - 1, -1, -1, device=k.device, dtype=torch.float32) * sees_any
    weights = weights[:, None, None, :].expand(b, hkv, groups, sq)
    if lse is not None:
        # exp(logit - lse) by one fused GEMM (baddbmm: -lse + scale*q.k). A
        # query with no visible key has lse -inf: +inf here makes its row exp(-inf) = 0.
        norm = lse.float().masked_fill(~torch.isfinite(lse), float("inf")).view(b, hkv, groups, sq)
    padded = not bool(valid.all())
    score = q.new_zeros(b * hkv, 1, s, dtype=torch.float32)
    # Query chunks keep the [G*rows, S] temporaries small (a whole-prompt matrix
    # is 150 MB at 2k tokens, mmap'd and zero-filled afresh on every call). A
    # chunk reads only the keys its last query sees (causal): half the work.
    rows = chunk_rows or max(1, (1 << 20) // max(b * h * s, 1))
    for lo in range(0, sq, rows):
        hi = min(lo + rows, sq)
        n = hi - lo
        end = s - sq + hi                                   # keys the chunk's queries see at most
        query = q[:, :, lo:hi].float().reshape(b * hkv, groups * n, d)
        if lse is None:
            logits = torch.bmm(query, keys[..., :end]).mul_(scale)
        else:
            logits = torch.baddbmm(norm[..., lo:hi].reshape(b * hkv, groups * n, 1), query, keys[..., :end],
                                   beta=-1.0, alpha=scale)
        # Causal: every key before the chunk is visible to all its queries;
        # only the chunk's own diagonal block [n, n] hides later keys.
        diagonal = logits.view(b * hkv, groups, n, end)[..., end - n:]
        diagonal.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=k.device).triu_(1), _HIDDEN)
        if padded:
            logits.view(b, hkv * groups * n, end).masked_fill_(~valid[:, None, :end], _HIDDEN)
        probs = logits.softmax(-1) if lse is None else logits.exp_()
        chunk_weights = weights[..., lo:hi].reshape(b * hkv, 1, groups * n)
        score[..., :end].baddbmm_(chunk_weights, probs)
    return score.view(b, hkv, s)


def attention_with_column_sums(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, decay: float = 1.0, queries: int = 0,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's causal attention and its column sums from one pass over
    q.k: each chunk of queries computes its probabilities once, multiplies
    them by the values (the attention output) and adds their weighted rows to
    the sums -- what ``scaled_dot_product_attention(q, k, v, is_causal=True,
    scale=scale)`` followed by ``column_sums_reference(q, k, valid, scale,
    decay)`` compute with two or three passes. On the CPU this is the cheap
    way to exact sums: the flash kernel's log-sum-exp still leaves a second
    q.k product, as large as the attention's own.

    q: [B, H, S, D], k: [B, Hkv, S, D], v: [B, Hkv, S, Dv], every key real (no
    padding: the prompt attention it replaces had no mask). ``queries`` > 0:
    only the last ``queries`` queries add to the sums (the attention output
    still covers every query). Returns (out [B, H, S, Dv] in q's dtype, sums
    [B, Hkv, S] float32, summed over each KV head's query heads).
    """
    b, h, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    groups = h // hkv
    keys = k.float().reshape(b * hkv, s, d).transpose(1, 2)      # [B*Hkv, D, S]
    values = v.float().reshape(b * hkv, s, dv)
    first = s - queries if 0 < queries < s else 0                # the first query the sums count
    weights = decay ** torch.arange(s - 1, -1, -1, device=k.device, dtype=torch.float32)
    out = q.new_empty(b * hkv, groups, s, dv, dtype=torch.float32)
    sums = q.new_zeros(b * hkv, 1, s, dtype=torch.float32)
    # Small chunks keep each [G*rows, S] probability block in cache between
    # its three uses (softmax, times values, into the sums).
    rows = chunk_rows or max(8, (1 << 20) // max(b * h * s, 1))
    for lo in range(0, s, rows):
        hi = min(lo + rows, s)
        n = hi - lo
        query = q[:, :, lo:hi].float().reshape(b * hkv, groups * n, d)
        logits = torch.bmm(query, keys[..., :hi]).mul_(scale)    # causal: keys up to the chunk's last query
        logits.view(b * hkv, groups, n, hi)[..., lo:].masked_fill_(
            torch.ones(n, n, dtype=torch.bool, device=k.device).triu_(1), float("-inf"))
        probs = logits.softmax(-1)
        out[:, :, lo:hi] = torch.bmm(probs, values[:, :hi]).view(b * hkv, groups, n, dv)
        if hi > first:
            chunk_weights = weights[lo:hi].masked_fill(torch.arange(lo, hi, device=k.device) < first, 0.0)
            sums[..., :hi].baddbmm_(chunk_weights.repeat(groups).expand(b * hkv, 1, groups * n), probs)
    return out.view(b, h, s, dv).to(q.dtype), sums.view(b, hkv, s)
