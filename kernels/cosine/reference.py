"""Cosine similarity of adjacent keys (KVMerger's merging sets)."""

from __future__ import annotations

import torch


def adjacent_cosine_reference(k: torch.Tensor) -> torch.Tensor:
    """cos(k_i, k_{i-1}) for i >= 1, and -1 for i = 0 (nothing before it).
    k: [B, Hkv, S, D] -> [B, Hkv, S] float32."""
    kf = k.float()
    cos = torch.nn.functional.cosine_similarity(kf[:, :, 1:], kf[:, :, :-1], dim=-1, eps=1e-8)
    return torch.nn.functional.pad(cos, (1, 0), value=-1.0)
