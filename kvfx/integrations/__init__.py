"""kvfx's integrations with other libraries.

Process-wide patches: kvfx changes code outside itself in exactly two
places, both applied by ``install_patches`` when the first ``kvfx.backend``
is built, both idempotent, and both inert for anything kvfx did not compile:
  1. transformers' cache-layer row edits (``reorder_cache``,
     ``batch_select_indices``, ``batch_repeat_interleave``) carry kvfx's slot
     state along, and ``crop`` refuses a compressed cache
     (``transformers.follow_cache_edits``);
  2. ``torch._dynamo.eval_frame.OptimizedModule.__getattr__`` raises on
     ``.generate`` of a module compiled with a kvfx backend, which would never
     reach the backend (``transformers.guard_generate_trap``).
"""

from __future__ import annotations

from typing import Any, Callable


def install_patches(is_kvfx_backend: Callable[[Any], bool]) -> None:
    from kvfx.integrations import transformers

    transformers.follow_cache_edits()
    transformers.guard_generate_trap(is_kvfx_backend)
