"""Helpers shared by the plain-torch references."""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D], each KV head next to its queries."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sink_share(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The share of a softmax's mass its slots keep when a learned sink logit
    joins it (gpt-oss): Z / (Z + e^sink) = sigmoid(logsumexp - sink). lse:
    [B, H, Sq, 1]; sinks broadcasts to it ([1, H, 1]: one logit per head)."""
    if sinks.dim() == 3:
        sinks = sinks.unsqueeze(-1)
    return torch.sigmoid(lse - sinks.float())
