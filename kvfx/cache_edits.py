"""Per-slot state follows the batch edits transformers makes to a cache.

Beam search reorders cache rows (``reorder_cache``), and generation utilities
repeat or select rows (``batch_repeat_interleave``, ``batch_select_indices``).
Each replaces the key tensor, dropping the state that rides on it (runtime.py),
so kvfx wraps these methods of transformers' cache layers to apply the same
row operation to the state. ``crop`` removes *tokens*, which a compressed cache
no longer holds one slot each: it is refused with an error naming it.
Methods act as before on caches kvfx never compressed.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from kvfx.runtime import STATE_ATTR, SlotState, state_of

_ROW_EDITS: dict[str, Callable] = {
    "reorder_cache": lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)),
    "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
    "batch_select_indices": lambda t, indices: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices],
}


def _carrying(name: str, method: Callable, edit: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, arg):
        keys = getattr(self, "keys", None)
        state = state_of(keys)
        method(self, arg)
        if state is not None and self.keys is not keys:
            setattr(self.keys, STATE_ATTR, SlotState(edit(state.slot_bias, arg), state.seen, edit(state.slot_score, arg)))
    wrapper._kvfx_wrapped = True
    return wrapper


def _refusing_crop(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if state_of(getattr(self, "keys", None)) is not None:
            raise ValueError(
                "kvfx: crop() on a compressed cache is not supported: its slots are no longer one per token, so "
                "removing the last N tokens (assisted or speculative decoding, DoLa) has no defined meaning. "
                "Generate without assistant_model / prompt lookup, or without kvfx.")
        return method(self, *args, **kwargs)
    wrapper._kvfx_wrapped = True
    return wrapper


def follow_cache_edits() -> None:
    """Install the wrappers on transformers' cache layers (once; no-op without transformers)."""
    try:
        from transformers import cache_utils
    except ImportError:
        return
    for cls in (cache_utils.CacheLayerMixin, cache_utils.DynamicLayer):
        for name, edit in _ROW_EDITS.items():
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_kvfx_wrapped", False):
                setattr(cls, name, _carrying(name, method, edit))
        crop = cls.__dict__.get("crop")
        if crop is not None and not getattr(crop, "_kvfx_wrapped", False):
            setattr(cls, "crop", _refusing_crop(crop))
