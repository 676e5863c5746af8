"""Segment reductions that fold several slots into one (KVMerger, RazorAttention, ZeroMerge): reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.merge.reference import gaussian_merge_reference, segment_mean_reference

gaussian_merge = dispatched("merge", gaussian_merge_reference)
segment_mean = dispatched("merge", segment_mean_reference)

__all__ = ["gaussian_merge", "gaussian_merge_reference", "segment_mean", "segment_mean_reference"]
