"""SnapKV's observation-window score (reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvfx.kernels.common import repeat_kv


def window_attention_reference(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, window: int, kernel: int
) -> torch.Tensor:
    """SnapKV's score: attention the last ``window`` queries pay each key,
    summed over those queries, averaged over the query heads of a KV head.
    The prefix (the keys before the window) is average-pooled over ``kernel``
    neighbours as the SnapKV authors' code and kvpress pool it: over the
    prefix only, zero-padded, divided by ``kernel``. The window's own slots
    keep their summed attention (callers keep the window anyway).

    A left-padded row needs no special case: a pad's attention is 0 (masked
    out of the softmax), exactly the zero padding its row would see alone.

    q: [B, H, Sq, D] (aligned with the end of k), k: [B, Hkv, S, D], valid: [B, S].
    Returns [B, Hkv, S] float32.
    """
    b, h, sq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    w = min(window, sq)
    qw = q[:, :, sq - w :].float()
    logits = qw @ repeat_kv(k.float(), h // hkv).transpose(-1, -2) * scale  # [B, H, w, S]
    query_pos = torch.arange(s - w, s, device=k.device)[:, None]
    visible = (torch.arange(s, device=k.device)[None, :] <= query_pos) & valid[:, None, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    score = pool_prefix(probs.sum(dim=-2), w, kernel)  # [B, H, S]
    return score.view(b, hkv, h // hkv, s).mean(dim=2)


def pool_prefix(score: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """SnapKV's pooling of a window score [..., S]: the slots before the last
    ``window`` average-pooled over ``kernel`` neighbours within them
    (zero-padded, divided by ``kernel``), the window's slots as they are."""
    s = score.shape[-1]
    if kernel <= 1 or s <= window:
        return score
    flat = score.reshape(-1, 1, s)
    prefix = F.avg_pool1d(flat[..., : s - window], kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return torch.cat([prefix, flat[..., s - window :]], dim=-1).view_as(score)
