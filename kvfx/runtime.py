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
    state, attaches each write-back's new state, returns the model's outputs."""

    def __init__(self, compiled: Callable, plan: StatePlan) -> None:
        self.compiled = compiled
        self.plan = plan

    def __call__(self, *args):
        plan = self.plan
        extra: list = []
        for arg_index in plan.decode_args:
            keys = args[arg_index]
            state = state_of(keys)
            if state is None:  # neutral state; seen = -1 tells kvfx::attend to use the model's mask
                batch, kv_heads, length = keys.shape[:3]
                bias = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
                extra += [bias, torch.full((), -1, dtype=torch.int64, device=keys.device), torch.zeros_like(bias)]
            else:
                extra += [state.slot_bias, state.seen, state.slot_score]
        if plan.positions_from_cache:
            self._check_positions(args)
        # Backends return callables in dynamo's unboxed convention.
        outs = list(self.compiled(*args, *extra))
        model_outs = outs[: plan.n_outputs]
        states = outs[plan.n_outputs:]
        for i, out_index in enumerate(plan.state_outputs):
            setattr(model_outs[out_index], STATE_ATTR, SlotState(*states[3 * i: 3 * i + 3]))
        if not plan.output_is_sequence:
            return model_outs[0]
        return tuple(model_outs)

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
