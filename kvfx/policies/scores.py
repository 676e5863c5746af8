"""Plain-torch slot scores of the policies (the attention-based scores that
need kernels live in ``kvfx.kernels``: column sums, window scores)."""

from __future__ import annotations

import torch

from kvfx.kernels.common import repeat_kv


def recency(k: torch.Tensor) -> torch.Tensor:
    """Later slots score higher (StreamingLLM keeps the most recent). -> [B, Hkv, S]"""
    b, hkv, s, _ = k.shape
    return torch.arange(s, device=k.device, dtype=torch.float32).expand(b, hkv, s)


def query_attention(q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query over all slots, averaged over each KV
    head's query heads (TOVA, ZeroMerge). q: [B, H, Sq, D], k: [B, Hkv, S, D],
    slot_bias: [B, Hkv, S] (the new tokens' slots included). -> [B, Hkv, S]"""
    b, h = q.shape[:2]
    hkv, s = k.shape[1], k.shape[2]
    logits = q[:, :, -1:].float() @ repeat_kv(k.float(), h // hkv).transpose(-1, -2) * scale  # [B, H, 1, S]
    logits = logits[:, :, 0] + repeat_kv(slot_bias[:, :, :, None], h // hkv)[..., 0]
    return logits.softmax(-1).view(b, hkv, h // hkv, s).mean(dim=2)
