"""The four seed methods: merge (KVMerger), chunk keep (ChunkKV),
compensation token (RazorAttention), residual merge (ZeroMerge).

Algorithms, defaults and sources: DESIGN.md §5. Each preset is a frozen
dataclass of the paper's hyperparameters; the segment reductions they fold
slots with live in ``kernels/merge.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import torch

from kvfx.kernels import scores as score_kernels
from kvfx.kernels.column_sums import column_sums
from kvfx.kernels.cosine import adjacent_cosine
from kvfx.kernels.gather import gather_slots
from kvfx.kernels.merge import gaussian_merge, segment_mean
from kvfx.policies import (Budget, Compressed, Policy, _check_int, _fail, budget_tokens, evict_to, preset, smax, smin,
                           top_sorted)

NEG_INF = float("-inf")
# Padding ranks below every real slot but above "no slot at all".
LOWEST_REAL = -3.0e38


def _check_fraction(policy, field: str, value, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if lo_open else 0 <= value <= 1)
    if not ok:
        _fail(type(policy).__name__, field, value, "a fraction in (0, 1]" if lo_open else "a fraction in [0, 1]")


def _identity(k, v, valid, score=None) -> Compressed:
    index = torch.arange(k.shape[2], device=k.device).expand(*k.shape[:2], -1)
    return evict_to(index, k, v, valid, score)


def _log_count(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, count.clamp_min(1).log(), torch.full_like(count, NEG_INF))


@preset
@dataclasses.dataclass(frozen=True)
class KVMerger(Policy):
    """KVMerger (Wang et al., 2024, "Model Tells You Where to Merge: Adaptive
    KV Cache Merging for LLMs on Long-Context Tasks").

    Consecutive tokens whose adjacent keys have cosine similarity above
    ``epsilon`` form merging sets; the most recent ``recent`` and the
    ``protect_top`` most-attended fractions of the prompt are protected. Each
    set becomes one slot: pivot = its most-attended member, Gaussian-kernel
    weights ``exp(-|k_p - k_i|^2 / 2 sigma^2)``, normalised, applied to keys
    and values. The strongest similarities are merged first so the budget is
    met exactly; when the sets cannot reach it, the least-attended remaining
    slots are evicted. ``count_bias`` adds log(set size) to a merged slot's
    logit (off = the paper). Layers in ``exempt_layers`` keep everything
    (the paper leaves the first two and the last layer unmerged).
    """

    budget: Budget = 0.5
    epsilon: float = 0.75
    sigma: float = 5.0
    recent: float = 0.17
    protect_top: float = 0.12
    count_bias: bool = False
    exempt_layers: tuple = (0, 1, -1)

    fold: ClassVar[str] = "merge"
    needs_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.epsilon, (int, float)) or not -1 <= self.epsilon <= 1:
            _fail("KVMerger", "epsilon", self.epsilon, "a cosine similarity in [-1, 1]")
        if not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            _fail("KVMerger", "sigma", self.sigma, "a number > 0")
        _check_fraction(self, "recent", self.recent)
        _check_fraction(self, "protect_top", self.protect_top)
        if not isinstance(self.exempt_layers, tuple) or not all(isinstance(i, int) for i in self.exempt_layers):
            _fail("KVMerger", "exempt_layers", self.exempt_layers, "a tuple of layer indices (negative counts from the end)")

    def layer_budget(self, layer: int, n_layers: int) -> Budget:
        exempt = {i % n_layers for i in self.exempt_layers} if n_layers > 0 else set()
        return 1.0 if layer in exempt else self.budget

    def compress(self, q, k, v, valid, scale, layer=0, n_layers=1, reuse_index=None) -> Compressed:
        b, hkv, s, _ = k.shape
        n = self.kept_length(s, layer, n_layers)
        score = column_sums(q, k, valid, scale)                       # accumulated attention [B, Hkv, S]
        if n >= s:
            return _identity(k, v, valid)
        # Counts per row come from its own real length, so a padded row merges as it would alone.
        real = valid.sum(-1)[:, None, None]                           # [B, 1, 1]
        recent = budget_tokens(float(self.recent), real)
        protected_top, rank = top_sorted(score.masked_fill(~valid[:, None], NEG_INF),
                                         math.ceil(self.protect_top * s), ranked=True)
        own_top = rank < budget_tokens(float(self.protect_top), real)
        protected = torch.zeros_like(score, dtype=torch.bool).scatter(2, protected_top, own_top)
        protected |= score_kernels.protect(torch.zeros_like(score), valid, 0, recent[:, 0]) == float("inf")
        free = valid[:, None, :] & ~protected
        similar = adjacent_cosine(k)                                  # cos(k_i, k_{i-1})
        can_join = (similar > self.epsilon) & free & torch.nn.functional.pad(free[..., :-1], (1, 0))
        # Merge the strongest similarities first, exactly as many as the budget needs.
        kept_rows = self.row_limits(valid, layer, n_layers)[:, None, None]
        strongest, rank = top_sorted(similar.masked_fill(~can_join, NEG_INF), s - n, ranked=True)
        join = torch.zeros_like(can_join).scatter(2, strongest, rank < real - kept_rows) & can_join
        seg = (~join).long().cumsum(-1) - 1                            # merging set of each token
        merged_k, merged_v, count, pivot = gaussian_merge(k, v, score, seg, s, self.sigma)
        # Rank sets: protected first, then by their pivot's attention, padding last.
        key = score.masked_fill(protected, float("inf")).masked_fill(~valid[:, None], LOWEST_REAL)
        set_key = torch.full_like(score, NEG_INF).scatter_reduce(2, seg, key, reduce="amax", include_self=True)
        set_valid = torch.zeros_like(score).scatter_reduce(2, seg, valid[:, None].expand_as(score).float(), "amax")
        keep, rank = top_sorted(set_key, n, ranked=True)                # set ids ascend with position
        bias = _log_count(count) if self.count_bias else torch.zeros_like(count)
        bias = bias.masked_fill(set_valid == 0, NEG_INF).gather(2, keep).masked_fill(rank >= kept_rows, NEG_INF)
        return Compressed(gather_slots(merged_k, keep), gather_slots(merged_v, keep), bias,
                          torch.zeros(keep.shape, device=k.device), pivot.gather(2, keep))


@preset
@dataclasses.dataclass(frozen=True)
class ChunkKV(Policy):
    """ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache
    Compression for Efficient Long-Context LLM Inference").

    Token scores = attention of the last ``window`` queries, summed over all
    heads; chunk score = mean over its ``chunk`` tokens; the top chunks fill
    the budget, whole chunks only, the same indices for every head, in
    original order; the observation window (and the partial chunk before it)
    is always kept. ``reuse_every=N``: layers ``l`` with ``l % N != 0`` reuse
    the indices of layer ``l - l % N`` (plain dataflow in the graph; a layer
    whose source sits in another graph computes its own and says so).
    """

    budget: Budget = 0.5
    window: int = 32
    chunk: int = 10
    reuse_every: int = 1

    needs_queries: ClassVar[bool] = True
    # Chunks start at a row's first token, so rows of different real lengths
    # need different kept counts than one rectangular cache can hold.
    supports_padding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("ChunkKV", "chunk", self.chunk, 1)
        _check_int("ChunkKV", "reuse_every", self.reuse_every, 1)

    def kept_length(self, length, layer=0, n_layers=1):
        n = budget_tokens(self.layer_budget(layer, n_layers), length)
        window = smin(self.window, length)
        prefix = length - window
        always = window + prefix % self.chunk                        # window + the partial chunk before it
        chunks = smin(prefix // self.chunk, smax(0, (n - always) // self.chunk))
        return always + chunks * self.chunk

    def reuse_source(self, layer: int) -> Optional[int]:
        return layer - layer % self.reuse_every if layer % self.reuse_every else None

    def compress(self, q, k, v, valid, scale, layer=0, n_layers=1, reuse_index=None) -> Compressed:
        index = reuse_index if reuse_index is not None else self.select(q, k, valid, scale, layer, n_layers)
        return evict_to(index, k, v, valid)

    def select(self, q, k, valid, scale, layer=0, n_layers=1, score=None):
        b, hkv, s, _ = k.shape
        n = self.kept_length(s, layer, n_layers)
        window = min(self.window, s)
        full_chunks = (s - window) // self.chunk
        picked = (n - window - (s - window) % self.chunk) // self.chunk
        token = score_kernels.window_attention(q, k, valid, scale, self.window, 1).sum(dim=1)  # [B, S]
        chunk_score = token[:, : full_chunks * self.chunk].reshape(b, full_chunks, self.chunk).mean(-1)
        chunks = top_sorted(chunk_score, picked)                                  # [B, picked]
        tokens = (chunks[..., None] * self.chunk + torch.arange(self.chunk, device=k.device)).flatten(1)
        tail = torch.arange(full_chunks * self.chunk, s, device=k.device).expand(b, -1)
        return torch.cat([tokens, tail], dim=1)[:, None].expand(b, hkv, -1)


@preset
@dataclasses.dataclass(frozen=True)
class RazorAttention(Policy):
    """RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache
    Compression Through Retrieval Heads").

    Retrieval heads (``retrieval_heads``: (layer, KV head) pairs, from
    ``kvfx.find_retrieval_heads``) keep every token. Every other head keeps
    ``sinks`` + a recent window of ``max(window, budget * S)`` tokens + one
    compensation token: the mean of the dropped keys and values, whose logit
    gets ``+ln|D|`` (``compensation_bias``; the deployment code omits it).

    A rectangular cache costs its longest head: a layer with any retrieval
    head holds S slots (the others padded with invalid slots), so only layers
    without retrieval heads free memory (``kvfx.explain`` shows the bytes).
    """

    budget: Budget = 0.2
    sinks: int = 4
    window: int = 256
    retrieval_heads: tuple = ()
    compensation_bias: bool = True

    fold: ClassVar[str] = "compensate"
    window_within_budget: ClassVar[bool] = False  # budget sizes the recent window: max(window, budget * S)

    def __post_init__(self) -> None:
        super().__post_init__()
        heads = self.retrieval_heads
        if not isinstance(heads, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p) for p in heads):
            _fail("RazorAttention", "retrieval_heads", heads, "a tuple of (layer, kv_head) pairs of ints >= 0")

    def heads_of(self, layer: int) -> list[int]:
        return sorted(h for l, h in self.retrieval_heads if l == layer)

    def recent(self, length):
        return smax(self.window, budget_tokens(self.budget, length))

    def kept_length(self, length, layer=0, n_layers=1):
        if self.heads_of(layer):
            return length
        return smin(length, self.sinks + self.recent(length) + 1)

    def compress(self, q, k, v, valid, scale, layer=0, n_layers=1, reuse_index=None) -> Compressed:
        b, hkv, s, d = k.shape
        recent = min(s, self.recent(s))
        if self.sinks + recent + 1 >= s:  # nothing would be dropped
            return _identity(k, v, valid)
        # Each row's window is the budget of its own real tokens; a padded row's
        # leftover slots are invalid and what they hold is compensated, as alone.
        rows = torch.clamp(torch.as_tensor(budget_tokens(self.budget, valid.sum(-1, keepdim=True))), min=self.window)
        keep = score_kernels.protect(torch.zeros(b, hkv, s, device=k.device), valid, self.sinks, rows)
        protected = keep == float("inf")
        kept = top_sorted(keep, self.sinks + recent)                              # sinks + window
        plain = evict_to(kept, k, v, valid, slot_valid=protected.gather(2, kept))
        dropped = valid[:, None] & ~protected
        comp_k, comp_v, count = segment_mean(k, v, torch.where(dropped, 0, -1), 1)  # one compensation slot
        comp_bias = _log_count(count) if self.compensation_bias else torch.zeros_like(count)
        comp_bias = comp_bias.masked_fill(count == 0, NEG_INF)
        at = self.sinks  # compensation slot right after the sinks

        def insert(x, slot):
            return torch.cat([x[:, :, :at], slot, x[:, :, at:]], dim=2)

        out = Compressed(insert(plain.k, comp_k), insert(plain.v, comp_v), insert(plain.slot_bias, comp_bias),
                         insert(plain.slot_score, torch.zeros_like(comp_bias)),
                         insert(plain.index, torch.full_like(count, -1, dtype=torch.long)))
        heads = self.heads_of(layer)
        if not heads:
            return out
        # Rectangular cache: retrieval heads keep all S; the others pad to S with invalid slots.
        full = _identity(k, v, valid)
        pad = s - out.k.shape[2]
        padded = Compressed(
            torch.nn.functional.pad(out.k, (0, 0, 0, pad)), torch.nn.functional.pad(out.v, (0, 0, 0, pad)),
            torch.nn.functional.pad(out.slot_bias, (0, pad), value=NEG_INF),
            torch.nn.functional.pad(out.slot_score, (0, pad)), torch.nn.functional.pad(out.index, (0, pad), value=-1))
        retrieval = torch.zeros(hkv, dtype=torch.bool, device=k.device)
        retrieval[heads] = True
        pick = lambda a, c: torch.where(retrieval.view(1, hkv, *([1] * (a.dim() - 2))), a, c)  # noqa: E731
        return Compressed(*(pick(getattr(full, f.name), getattr(padded, f.name))
                            for f in dataclasses.fields(Compressed)))


@preset
@dataclasses.dataclass(frozen=True)
class ZeroMerge(Policy):
    """ZeroMerge (Liu et al., 2025, "ZeroMerge: Parameter-Free KV Cache
    Compression for Memory-Efficient Long-Context LLMs").

    A fixed budget per KV head laid out as [``residual`` | top | ``window``
    (tail)]. Score = attention accumulated with ``decay``. Prefill keeps the
    tail, the top-scored tokens, and averages the rest into the residual
    slots (count = tokens merged). Every decode step once full: the oldest
    tail token graduates, the lowest-scored top entry merges into the most
    similar residual slot (count-weighted average, counts add, score = max),
    the new token enters the tail. Attention adds ln(count) to each slot's
    logit. The cache size stays constant while decoding.
    """

    budget: Budget = 0.05
    residual: int = 2
    window: int = 8
    decay: float = 0.98

    schedule: ClassVar[str] = "continuous"
    fold: ClassVar[str] = "merge"
    needs_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("ZeroMerge", "residual", self.residual, 1)
        if not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            _fail("ZeroMerge", "decay", self.decay, "a number in (0, 1]")
        if isinstance(self.budget, int) and self.budget < self.residual + self.window + 1:
            raise ValueError(f"ZeroMerge: budget={self.budget} leaves no top slot; it must be >= residual + "
                             f"window + 1 = {self.residual + self.window + 1}")

    def kept_length(self, length, layer=0, n_layers=1):
        n = smax(budget_tokens(self.budget, length), self.residual + self.window + 1)
        return smin(n, length)

    def compress(self, q, k, v, valid, scale, layer=0, n_layers=1, reuse_index=None) -> Compressed:
        b, hkv, s, _ = k.shape
        n = self.kept_length(s, layer, n_layers)
        score = column_sums(q, k, valid, scale, self.decay)
        if n >= s:
            return _identity(k, v, valid, score)
        key = score_kernels.protect(score, valid, 0, self.window)
        kept, rank = top_sorted(key, n - self.residual, ranked=True)            # top + tail
        # A padded row keeps top + tail for its own real length; its leftover
        # slots are invalid and what they would hold is merged, as alone.
        own = rank < (self.row_limits(valid) - self.residual)[:, None, None]
        plain = evict_to(kept, k, v, valid, score, slot_valid=own)
        kept_mask = torch.zeros_like(valid[:, None].expand(b, hkv, s)).scatter(2, kept, own)
        dropped = valid[:, None] & ~kept_mask
        rank = dropped.long().cumsum(-1) - 1
        group = torch.div(rank * self.residual, dropped.sum(-1, keepdim=True).clamp_min(1), rounding_mode="floor")
        seg = torch.where(dropped, group, -1)
        res_k, res_v, count = segment_mean(k, v, seg, self.residual)
        res_score = torch.full_like(count, NEG_INF).scatter_reduce(2, seg.clamp(min=0),
                                                                    score.masked_fill(~dropped, NEG_INF), "amax")
        first = torch.full_like(count, s, dtype=torch.long).scatter_reduce(
            2, seg.clamp(min=0), torch.where(dropped, torch.arange(s, device=k.device), s), "amin")
        return Compressed(torch.cat([res_k, plain.k], 2), torch.cat([res_v, plain.v], 2),
                          torch.cat([_log_count(count), plain.slot_bias], 2),
                          torch.cat([res_score.clamp_min(0), plain.slot_score], 2),
                          torch.cat([first, plain.index], 2))

    def step(self, q, k, v, slot_bias, slot_score, scale, layer=0, n_layers=1):
        total, new = k.shape[2], q.shape[2]
        attention = score_kernels.query_attention(q, k, slot_bias, scale)
        score = self.decay * slot_score + attention
        # Merges each row needs by its own count (a padded row's invalid
        # fillers are not counted); the other removals drop a filler.
        filler = (slot_bias == NEG_INF) & (torch.arange(total, device=k.device) >= self.residual)
        real = total - filler.sum(-1, keepdim=True)
        need = real - self.decode_length(real, new)
        for i in range(total - self.decode_length(total, new)):
            k, v, slot_bias, score = self._merge_one(k, v, slot_bias, score, need > i)
        return k.contiguous(), v.contiguous(), slot_bias.contiguous(), score.contiguous()

    def _merge_one(self, k, v, bias, score, merge):
        """Fold the lowest-scored real top slot into its most similar residual
        slot; rows where ``merge`` ([B, Hkv, 1]) is False drop their first
        invalid filler slot instead."""
        b, hkv, s, d = k.shape
        r, tail = self.residual, self.window
        top = torch.arange(s, device=k.device)
        in_top = (top >= r) & (top < s - tail)          # after the oldest tail token graduated
        low = score.masked_fill(~in_top | (bias == NEG_INF), float("inf")).argmin(-1, keepdim=True)
        filler = in_top & (bias == NEG_INF)
        merge = merge | ~filler.any(-1, keepdim=True)
        drop = torch.where(merge, low, filler.long().argmax(-1, keepdim=True))
        low_k = k.gather(2, low[..., None].expand(-1, -1, -1, d)).float()               # [B, Hkv, 1, D]
        low_v = v.gather(2, low[..., None].expand(-1, -1, -1, d)).float()
        low_count = torch.where(merge, bias.gather(2, low).exp(), 0.0)                   # 0: nothing folded
        similar = torch.nn.functional.cosine_similarity(k[:, :, :r].float(), low_k, dim=-1)  # [B, Hkv, r]
        j = similar.argmax(-1, keepdim=True)
        res_count = bias[:, :, :r].gather(2, j).exp()
        total = (res_count + low_count).clamp_min(1e-30)
        res_k = k.gather(2, j[..., None].expand(-1, -1, -1, d)).float()
        res_v = v.gather(2, j[..., None].expand(-1, -1, -1, d)).float()
        new_k = ((res_count[..., None] * res_k + low_count[..., None] * low_k) / total[..., None]).to(k.dtype)
        new_v = ((res_count[..., None] * res_v + low_count[..., None] * low_v) / total[..., None]).to(v.dtype)
        folded = merge[..., None]
        k = k.scatter(2, j[..., None].expand(-1, -1, -1, d), torch.where(folded, new_k, res_k.to(k.dtype)))
        v = v.scatter(2, j[..., None].expand(-1, -1, -1, d), torch.where(folded, new_v, res_v.to(v.dtype)))
        bias = bias.scatter(2, j, torch.where(merge, _log_count(res_count + low_count), bias.gather(2, j)))
        merged_score = torch.maximum(score.gather(2, j), score.gather(2, low))
        score = score.scatter(2, j, torch.where(merge, merged_score, score.gather(2, j)))
        keep = top_sorted(torch.zeros(b, hkv, s, device=k.device).scatter(2, drop, NEG_INF), s - 1)
        return gather_slots(k, keep), gather_slots(v, keep), bias.gather(2, keep), score.gather(2, keep)
