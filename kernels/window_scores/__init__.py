"""SnapKV's observation-window score: reference + Triton."""

from kvfx.kernels.dispatch import dispatched
from kvfx.kernels.window_scores.reference import window_attention_reference

window_attention = dispatched("window_scores", window_attention_reference)

__all__ = ["window_attention", "window_attention_reference"]
