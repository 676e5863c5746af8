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


def gather_kv_bias_reference(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, index: torch.Tensor):
    """The kept slots of a cache and of its slot bias: k [B, Hkv, S, D], v [B, Hkv, S, Dv],
    bias [B, Hkv, S], index [B, Hkv, n] -> (k [B, Hkv, n, D], v [B, Hkv, n, Dv], bias [B, Hkv, n]), contiguous."""
    return gather_slots_reference(k, index), gather_slots_reference(v, index), bias.gather(2, index).contiguous()


def gather_kv_bias(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, index: torch.Tensor):
    from kvfx.kernels.dispatch import triton_module, use_triton  # lazy: kvfx imports without triton

    if use_triton(k, v, bias, index):
        return triton_module("gather").gather_kv_bias(k, v, bias, index)
    return gather_kv_bias_reference(k, v, bias, index)
