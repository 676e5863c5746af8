"""Compaction of the kept slots into a fresh contiguous cache (reference)."""

from __future__ import annotations

import torch


def gather_slots_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, S, D], index: [B, Hkv, n] -> [B, Hkv, n, D], contiguous."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1])).contiguous()


def gather_kv_bias_reference(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, index: torch.Tensor):
    """The kept slots of a cache and of its slot bias: k [B, Hkv, S, D], v [B, Hkv, S, Dv],
    bias [B, Hkv, S], index [B, Hkv, n] -> (k [B, Hkv, n, D], v [B, Hkv, n, Dv], bias [B, Hkv, n]), contiguous."""
    return gather_slots_reference(k, index), gather_slots_reference(v, index), bias.gather(2, index).contiguous()
