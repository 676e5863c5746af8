"""Compaction of the kept slots into a fresh contiguous cache (reference)."""

from __future__ import annotations

import torch


def gather_slots_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, S, D], index: [B, Hkv, n] -> [B, Hkv, n, D], contiguous."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1])).contiguous()


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    from kvfx.kernels.dispatch import triton_module, use_triton  # lazy: kvfx imports without triton

    if use_triton(x, index):
        return triton_module("gather").gather_slots(x, index)
    return gather_slots_reference(x, index)
