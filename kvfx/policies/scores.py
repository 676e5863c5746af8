"""Plain-torch slot scores of the policies (the attention-based scores that
need kernels live in ``kvfx.kernels``: column sums, window scores)."""

from __future__ import annotations

import torch


def recency(k: torch.Tensor) -> torch.Tensor:
    """Later slots score higher (StreamingLLM keeps the most recent). -> [B, Hkv, S]"""
    b, hkv, s, _ = k.shape
    return torch.arange(s, device=k.device, dtype=torch.float32).expand(b, hkv, s)


def query_attention(q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query over all slots, averaged over each KV
    head's query heads (TOVA, ZeroMerge). q: [B, H, Sq, D], k: [B, Hkv, S, D],
    slot_bias: [B, Hkv, S] (the new tokens' slots included). -> [B, Hkv, S]"""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    groups = q[:, :, -1].float().view(b, hkv, h // hkv, d)      # a KV head's query heads, side by side
    logits = groups @ k.float().transpose(-1, -2) * scale + slot_bias[:, :, None, :]   # [B, Hkv, G, S]
    return logits.softmax(-1).mean(dim=2)
