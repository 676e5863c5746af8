"""Accumulated causal attention per key (H2O, KVMerger's pivots, ZeroMerge): reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.column_sums.reference import attention_with_column_sums, column_sums_reference

column_sums = dispatched("column_sums", column_sums_reference)

__all__ = ["attention_with_column_sums", "column_sums", "column_sums_reference"]
