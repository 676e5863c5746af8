"""Accumulated causal attention per key (H2O, KVMerger's pivots, ZeroMerge): reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.column_sums.reference import column_sums_reference

column_sums = dispatched("column_sums", column_sums_reference)

__all__ = ["column_sums", "column_sums_reference"]
