"""Attention over cache slots with a per-slot bias (decode): reference + Triton split-K kernel."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.attention.reference import slot_attention_reference

slot_attention = dispatched("attention", slot_attention_reference)

__all__ = ["slot_attention", "slot_attention_reference"]
