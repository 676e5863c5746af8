"""Which implementation a kernel module's public function runs.

``KVFX_KERNELS`` picks it:

* unset / empty: Triton when every tensor is on CUDA and triton imports,
  otherwise the plain-torch reference;
* ``reference``: always the reference;
* ``triton``: always Triton. CPU tensors then run under Triton's interpreter,
  which needs ``TRITON_INTERPRET=1``.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when a function is
*decorated*. That happens for triton's own helpers (``tl.sum``, ``tl.zeros``)
when triton is imported, so the variable must be set before the first
``import triton`` in the process -- and ``import torch._dynamo`` or
``import kvfx`` already imports triton. :func:`interpreting` raises a clear
error when it was set too late. Each operator's ``kernels/<op>/triton.py`` is
imported lazily through :func:`triton_module`, which re-imports one whose
kernels were built for the other mode.

Every operator's public function is built by :func:`dispatched` from its
reference; nothing else calls a Triton kernel (tests and the kernel benchmark
reach them through :func:`triton_module`).

This module imports neither triton nor any kernel module at import time:
kvfx must import where triton is missing.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable

import torch

MODES = ("reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def language_interpreted() -> bool:
    """Whether triton.language's jit helpers were built for the interpreter,
    i.e. TRITON_INTERPRET was set when triton was imported."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET``)."""
    import triton

    # The knob reads os.environ on every access, so it sees a variable set or
    # unset after triton was imported, when it is too late for tl.sum & co.
    wanted = bool(triton.knobs.runtime.interpret)
    if wanted != language_interpreted():
        state = "set" if wanted else "unset"
        raise RuntimeError(
            f"TRITON_INTERPRET was {state} after triton was imported: set it before the first `import triton` "
            "(which `import kvfx` and `import torch._dynamo` already do), e.g. on the command line or at the top "
            "of conftest.py"
        )
    return wanted


def kernel_mode() -> str | None:
    """The forced mode from ``KVFX_KERNELS``, or None for the default."""
    raw = os.environ.get("KVFX_KERNELS", "").strip()
    if not raw:
        return None
    if raw.lower() not in MODES:
        raise ValueError(f"KVFX_KERNELS={raw!r} is not allowed: expected one of {', '.join(MODES)} (or unset)")
    return raw.lower()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on ``tensors``."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode is None:
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("KVFX_KERNELS=triton but triton cannot be imported: install triton or unset KVFX_KERNELS")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"KVFX_KERNELS=triton with tensors on {', '.join(devices)}: Triton kernels run on CPU tensors only in "
            "its interpreter; set TRITON_INTERPRET=1 (or use CUDA tensors, or KVFX_KERNELS=reference)"
        )
    return True


def triton_module(op: str) -> ModuleType:
    """``kvfx.kernels.<op>.triton``, its kernels built for the current mode
    (compiled or interpreted)."""
    module = importlib.import_module(f"kvfx.kernels.{op}.triton")
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module


def dispatched(op: str, reference: Callable) -> Callable:
    """The public function of operator ``op``: the Triton kernel of the same
    name (``reference``'s name without ``_reference``) in ``kernels/<op>/triton.py``
    when :func:`use_triton` says so for its tensor arguments, else ``reference``."""
    name = reference.__name__.removesuffix("_reference")

    @functools.wraps(reference)
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if use_triton(*tensors):
            return getattr(triton_module(op), name)(*args, **kwargs)
        return reference(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.reference = reference
    return run
