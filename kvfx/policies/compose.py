"""A policy built from another one's score and plan with other keep or fold
rules, e.g. SnapKV's keep followed by KVMerger's merge instead of eviction:

    kvfx.Compose(kvfx.SnapKV(budget=0.3), fold_rule=kvfx.GaussianMerge(epsilon=0.6))
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, fail
from kvfx.policies.fold import Fold
from kvfx.policies.keep import Keep
from kvfx.policies.registry import shipped


def _inherited():
    return dataclasses.field(default=None, init=False, repr=False, compare=False)


@shipped
@dataclasses.dataclass(frozen=True)
class Compose(Policy):
    """``policy``'s score, budget, plan and schedule, with ``keep`` and/or
    ``fold`` replaced (None: the policy's own rule)."""

    policy: Optional[Policy] = None
    keep_rule: Optional[Keep] = None
    fold_rule: Optional[Fold] = None
    budget: Budget = _inherited()
    sinks: int = _inherited()
    window: int = _inherited()

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.policy, Policy):
            fail(name, "policy", self.policy, "a kvfx policy (e.g. kvfx.SnapKV(budget=0.3))")
        if self.policy.reconstructs:
            fail(name, "policy", self.policy, f"a policy compressed in its prefill's graph ({type(self.policy).__name__} "
                 "chooses every layer's slots after its reconstruction prefill: wrap nothing around it)")
        if self.keep_rule is not None and not isinstance(self.keep_rule, Keep):
            fail(name, "keep_rule", self.keep_rule, "a keep rule (kvfx.TopTokens(), kvfx.TopChunks(...))")
        if self.fold_rule is not None and not isinstance(self.fold_rule, Fold):
            fail(name, "fold_rule", self.fold_rule,
                 "a fold rule (kvfx.Evict(), kvfx.Compensate(), kvfx.ResidualMerge(), kvfx.GaussianMerge())")
        for name in ("budget", "sinks", "window"):
            object.__setattr__(self, name, getattr(self.policy, name))

    @property
    def schedule(self) -> str:  # type: ignore[override]
        return self.policy.schedule

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.policy.needs_queries

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return self.policy.needs_values

    @property
    def needs_out_projection(self) -> bool:  # type: ignore[override]
        return self.policy.needs_out_projection

    @property
    def needs_rotary(self) -> bool:  # type: ignore[override]
        return self.policy.needs_rotary

    @property
    def sums_attention(self) -> bool:  # type: ignore[override]
        return self.policy.sums_attention

    @property
    def cuts_key_channels(self) -> bool:  # type: ignore[override]
        return self.policy.cuts_key_channels

    def cut_channels(self, q, valid, out):
        return self.policy.cut_channels(q, valid, out)

    def sum_terms(self) -> tuple:
        return self.policy.sum_terms()

    @property
    def observed_window(self):  # type: ignore[override]
        return self.policy.observed_window

    def _score(self, q, k, valid, scale, v=None, layer=0, n_layers=1):
        return self.policy._score(q, k, valid, scale, v, layer, n_layers)

    @property
    def base_scorer(self):  # type: ignore[override]
        return self.policy.base_scorer

    @property
    def accumulates_attention(self) -> bool:  # type: ignore[override]
        return self.policy.accumulates_attention

    def corrected_score(self, base, valid, v, keep):
        return self.policy.corrected_score(base, valid, v, keep)

    def keep(self) -> Keep:
        return self.keep_rule or self.policy.keep()

    def fold(self) -> Fold:
        return self.fold_rule or self.policy.fold()

    def step_score(self, q, k, slot_bias, slot_score, scale):
        return self.policy.step_score(q, k, slot_bias, slot_score, scale)

    def running_score(self, attention, slot_score):
        return self.policy.running_score(attention, slot_score)

    @property
    def steps_on_attention(self) -> bool:
        return self.policy.steps_on_attention

    def layer_budget(self, layer, n_layers):
        return self.policy.layer_budget(layer, n_layers)

    def layer_tokens(self, length, layer, n_layers):
        return self.policy.layer_tokens(length, layer, n_layers)

    def full_heads(self, layer):
        return self.policy.full_heads(layer)

    def reuse_source(self, layer):
        return self.policy.reuse_source(layer)
