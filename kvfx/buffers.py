"""kvfx's storage for a preallocated cache buffer a module writes in place at
the positions of each call (gpt-fast's and torchtune's ``KVCache``:
``k_cache[:, :, input_pos] = k``; Meta's ``cache_k[:b, start:end] = xk``).

After the prompt, kvfx owns the layer's cache: the kept slots go to a
compact store (``BufferState``: keys, values and each slot's bias, with room
for a few more tokens), and the module's buffers are emptied in place into
*phantoms*: the same tensor objects, the same shape, every position sharing
one token's worth of zeros (stride 0 along the sequence). The module's own
code still traces against the phantom -- its write and its mask keep their
shapes -- and the decode rewrite (``passes/rewrite.py``) drops that write and
reads the store instead. The state rides on the key phantom, so nothing
outside the module is needed to find it. Also ``buffer[:b, start:end] = k``
into [B, S, H, D] (Meta's reference Llama). One token per call after the
prompt: dynamo refuses to trace a write of several positions into memory
they would share.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

BUFFER_ATTR = "_kvfx_buffer"
NEG_INF = float("-inf")


@dataclasses.dataclass
class BufferState:
    """The compact store behind a phantom key/value buffer pair."""

    k: torch.Tensor           # [B, Hkv, capacity, D]
    v: torch.Tensor           # [B, Hkv, capacity, Dv]
    slot_bias: torch.Tensor   # [B, Hkv, capacity] float32: -inf past the slots in use
    fill: torch.Tensor        # 0-d int64: slots in use (written by the graph, on the device)
    used: int                 # the same count, kept on the host (never read from the device)
    limit: int                # slots the model's own buffer leaves room for: kept + its free positions

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v, self.slot_bias, self.fill

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def is_phantom(buffer: torch.Tensor) -> bool:
    """A buffer kvfx emptied (no memory along its sequence: stride 0); the
    store rides on the key buffer of the pair."""
    return any(st == 0 and n > 1 for st, n in zip(buffer.stride(), buffer.shape))


def state_of(buffer) -> Optional[BufferState]:
    return getattr(buffer, BUFFER_ATTR, None) if isinstance(buffer, torch.Tensor) else None


def _empty_in_place(buffer: torch.Tensor, seq_dim: int) -> None:
    """Free a buffer's memory along its sequence, keeping the object and its
    shape: every position shares one token's worth of zeros. (Only the
    sequence: a slice write of one token into it must not overlap itself,
    which dynamo checks when it traces Meta's ``cache[:b, p:p+1] = k``.)"""
    one = list(buffer.shape)
    one[seq_dim] = 1
    zeros = torch.zeros(one, dtype=buffer.dtype, device=buffer.device)
    stride = list(zeros.stride())
    stride[seq_dim] = 0
    buffer.set_(zeros.untyped_storage(), 0, buffer.shape, stride)


def headroom(kept: int) -> int:
    """Slots for new tokens a fresh store gets beyond its kept ones: an
    eighth of them (at least one); ``grow`` makes more when decode needs it."""
    return max(1, kept // 8)


def adopt(k_buffer: torch.Tensor, v_buffer: torch.Tensor, k, v, slot_bias, seen: torch.Tensor,
          seq_dim: int = 2) -> BufferState:
    """Take over a module's buffers after its prompt: the compressed k, v
    [B, Hkv, n, D] and their bias go to a store with a little room, and both
    buffers become phantoms. The model planned ``k_buffer.shape[seq_dim]``
    positions; the prompt used ``seen`` of them (one host read, once per prompt)."""
    n, prompt = k.shape[2], int(seen)
    limit = n + max(0, k_buffer.shape[seq_dim] - prompt)
    capacity = min(limit, n + headroom(n))
    state = _allocate(k, v, slot_bias, n, capacity, limit)
    _empty_in_place(k_buffer, seq_dim)
    if v_buffer is not k_buffer:
        _empty_in_place(v_buffer, seq_dim)
    setattr(k_buffer, BUFFER_ATTR, state)
    return state


def _allocate(k, v, slot_bias, used: int, capacity: int, limit: int) -> BufferState:
    b, h = k.shape[:2]
    new_k = k.new_zeros(b, h, capacity, k.shape[-1])
    new_v = v.new_zeros(b, h, capacity, v.shape[-1])
    bias = torch.full((b, h, capacity), NEG_INF, dtype=torch.float32, device=k.device)
    new_k[:, :, :used] = k[:, :, :used]
    new_v[:, :, :used] = v[:, :, :used]
    bias[:, :, :used] = slot_bias[:, :, :used]
    return BufferState(new_k, new_v, bias, torch.tensor(used, dtype=torch.int64, device=k.device), used, limit)


def grow(buffer: torch.Tensor, new_tokens: int) -> BufferState:
    """Make room for ``new_tokens`` more slots behind a phantom buffer: the
    store doubles (within what the model's buffer left room for), so a
    generation grows -- and recompiles its decode graph -- a few times, never
    per step. Raises when the model's own buffer would have been full."""
    state = state_of(buffer)
    need = state.used + new_tokens
    if need > state.limit:
        raise ValueError(
            f"kvfx: the cache buffer {list(buffer.shape)} is full: it planned its positions and this call writes "
            f"past them (kvfx holds {state.used} slots, room for {state.limit}). Allocate a longer buffer "
            "(gpt-fast: setup_caches(max_seq_length=...))")
    if need <= state.capacity:
        return state
    capacity = min(state.limit, max(need, 2 * state.capacity))
    grown = _allocate(state.k, state.v, state.slot_bias, state.used, capacity, state.limit)
    setattr(buffer, BUFFER_ATTR, grown)
    return grown


def buffer_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slot_bias: torch.Tensor, fill: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """One decode call over a buffer store, traced into the rewritten graph:
    write the new tokens k_new, v_new [B, Hkv, Sq, D] at slots fill ..
    fill + Sq - 1 (in place: the inner compiler keeps the mutation), then
    attend q [B, H, Sq, D] over every slot with its bias, each new token
    seeing the ones before it. Returns [B, H, Sq, Dv]."""
    from kvfx.kernels.common import repeat_kv

    sq = q.shape[-2]
    slots = fill + torch.arange(sq, device=q.device)
    k.index_copy_(2, slots, k_new.to(k.dtype))
    v.index_copy_(2, slots, v_new.to(v.dtype))
    slot_bias.index_fill_(2, slots, 0.0)
    fill.add_(sq)
    groups = q.shape[1] // k.shape[1]
    logits = q.float() @ repeat_kv(k.float(), groups).transpose(-1, -2) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    position = torch.arange(k.shape[2], device=q.device)
    later = position[None, :] > slots[:, None]                      # [Sq, S]: a new token after this query
    bias = repeat_kv(slot_bias[:, :, None, :], groups).masked_fill(later, NEG_INF)
    probs = (logits + bias).softmax(dim=-1)
    return (probs @ repeat_kv(v.float(), groups)).to(q.dtype)
