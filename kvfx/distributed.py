"""Tensor parallelism: each process (rank) holds a slice of every layer's KV
heads, as transformers' ``from_pretrained(..., tp_plan="auto")`` under
``torchrun`` splits the q/k/v projections by heads, in rank order.

A policy that decides per KV head (SnapKV, H2O, TOVA, ...) compresses a
rank's heads exactly as one process would: it needs nothing from the other
ranks. A decision that spans a layer's heads must see all of them:
ChunkKV's chunk scores are summed over every head, AdaKV's budget is shared
by every head of the layer, RazorAttention names its retrieval heads by
their index in the whole model. ``kvfx.compile`` wraps the policy of a
tensor-parallel model in ``TensorParallel``, whose keep rules reduce over
the ranks (``sum_over_heads``, ``gather_heads``) and whose head indices are
the rank's own. The collectives run inside kvfx's prefill op, where the
keep rule runs (the op is one opaque call in the graph: no graph break).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from kvfx.policies.base import Policy
from kvfx.policies.budgets import cdiv, smin
from kvfx.policies.compose import Compose


@dataclasses.dataclass(frozen=True)
class TensorParallel(Compose):
    """``policy`` on rank ``rank`` of ``world``, which holds KV heads
    ``rank * local .. (rank + 1) * local - 1`` of ``kv_heads`` per layer
    (local = kv_heads / world). ``group``: the tensor-parallel process group
    (None: the default group)."""

    #: keep rules reduce over the ranks for a policy that says so (``kvfx.policies.ranks``)
    splits_heads: ClassVar[bool] = True

    rank: int = 0
    world: int = 1
    kv_heads: int = 1
    group: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world < 1 or not 0 <= self.rank < self.world or self.kv_heads % self.world:
            raise ValueError(f"kvfx: tensor parallelism over {self.world} ranks (this is rank {self.rank}) needs the "
                             f"model's {self.kv_heads} KV heads to split evenly over the ranks")
        if self.policy.ragged_rows:
            raise ValueError(f"kvfx: {self.policy} under tensor parallelism: a recompression whose budget the KV heads "
                             "share would rank every rank's heads together at each one; kvfx does not run that "
                             "across ranks yet (wrap a policy that keeps its best tokens per head instead)")

    @property
    def local_heads(self) -> int:
        return self.kv_heads // self.world

    @property
    def first_head(self) -> int:
        return self.rank * self.local_heads

    def full_heads(self, layer):
        # The policy names heads of the whole model: keep this rank's, numbered from its first.
        first = self.first_head
        return tuple(h - first for h in self.policy.full_heads(layer) if first <= h < first + self.local_heads)

    def store_pages(self, length, layer: int, n_layers: int, kv_heads: int, page: int):
        if not self.keep().shared_across_heads:
            return super().store_pages(length, layer, n_layers, kv_heads, page)
        # The layer's budget of kv_heads * world * n slots is shared by every rank's heads: this
        # rank's heads may take all of it (but no more than they hold). Pages for that bound.
        n = self.budget_length(length, layer, n_layers)
        slots = smin(kv_heads * length, self.world * kv_heads * n)
        return (slots + kv_heads * (page - 1)) // page, cdiv(smin(length, self.world * kv_heads * n), page)


def tensor_parallel(model: torch.nn.Module, policy: Policy) -> Policy:
    """``policy`` for ``model``: wrapped in ``TensorParallel`` when ``model``
    is split over ranks by transformers' tensor parallelism, else unchanged."""
    size = getattr(model, "_tp_size", None)
    if not size or size <= 1 or isinstance(policy, TensorParallel):
        return policy
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return policy
    manager = getattr(model, "_mesh_manager", None)
    group = manager.get_mesh("tp").get_group() if manager is not None else None
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None)
    if kv_heads is None:
        raise ValueError(f"kvfx: {type(model).__name__} is split over {size} ranks, but its config names no "
                         "num_key_value_heads: kvfx cannot tell which KV heads this rank holds")
    return TensorParallel(policy, rank=torch.distributed.get_rank(group), world=torch.distributed.get_world_size(group),
                          kv_heads=int(kv_heads), group=group)
