"""kvfx's integrations with other libraries.

Process-wide patches: kvfx changes code outside itself in exactly one place,
applied by ``install_patches`` when the first ``kvfx.backend`` is built,
idempotent and inert for anything kvfx did not compile:
``torch._dynamo.eval_frame.OptimizedModule.__getattr__`` raises on
``.generate`` of a module compiled with a kvfx backend, which would never
reach the backend (``transformers.guard_generate_trap``).

Cache edits need no patch: a transformers cache compressed by kvfx holds
kvfx's own layers (``transformers_store.KvfxLayer``), which follow beam
search's row edits and refuse ``crop`` themselves.
"""

from __future__ import annotations

from typing import Any, Callable


def install_patches(is_kvfx_backend: Callable[[Any], bool]) -> None:
    from kvfx.integrations import transformers

    transformers.guard_generate_trap(is_kvfx_backend)
