"""Keep rules: which slots of a layer's prompt cache survive (DESIGN.md §3).

A keep rule turns a policy's per-slot score into the slots kept. Every rule
keeps the policy's ``sinks`` (first real tokens) and ``window`` (last tokens),
ranks padding last, and returns the kept slots in original order.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from kvfx.policies.budgets import check_fraction, check_int, smax, smin
from kvfx.policies.ranks import gather_heads, own_heads, sum_over_heads


@dataclasses.dataclass
class Kept:
    """What a keep rule chose for one layer. ``key`` [B, Hkv, S] is the ranking
    it used (+inf: always kept, -inf: padding); ``index`` [B, Hkv, n] the kept
    slots, ascending; ``rank`` [B, Hkv, n] each kept slot's rank (0 = best).
    ``length`` [B, Hkv]: for a rule that keeps a different number of slots
    per head, how many of the n each head keeps (at its front); else None."""

    key: torch.Tensor
    index: torch.Tensor
    rank: torch.Tensor
    length: Optional[torch.Tensor] = None


def top_sorted(key: torch.Tensor, n, ranked: bool = False):
    """The ``n`` best slots per row of key [..., S], in original order.
    A stable descending sort breaks ties by position, so the reference, the
    compiled graph and any kernel agree on which slots survive.
    ``ranked``: also return each kept slot's rank (0 = best)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    index, rank = order.sort(dim=-1)
    return (index, rank) if ranked else index


def protect(key: torch.Tensor, valid: torch.Tensor, sinks, window) -> torch.Tensor:
    """Rank key so the first ``sinks`` and last ``window`` real tokens always
    win and padding always loses. key: [B, Hkv, S], valid: [B, S] or, where
    each head holds its own slots, [B, Hkv, S]; ``window`` may be a [B, 1]
    tensor (one window per row)."""
    rank = valid.long().cumsum(-1)  # 1-based position among real tokens
    n_real = rank[..., -1:]
    kept = valid & ((rank <= sinks) | (rank > n_real - window))
    heads = (lambda x: x) if valid.dim() == 3 else (lambda x: x[:, None, :])  # noqa: E731
    key = key.masked_fill(heads(kept), float("inf"))
    return key.masked_fill(~heads(valid), float("-inf"))


class Keep:
    """Base of the keep rules."""

    #: whether a left-padded row can keep slots as it would alone
    supports_padding: ClassVar[bool] = True
    #: whether the KV heads of a layer share one budget, so that each keeps
    #: its own number of slots (``Kept.length``)
    shared_across_heads: ClassVar[bool] = False

    def fit(self, policy, n, length):
        """Slots kept when the budget allows ``n`` of ``length`` (a rule that keeps
        whole units rounds here)."""
        return n

    def select(self, policy, score: torch.Tensor, valid: torch.Tensor, n, rows=None) -> Kept:
        """Keep ``n`` slots per head of score [B, Hkv, S]; ``rows`` [B, 1, 1]:
        the slots each batch row keeps of its own real tokens (padded rows)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TopTokens(Keep):
    """Per KV head: sinks and window, then the best-scored tokens."""

    def select(self, policy, score, valid, n, rows=None) -> Kept:
        key = protect(score.float(), valid, policy.sinks, policy.window)
        index, rank = top_sorted(key, n, ranked=True)
        return Kept(key, index, rank)


@dataclasses.dataclass(frozen=True)
class TopChunks(Keep):
    """ChunkKV's keep (Liu et al., 2025): token scores summed over all heads,
    chunk score = mean over its ``chunk`` tokens; the top whole chunks fill the
    budget, the same indices for every head, in original order; the window
    (and the partial chunk before it) is always kept."""

    chunk: int = 10

    # Chunks start at a row's first token, so rows of different real lengths
    # need different kept counts than one rectangular cache can hold.
    supports_padding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int("TopChunks", "chunk", self.chunk, 1)

    def fit(self, policy, n, length):
        window = smin(policy.window, length)
        prefix = length - window
        always = window + prefix % self.chunk                        # window + the partial chunk before it
        chunks = smin(prefix // self.chunk, smax(0, (n - always) // self.chunk))
        return always + chunks * self.chunk

    def select(self, policy, score, valid, n, rows=None) -> Kept:
        b, hkv, s = score.shape
        window = min(policy.window, s)
        full_chunks = (s - window) // self.chunk
        picked = (n - window - (s - window) % self.chunk) // self.chunk
        token = sum_over_heads(policy, score.float().sum(dim=1))                  # [B, S], every rank's heads
        chunk_score = token[:, : full_chunks * self.chunk].reshape(b, full_chunks, self.chunk).mean(-1)
        chunks = top_sorted(chunk_score, picked)                                  # [B, picked]
        tokens = (chunks[..., None] * self.chunk + torch.arange(self.chunk, device=score.device)).flatten(1)
        tail = torch.arange(full_chunks * self.chunk, s, device=score.device).expand(b, -1)
        index = torch.cat([tokens, tail], dim=1)[:, None].expand(b, hkv, -1)
        kept = torch.zeros_like(score, dtype=torch.bool).scatter(2, index, True)
        key = score.float().masked_fill(kept, float("inf"))
        return Kept(key, index, torch.arange(index.shape[-1], device=score.device).expand_as(index))


@dataclasses.dataclass(frozen=True)
class TopTokensAcrossHeads(Keep):
    """AdaKV's keep (Feng et al., 2024): the KV heads of a layer share one
    budget of ``Hkv x n`` slots per batch row, given to the best-scored slots
    across all its heads, so a head whose attention is spread keeps more than
    a head whose attention is sharp. Every head keeps its sinks and window,
    and its ``safeguard`` x n best slots (the paper's alpha) before the shared
    ranking. Each head's kept slots come first in its row, in original
    order; ``Kept.length`` says how many."""

    safeguard: float = 0.2

    shared_across_heads: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_fraction("TopTokensAcrossHeads", "safeguard", self.safeguard)

    def select(self, policy, score, valid, n, rows=None) -> Kept:
        """``valid`` [B, S], or [B, Hkv, S] for heads that each hold their own
        slots (a recompression while decoding)."""
        b, hkv, s = score.shape
        per_head = rows if rows is not None else torch.full((b, 1, 1), n, device=score.device)  # [B, 1, 1]
        key = protect(score.float(), valid, policy.sinks, policy.window)
        real = valid if valid.dim() == 3 else valid[:, None]
        head_rank = _ranks(key)
        safe = torch.floor(per_head * float(self.safeguard)).long()
        key = key.masked_fill((head_rank < safe) & real, float("inf"))
        every = gather_heads(policy, key)          # the layer's heads on every rank share the budget
        heads = every.shape[1]
        chosen = _ranks(every.reshape(b, 1, heads * s)) < heads * per_head.view(b, 1, 1)
        chosen = own_heads(policy, chosen.view(b, heads, s)) & real
        position = torch.arange(s, device=score.device)
        index = torch.where(chosen, position, position + s).argsort(-1)       # kept first, both ascending
        rank = torch.where(chosen.gather(2, index), 0, s)                    # rank >= any row's count: padding
        return Kept(key, index, rank, chosen.sum(-1))


def _ranks(key: torch.Tensor) -> torch.Tensor:
    """Rank of every slot of key [..., S] in its row (0 = best; ties by position)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
