"""Compaction of kept slots into a fresh contiguous cache: reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.gather.reference import gather_slots_reference, gather_kv_bias_reference

gather_slots = dispatched("gather", gather_slots_reference)
gather_kv_bias = dispatched("gather", gather_kv_bias_reference)

__all__ = ["gather_slots", "gather_slots_reference", "gather_kv_bias", "gather_kv_bias_reference"]
