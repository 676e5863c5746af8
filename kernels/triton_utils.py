"""Helpers shared by the ``kernels/<op>/triton.py`` modules (imports triton)."""

from __future__ import annotations

import functools

import torch
import triton


def interpreting() -> bool:
    # Only the knob here: modules are decorated before dispatch.interpreting
    # could check that triton.language agrees, and dispatch checks it first.
    return bool(triton.knobs.runtime.interpret)


def tune(configs: list[triton.Config], key: list[str], interpreter: dict[str, int]):
    """``triton.autotune`` over ``configs`` on a GPU; under the interpreter the
    fixed small block sizes ``interpreter`` instead, because there every
    program is Python and benchmarking configs would take minutes.

    Either way the launch site passes no block size, so it reads the same.
    """
    if interpreting():
        return triton.heuristics({name: (lambda v: lambda _args: v)(value) for name, value in interpreter.items()})
    return triton.autotune(configs=configs, key=key)


def block(n: int, minimum: int = 16) -> int:
    """Power-of-two tile covering ``n`` (a head dim of 80 runs in a 128 tile
    with the tail masked); at least 16, the smallest ``tl.dot`` operand."""
    return max(minimum, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallelism(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM on a GPU. On the
    interpreter a small number, so that split-K paths are still exercised."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def splits_for(programs: int, length: int, device: torch.device, min_chunk: int = 256) -> int:
    """Split the key axis so ``programs`` x splits fills the device, keeping
    each split at least ``min_chunk`` keys so the partials stay cheap."""
    want = triton.cdiv(parallelism(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(length, min_chunk)))


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands of ``dtype`` to float32.

    Triton's interpreter keeps bfloat16 as raw uint16 bits and its ``tl.dot``
    multiplies those bits (triton 3.x), so under the interpreter bfloat16 tiles
    go through float32 (exact: bf16 x bf16 products fit a float32). Compiled
    kernels keep the native bf16 tensor-core dot.
    """
    return dtype == torch.bfloat16 and interpreting()
