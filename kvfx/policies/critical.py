"""CriticalKV: any policy's score corrected by what each value does to the
layer's output (kvpress's ``CriticalKVPress``)."""

from __future__ import annotations

import dataclasses
import math

import torch

from kvfx.policies.budgets import check_fraction, fail
from kvfx.policies.compose import Compose
from kvfx.policies.keep import protect
from kvfx.policies.registry import shipped
from kvfx.policies.scores import lent_out_projection, projected_value_norm


@shipped
@dataclasses.dataclass(frozen=True)
class CriticalKV(Compose):
    """CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM
    Inference from an Output Perturbation Perspective"): ``policy``'s budget,
    plan, keep and fold, its score in two stages. Stage 1 keeps the
    ``first_stage`` fraction of each row's budget by ``policy``'s own ranking
    (its sinks and window first); stage 2 ranks the rest by (score +
    ``epsilon``) x ||v W_o||_1, the L1 norm of each value through its heads'
    slice of the output projection W_o (averaged over the query heads of a KV
    head): a slot attention favours but whose value barely moves the output
    is worth less. The rewrite lends W_o, the weight of the linear layer that
    reads the attention output; a layer without one is left uncompressed,
    said by ``kvfx.explain``. The product assumes scores >= 0 (attention
    weights), as the paper and kvpress do. Under ``Recompress`` each
    recompression is corrected too: the wrapped policy's score over the
    slots held (SnapKV's gathered window), stage 1 ``first_stage x target``,
    W_o lent to the decode step."""

    epsilon: float = 1e-4
    first_stage: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy.schedule != "prefill":
            fail("CriticalKV", "policy", self.policy, "a policy that compresses the prompt once (CriticalKV "
                 f"corrects prompt scores; {type(self.policy).__name__} {self.policy.while_decoding})")
        check_fraction("CriticalKV", "first_stage", self.first_stage)
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            fail("CriticalKV", "epsilon", eps, "a finite number >= 0")

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return True

    @property
    def needs_out_projection(self) -> bool:  # type: ignore[override]
        return True

    @property
    def base_scorer(self):  # type: ignore[override]
        return self.policy.base_scorer

    def _score(self, q, k, valid, scale, v=None, layer=0, n_layers=1):
        self._check_values(k, v)
        base = self.policy._score(q, k, valid, scale, v, layer, n_layers).float()
        return self._correct(base, valid, v, self.row_keep(valid, layer, n_layers))

    def corrected_score(self, base, valid, v, keep):
        return self._correct(self.policy.corrected_score(base, valid, v, keep).float(), valid, v, keep)

    def _correct(self, base, valid, v, keep):
        """``base`` corrected for rows that keep ``keep`` slots (an int or a
        tensor broadcasting to [B, Hkv, 1])."""
        weight = lent_out_projection()
        if weight is None:
            raise ValueError("CriticalKV weighs each value by the attention's output projection and got none: the "
                             "rewrite lends it; by hand, compress inside kvfx.policies.scores.out_projection(weight)")
        score = (base + self.epsilon) * projected_value_norm(v, weight)
        # Stage 1: each row's first_stage share of its budget by the policy's own ranking (at least one).
        first = (torch.as_tensor(keep, device=base.device).float() * self.first_stage).floor()
        if self.first_stage > 0:
            first = first.clamp(min=1)
        order = torch.sort(protect(base, valid, self.sinks, self.window), dim=-1, descending=True,
                           stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))
        return score.masked_fill(rank < first, torch.finfo(torch.float32).max)
