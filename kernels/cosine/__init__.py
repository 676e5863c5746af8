"""Cosine similarity of adjacent keys (KVMerger's merging sets): reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.cosine.reference import adjacent_cosine_reference

adjacent_cosine = dispatched("cosine", adjacent_cosine_reference)

__all__ = ["adjacent_cosine", "adjacent_cosine_reference"]
