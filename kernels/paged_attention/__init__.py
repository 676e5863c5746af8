"""Attention over a paged slot store (decode): reference + Triton paged split-K kernel."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.paged_attention.reference import paged_attention_reference

paged_attention = dispatched("paged_attention", paged_attention_reference)

__all__ = ["paged_attention", "paged_attention_reference"]
