"""What a keep rule needs from the other ranks when a model's KV heads are
split over processes (``kvfx.distributed``): sums and gathers over every
rank's heads. In one process each is the identity, and costs nothing."""

from __future__ import annotations

import torch


def shard_of(policy):
    """The ``kvfx.distributed.TensorParallel`` wrapper ``policy`` is, when it splits heads over ranks; else None."""
    return policy if getattr(type(policy), "splits_heads", False) and policy.world > 1 else None


def sum_over_heads(policy, x: torch.Tensor) -> torch.Tensor:
    """``x`` (a sum over this rank's heads) summed over every rank's heads."""
    shard = shard_of(policy)
    if shard is None:
        return x
    x = x.contiguous()
    torch.distributed.all_reduce(x, group=shard.group)
    return x


def gather_heads(policy, x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, local heads, ...] -> [B, every head, ...], in head order."""
    shard = shard_of(policy)
    if shard is None:
        return x
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    torch.distributed.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.cat(parts, dim=1)


def own_heads(policy, x: torch.Tensor) -> torch.Tensor:
    """This rank's heads of ``x`` [B, every head, ...] (``gather_heads``'s inverse)."""
    shard = shard_of(policy)
    if shard is None:
        return x
    return x[:, shard.first_head:shard.first_head + shard.local_heads]
