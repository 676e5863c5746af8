"""Per-slot state threaded between compiled calls.

The model's cache holds only K and V. The state of each slot (its bias, and
how many tokens the cache has absorbed) rides on the key tensor the compiled
graph writes back: dynamo stores that very object in the cache and passes it
back in on the next call, so a Python attribute on it survives (DESIGN.md §4).
A key tensor that arrives without state -- a cache kvfx never compressed, or
one rebuilt outside the graph -- gets neutral state and the model's own mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from kvfx import buffers
from kvfx.passes.rewrite import StatePlan

STATE_ATTR = "_kvfx_state"


@dataclasses.dataclass
class SlotState:
    slot_bias: torch.Tensor  # [B, Hkv, S] float32
    seen: torch.Tensor       # 0-d int64: tokens this cache has absorbed (positions follow it)
    slot_score: torch.Tensor  # [B, Hkv, S] float32: running score of continuous policies


def state_of(keys: Any) -> Optional[SlotState]:
    """The state riding on a cached key tensor, if it still matches it."""
    state = getattr(keys, STATE_ATTR, None)
    if state is None or not isinstance(keys, torch.Tensor):
        return None
    bias = state.slot_bias
    if bias.shape != keys.shape[:3] or bias.device != keys.device:
        return None  # the cache was changed outside the compiled graph
    return state


def tokens_seen(cached) -> int:
    """Tokens a cache layer stands for: a kvfx store layer's count, or a cached
    key tensor's (its length when kvfx never touched it)."""
    if not isinstance(cached, torch.Tensor):
        return int(cached.seen) if getattr(cached, "is_initialized", False) else 0
    state = state_of(cached)
    return int(state.seen) if state is not None else cached.shape[-2]


class PositionError(RuntimeError):
    pass


class StatefulGraph:
    """Calls a rewritten, compiled graph: feeds each decode site's incoming
    state, attaches each write-back's new state, returns the model's outputs.

    A graph that decodes over module buffers kvfx took over (``kvfx.buffers``)
    is compiled here, by ``recompile(capacities)``, once for each set of its
    stores' capacities: a store grows a few times a generation, never per step."""

    def __init__(self, compiled: Optional[Callable], plan: StatePlan,
                 recompile: Optional[Callable[[tuple], Callable]] = None) -> None:
        self.compiled = compiled
        self.plan = plan
        self.recompile = recompile
        self._by_capacity: dict[tuple, Callable] = {}

    def __call__(self, *args):
        plan = self.plan
        extra: list = []
        states = iter(plan.decode_args)
        buffer_sites = iter(plan.buffer_decode)
        held = []   # (buffer state, tokens this call writes)
        for kind in plan.input_kinds:
            if kind == "buffer":
                k_arg, _v_arg, new_tokens = next(buffer_sites)
                state = buffers.grow(args[k_arg], new_tokens)
                held.append((state, new_tokens))
                extra += state.tensors()
                continue
            keys = args[next(states)]
            state = state_of(keys)
            if state is None:  # neutral state; seen = -1 tells kvfx::attend to use the model's mask
                batch, kv_heads, length = keys.shape[:3]
                bias = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
                extra += [bias, torch.full((), -1, dtype=torch.int64, device=keys.device), torch.zeros_like(bias)]
            else:
                extra += [state.slot_bias, state.seen, state.slot_score]
        if plan.positions_from_cache:
            self._check_positions(args)
        compiled = self._for_capacities(tuple(state.capacity for state, _ in held)) if held else self.compiled
        # Backends return callables in dynamo's unboxed convention.
        outs = list(compiled(*args, *extra))
        for state, new_tokens in held:
            state.used += new_tokens
        model_outs = outs[: plan.n_outputs]
        rest = outs[plan.n_outputs:]
        for i, out_index in enumerate(plan.state_outputs):
            setattr(model_outs[out_index], STATE_ATTR, SlotState(*rest[3 * i: 3 * i + 3]))
        rest = rest[3 * len(plan.state_outputs):]
        for i, (k_arg, v_arg, seq_dim) in enumerate(plan.buffer_prefill):  # kvfx takes the prompt's buffers over
            buffers.adopt(args[k_arg], args[v_arg], *rest[4 * i: 4 * i + 4], seq_dim)
        if not plan.output_is_sequence:
            return model_outs[0]
        return tuple(model_outs)

    def _for_capacities(self, capacities: tuple) -> Callable:
        if capacities not in self._by_capacity:
            self._by_capacity[capacities] = self.recompile(capacities)
        return self._by_capacity[capacities]

    def _check_positions(self, args) -> None:
        # RoPE/absolute positions computed from the cache length would be
        # shifted by compression: refuse rather than silently decode garbage.
        keys = args[self.plan.decode_args[0]]
        state = state_of(keys)
        if state is None:
            return
        seen = int(state.seen)
        if seen != keys.shape[-2]:
            raise PositionError(
                f"kvfx: the compressed cache holds {keys.shape[-2]} slots for {seen} tokens seen, and this call "
                "derives positions from the cache length, which would shift them. Pass explicit positions "
                f"(position_ids = {seen} + arange(new tokens), and cache_position likewise for HF models), "
                "or use kvfx.compile(model, policy), which passes them for you; model.generate() passes them."
            )
