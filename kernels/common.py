"""Helpers shared by the plain-torch references."""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D], each KV head next to its queries."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
