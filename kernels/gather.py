"""Compaction of the kept slots into a fresh contiguous cache (reference)."""

from __future__ import annotations

import torch


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, S, D], index: [B, Hkv, n] -> [B, Hkv, n, D], contiguous."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1])).contiguous()
