"""Fold rules: what happens to the slots a keep rule did not keep (DESIGN.md §3).

``Evict`` frees them; ``Compensate`` folds them into one compensation slot
per head (RazorAttention); ``ResidualMerge`` into a few residual slots with
counts (ZeroMerge); ``GaussianMerge`` merges runs of similar adjacent keys
into their most-attended member before the keep is applied (KVMerger). A
slot standing for several tokens gets ``log(count)`` in its bias, so
attention weighs it as the tokens it replaced (RazorAttention eq. 5,
ZeroMerge's compensated attention). Continuous policies also fold at every
decode step (``step``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple, Optional

import torch

from kvfx.kernels.cosine import adjacent_cosine
from kvfx.kernels.gather import gather_slots
from kvfx.kernels.merge import gaussian_merge, segment_mean
from kvfx.policies.budgets import budget_tokens, check_fraction, check_int, fail
from kvfx.policies.keep import Kept, protect, top_sorted

NEG_INF = float("-inf")
# Padding ranks below every real slot but above "no slot at all".
LOWEST_REAL = -3.0e38


@dataclasses.dataclass
class Compressed:
    """What a policy leaves of one layer's cache: [B, Hkv, n] keys/values,
    and per slot its bias (0, -inf for invalid, log(count) for a slot standing
    for several tokens), its running score, and the position it came from.
    ``length`` [B, Hkv]: slots each row really holds, at its front (the rest
    of a row is invalid padding that a ragged store does not keep); None when
    every row holds all n."""

    k: torch.Tensor
    v: torch.Tensor
    slot_bias: torch.Tensor    # [B, Hkv, n] float32
    slot_score: torch.Tensor   # [B, Hkv, n] float32
    index: torch.Tensor        # [B, Hkv, n] int64 (-1: a slot of several tokens)
    length: Optional[torch.Tensor] = None

    def lengths(self) -> torch.Tensor:
        """[B, Hkv] slots each row holds."""
        if self.length is not None:
            return self.length
        return torch.full(self.k.shape[:2], self.k.shape[2], dtype=torch.int64, device=self.k.device)


def bias_of(valid: torch.Tensor) -> torch.Tensor:
    """Slot bias of plain slots: 0 where valid, -inf where padding."""
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, NEG_INF)


def log_count(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, count.clamp_min(1).log(), torch.full_like(count, NEG_INF))


def evict_to(index: torch.Tensor, k, v, valid, score=None, slot_valid=None) -> Compressed:
    """Keep the slots ``index`` names: gather K, V; padding that had to be
    kept, and slots ``slot_valid`` ([B, Hkv, n]) rules out, get -inf."""
    kept_valid = valid[:, None, :].expand(-1, k.shape[1], -1).gather(2, index)
    if slot_valid is not None:
        kept_valid = kept_valid & slot_valid
    bias = bias_of(kept_valid)
    kept_score = torch.zeros_like(bias) if score is None else score.float().gather(2, index)
    return Compressed(gather_slots(k, index), gather_slots(v, index), bias, kept_score, index)


def identity(k, v, valid, score=None) -> Compressed:
    index = torch.arange(k.shape[2], device=k.device).expand(*k.shape[:2], -1)
    return evict_to(index, k, v, valid, score)


def kept_mask(kept: Kept, rows, length: int) -> torch.Tensor:
    """[B, Hkv, S] bool: the slots a row really keeps (rank within its own budget)."""
    b, hkv = kept.index.shape[:2]
    return torch.zeros(b, hkv, length, dtype=torch.bool, device=kept.index.device).scatter(
        2, kept.index, kept.rank < rows)


def whole_heads(out: Compressed, k, v, valid, heads) -> Compressed:
    """A layer where ``heads`` keep every slot (RazorAttention's retrieval
    heads). As a rectangle the other heads pad to S with invalid slots at the
    end; ``length`` says how many each row really holds, so a ragged store
    keeps S slots for the whole heads only."""
    full = identity(k, v, valid)
    kept = out.k.shape[2]
    pad = k.shape[2] - kept
    padded = Compressed(
        torch.nn.functional.pad(out.k, (0, 0, 0, pad)), torch.nn.functional.pad(out.v, (0, 0, 0, pad)),
        torch.nn.functional.pad(out.slot_bias, (0, pad), value=NEG_INF),
        torch.nn.functional.pad(out.slot_score, (0, pad)), torch.nn.functional.pad(out.index, (0, pad), value=-1))
    whole = torch.zeros(k.shape[1], dtype=torch.bool, device=k.device)
    whole[list(heads)] = True

    def pick(a, c):
        return torch.where(whole.view(1, -1, *([1] * (a.dim() - 2))), a, c)

    fields = [f.name for f in dataclasses.fields(Compressed) if f.name != "length"]
    merged = Compressed(*(pick(getattr(full, name), getattr(padded, name)) for name in fields))
    merged.length = torch.where(whole, k.shape[2], kept).expand(k.shape[0], -1).to(torch.int64)
    return merged


class Fold:
    """Base of the fold rules."""

    #: slots the fold takes out of the budget for what it folds
    reserve: ClassVar[int] = 0
    #: kept slots it needs beyond sinks + window
    min_keep: ClassVar[int] = 0

    def apply(self, policy, k, v, valid, score, kept: Kept, n, rows) -> Compressed:
        """Fold one layer's prompt cache into ``n`` slots. k, v: [B, Hkv, S, D];
        score: [B, Hkv, S]; ``kept`` the keep rule's n - reserve slots; rows
        [B, 1, 1]: slots each row keeps of its own real tokens."""
        raise NotImplementedError

    def step(self, policy, q, k, v, slot_bias, slot_score, scale):
        """One decode step of a continuous policy over the cache including the new
        tokens: returns (k, v, slot_bias, slot_score)."""
        raise NotImplementedError(f"{type(self).__name__} has no decode-time fold (schedule 'continuous')")

    def plan_step(self, policy, score, k, v, slot_bias) -> Optional["StepPlan"]:
        """The writes of ``step`` for one new token, as a ``StepPlan`` that
        ``kvfx.store.apply_step`` writes into a store of equal rows, or None
        where the step removes more than one slot (then ``step`` runs over
        copies). ``score`` [B, Hkv, S]: the running score after the new
        token's attention (``Policy.running_score``); slot_bias [B, Hkv, S]
        and k, v [B, Hkv, >= S, D]: the rows (the new token the last slot;
        k and v may run on past S, unread), read only. Branch-free and with
        no host read, so a decode graph can trace it; applied, it equals
        ``step`` exactly."""
        return None


class StepPlan(NamedTuple):
    """One decode step's writes (``kvfx.store.apply_step``):
    first ``write`` (slot [B, Hkv, 1], k, v [B, Hkv, 1, D], bias, score
    [B, Hkv, 1]) where it is given, then slot ``last`` moves into ``drop``
    [B, Hkv, 1] (``drop_index``: the slots after ``last`` move down one) and
    the row's last slot is freed. ``drop`` None: the rows keep every slot
    (only the running scores change)."""

    drop: Optional[torch.Tensor]
    last: int
    write: Optional[tuple] = None


def drop_index(drop: torch.Tensor, s: int, last: int) -> torch.Tensor:
    """Gather index [B, Hkv, s - 1] that removes slot ``drop`` [B, Hkv, 1]
    (at most ``last``) from rows of ``s`` slots: slot ``last`` moves into the
    hole and the slots after it move down one, in order. Slots before ``last``
    are a set (their order carries nothing), so one slot moves instead of all
    the later ones: a decode step costs O(1) copies per row, not O(S)."""
    j = torch.arange(s - 1, device=drop.device)
    index = j + (j >= last)
    return torch.where((j == drop) & (drop < last), last, index)


@dataclasses.dataclass(frozen=True)
class Evict(Fold):
    """Drop what is not kept."""

    def apply(self, policy, k, v, valid, score, kept, n, rows) -> Compressed:
        out = evict_to(kept.index, k, v, valid, score if policy.keeps_prompt_score else None,
                       slot_valid=kept.rank < rows)
        out.length = kept.length
        return out

    def step(self, policy, q, k, v, slot_bias, slot_score, scale):
        """TOVA's step: evict the slots the policy's step score ranks lowest."""
        new, s = q.shape[-2], k.shape[-2]
        n = policy.decode_length(s, new)
        score = policy.step_score(q, k, slot_bias, slot_score, scale)   # [B, Hkv, S]
        if new == 1 and n == s - 1:   # one eviction: the last slot fills the hole (``drop_index``)
            index = drop_index(self._victim(policy, score, slot_bias), s, s - 1)
            return gather_slots(k, index), gather_slots(v, index), slot_bias.gather(2, index), score.gather(2, index)
        invalid = slot_bias == NEG_INF
        index, rank = top_sorted(score.masked_fill(invalid, NEG_INF), n, ranked=True)
        # Each row applies the rule to its own real slots, so a padded row
        # evicts a real slot, not one of its invalid fillers, as it would alone.
        real = (~invalid).sum(-1, keepdim=True)
        bias = slot_bias.gather(2, index).masked_fill(rank >= policy.decode_length(real, new), NEG_INF)
        return gather_slots(k, index), gather_slots(v, index), bias, score.gather(2, index)

    def plan_step(self, policy, score, k, v, slot_bias) -> Optional[StepPlan]:
        s = score.shape[-1]
        n = policy.decode_length(s, 1)
        if n < s - 1:
            return None
        return StepPlan(self._victim(policy, score, slot_bias) if n < s else None, s - 1)

    @staticmethod
    def _victim(policy, score, slot_bias) -> torch.Tensor:
        """The slot [B, Hkv, 1] one eviction removes from each row: its
        lowest-scored real slot (the last of equals, as the stable sort of
        the multi-token step drops), or, where a padded row may keep all its
        real slots, one of its invalid fillers (the last)."""
        s = score.shape[-1]
        invalid = slot_bias == NEG_INF
        real = s - invalid.sum(-1, keepdim=True)
        lowest = (s - 1) - score.masked_fill(invalid, float("inf")).flip(-1).argmin(-1, keepdim=True)
        filler = (s - 1) - invalid.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        keep_real = (policy.decode_length(real, 1) >= real) & (real < s)
        return torch.where(keep_real, filler, lowest)


@dataclasses.dataclass(frozen=True)
class Compensate(Fold):
    """RazorAttention's compensation token: one slot per head holding the mean
    of the dropped keys and values, right after the sinks; ``log_count`` adds
    +ln|D| to its logit (the deployment code omits it)."""

    log_count: bool = True

    reserve: ClassVar[int] = 1

    def apply(self, policy, k, v, valid, score, kept, n, rows) -> Compressed:
        if n >= k.shape[2]:  # nothing would be dropped
            return identity(k, v, valid)
        plain = evict_to(kept.index, k, v, valid, slot_valid=kept.rank < rows)
        dropped = valid[:, None] & ~kept_mask(kept, rows, k.shape[2])
        comp_k, comp_v, count = segment_mean(k, v, torch.where(dropped, 0, -1), 1)
        comp_bias = log_count(count) if self.log_count else torch.zeros_like(count)
        comp_bias = comp_bias.masked_fill(count == 0, NEG_INF)
        at = policy.sinks

        def insert(x, slot):
            return torch.cat([x[:, :, :at], slot, x[:, :, at:]], dim=2)

        return Compressed(insert(plain.k, comp_k), insert(plain.v, comp_v), insert(plain.slot_bias, comp_bias),
                          insert(plain.slot_score, torch.zeros_like(comp_bias)),
                          insert(plain.index, torch.full_like(count, -1, dtype=torch.long)))


class _Merged(NamedTuple):
    j: torch.Tensor          # [B, Hkv, 1] the residual slot merged into
    at: torch.Tensor         # j expanded over head_dim, for k and v
    k: torch.Tensor          # [B, Hkv, 1, D] its merged key and value
    v: torch.Tensor
    log_count: torch.Tensor  # [B, Hkv, 1] its new slot bias
    score: torch.Tensor      # [B, Hkv, 1] its new score


@dataclasses.dataclass(frozen=True)
class ResidualMerge(Fold):
    """ZeroMerge's residual slots: the cache is laid out [``slots`` residual |
    top | tail (the policy's ``window``)]. At prefill the dropped tokens are
    averaged into the residual slots in order (count = tokens merged). At each
    decode step once full, the oldest tail token graduates into the top, the
    lowest-scored top slot merges into its most similar residual slot
    (count-weighted average, counts add, score = max)."""

    slots: int = 2

    min_keep: ClassVar[int] = 1   # the step merges a top slot: at least one

    def __post_init__(self) -> None:
        check_int("ResidualMerge", "slots", self.slots, 1)

    @property
    def reserve(self) -> int:  # type: ignore[override]
        return self.slots

    def apply(self, policy, k, v, valid, score, kept, n, rows) -> Compressed:
        b, hkv, s, _ = k.shape
        if n >= s:
            return identity(k, v, valid, score)
        # A padded row keeps top + tail for its own real length; its leftover
        # slots are invalid and what they would hold is merged, as alone.
        own = kept.rank < rows
        plain = evict_to(kept.index, k, v, valid, score, slot_valid=own)
        dropped = valid[:, None] & ~kept_mask(kept, rows, s)
        rank = dropped.long().cumsum(-1) - 1
        group = torch.div(rank * self.slots, dropped.sum(-1, keepdim=True).clamp_min(1), rounding_mode="floor")
        seg = torch.where(dropped, group, -1)
        res_k, res_v, count = segment_mean(k, v, seg, self.slots)
        res_score = torch.full_like(count, NEG_INF).scatter_reduce(2, seg.clamp(min=0),
                                                                    score.masked_fill(~dropped, NEG_INF), "amax")
        first = torch.full_like(count, s, dtype=torch.long).scatter_reduce(
            2, seg.clamp(min=0), torch.where(dropped, torch.arange(s, device=k.device), s), "amin")
        return Compressed(torch.cat([res_k, plain.k], 2), torch.cat([res_v, plain.v], 2),
                          torch.cat([log_count(count), plain.slot_bias], 2),
                          torch.cat([res_score.clamp_min(0), plain.slot_score], 2),
                          torch.cat([first, plain.index], 2))

    def step(self, policy, q, k, v, slot_bias, slot_score, scale):
        total, new = k.shape[2], q.shape[2]
        score = policy.step_score(q, k, slot_bias, slot_score, scale)
        need = self._merges_needed(policy, slot_bias, new)
        for i in range(total - policy.decode_length(total, new)):
            k, v, slot_bias, score = self._merge_one(policy.window, k, v, slot_bias, score, need > i)
        return k.contiguous(), v.contiguous(), slot_bias.contiguous(), score.contiguous()

    def plan_step(self, policy, score, k, v, slot_bias) -> Optional[StepPlan]:
        s = score.shape[-1]
        n = policy.decode_length(s, 1)
        if n < s - 1:
            return None
        if n == s:
            return StepPlan(None, s - 1)
        drop, m, merge = self._choose(policy.window, k, v, slot_bias, score,
                                      self._merges_needed(policy, slot_bias, 1) > 0)
        folded = merge[..., None]
        write = (m.j, torch.where(folded, m.k, k.gather(2, m.at)), torch.where(folded, m.v, v.gather(2, m.at)),
                 torch.where(merge, m.log_count, slot_bias.gather(2, m.j)),
                 torch.where(merge, m.score, score.gather(2, m.j)))
        return StepPlan(drop, s - policy.window - 1, write)   # the graduated token fills the hole in the top

    def _merges_needed(self, policy, slot_bias, new) -> torch.Tensor:
        """[B, Hkv, 1] merges each row needs by its own count of real slots (a
        padded row's invalid fillers are not counted); the other removals of
        a step drop a filler."""
        total = slot_bias.shape[-1]
        filler = (slot_bias == NEG_INF) & (torch.arange(total, device=slot_bias.device) >= self.slots)
        real = total - filler.sum(-1, keepdim=True)
        return real - policy.decode_length(real, new)

    def _merge(self, k, v, bias, score, low, low_count) -> "_Merged":
        """Slot ``low`` [B, Hkv, 1] (``low_count`` tokens) folded into its most
        similar residual slot j: count-weighted mean of k and v, counts added,
        score the larger."""
        d = k.shape[3]
        low_k = k.gather(2, low[..., None].expand(-1, -1, -1, d)).float()               # [B, Hkv, 1, D]
        low_v = v.gather(2, low[..., None].expand(-1, -1, -1, d)).float()
        j = torch.nn.functional.cosine_similarity(k[:, :, :self.slots].float(), low_k, dim=-1).argmax(-1, keepdim=True)
        res_count = bias[:, :, :self.slots].gather(2, j).exp()
        total = (res_count + low_count).clamp_min(1e-30)
        at = j[..., None].expand(-1, -1, -1, d)
        mean_k = (res_count[..., None] * k.gather(2, at).float() + low_count[..., None] * low_k) / total[..., None]
        mean_v = (res_count[..., None] * v.gather(2, at).float() + low_count[..., None] * low_v) / total[..., None]
        return _Merged(j, at, mean_k.to(k.dtype), mean_v.to(v.dtype), log_count(res_count + low_count),
                       torch.maximum(score.gather(2, j), score.gather(2, low)))

    def _choose(self, tail, k, v, bias, score, merge) -> tuple:
        """One removal from rows of S slots whose last ``tail`` are the tail:
        the lowest-scored real top slot, folded into its most similar
        residual slot (``_merge``); rows where ``merge`` [B, Hkv, 1] is False
        drop their first invalid filler slot instead, folding nothing.
        Returns (the slot removed [B, Hkv, 1], the merge, where it folds).
        k, v may run past S (a store's whole row capacity): read at slots < S only."""
        s = score.shape[-1]
        top = torch.arange(s, device=k.device)
        in_top = (top >= self.slots) & (top < s - tail)          # after the oldest tail token graduated
        low = score.masked_fill(~in_top | (bias == NEG_INF), float("inf")).argmin(-1, keepdim=True)
        filler = in_top & (bias == NEG_INF)
        merge = merge | ~filler.any(-1, keepdim=True)
        drop = torch.where(merge, low, filler.long().argmax(-1, keepdim=True))
        m = self._merge(k, v, bias, score, low, torch.where(merge, bias.gather(2, low).exp(), 0.0))  # 0: nothing folded
        return drop, m, merge

    def _merge_one(self, tail, k, v, bias, score, merge):
        """``_choose``'s removal over copies of the rows."""
        drop, m, merge = self._choose(tail, k, v, bias, score, merge)
        folded = merge[..., None]
        k = k.scatter(2, m.at, torch.where(folded, m.k, k.gather(2, m.at)))
        v = v.scatter(2, m.at, torch.where(folded, m.v, v.gather(2, m.at)))
        bias = bias.scatter(2, m.j, torch.where(merge, m.log_count, bias.gather(2, m.j)))
        score = score.scatter(2, m.j, torch.where(merge, m.score, score.gather(2, m.j)))
        keep = drop_index(drop, k.shape[2], k.shape[2] - tail - 1)   # the graduated token fills the hole in the top
        return gather_slots(k, keep), gather_slots(v, keep), bias.gather(2, keep), score.gather(2, keep)


@dataclasses.dataclass(frozen=True)
class GaussianMerge(Fold):
    """KVMerger's merge (Wang et al., 2024). Tokens the keep rule always keeps,
    the most recent ``recent`` and the ``protect_top`` best-scored fractions of
    a row are protected. Consecutive unprotected tokens whose adjacent keys
    have cosine similarity above ``epsilon`` form merging sets, the strongest
    similarities first and exactly as many as the budget needs. Each set
    becomes one slot: pivot = its best-scored member, weights
    ``exp(-|k_p - k_i|^2 / 2 sigma^2)`` normalised, applied to keys and
    values. Sets are then kept by rank (protected first, then their pivot's
    score); when the sets cannot reach the budget, the lowest are evicted.
    ``count_bias`` adds log(set size) to a merged slot's logit (off = the paper).
    With no similar neighbours it keeps exactly what the keep rule keeps."""

    epsilon: float = 0.75
    sigma: float = 5.0
    recent: float = 0.0
    protect_top: float = 0.0
    count_bias: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.epsilon, (int, float)) or not -1 <= self.epsilon <= 1:
            fail(name, "epsilon", self.epsilon, "a cosine similarity in [-1, 1]")
        if not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            fail(name, "sigma", self.sigma, "a number > 0")
        check_fraction(name, "recent", self.recent)
        check_fraction(name, "protect_top", self.protect_top)

    def apply(self, policy, k, v, valid, score, kept, n, rows) -> Compressed:
        b, hkv, s, _ = k.shape
        if n >= s:
            return identity(k, v, valid)
        score = score.float()
        # Counts per row come from its own real length, so a padded row merges as it would alone.
        real = valid.sum(-1)[:, None, None]                           # [B, 1, 1]
        top, rank = top_sorted(score.masked_fill(~valid[:, None], NEG_INF), math.ceil(self.protect_top * s),
                               ranked=True)
        own_top = rank < budget_tokens(float(self.protect_top), real)
        protected = torch.zeros_like(score, dtype=torch.bool).scatter(2, top, own_top)
        protected |= protect(torch.zeros_like(score), valid, 0, budget_tokens(float(self.recent), real)[:, 0]) == \
            float("inf")
        protected |= (kept.key == float("inf")) & valid[:, None]      # what the keep rule always keeps
        free = valid[:, None, :] & ~protected
        similar = adjacent_cosine(k)                                  # cos(k_i, k_{i-1})
        can_join = (similar > self.epsilon) & free & torch.nn.functional.pad(free[..., :-1], (1, 0))
        # Merge the strongest similarities first, exactly as many as the budget needs.
        strongest, rank = top_sorted(similar.masked_fill(~can_join, NEG_INF), s - n, ranked=True)
        join = torch.zeros_like(can_join).scatter(2, strongest, rank < real - rows) & can_join
        seg = (~join).long().cumsum(-1) - 1                            # merging set of each token
        merged_k, merged_v, count, pivot = gaussian_merge(k, v, score, seg, s, self.sigma)
        # Rank sets: protected first, then by their pivot's score, padding last.
        key = kept.key.masked_fill(protected, float("inf")).masked_fill(~valid[:, None], LOWEST_REAL)
        set_key = torch.full_like(score, NEG_INF).scatter_reduce(2, seg, key, reduce="amax", include_self=True)
        set_valid = torch.zeros_like(score).scatter_reduce(2, seg, valid[:, None].expand_as(score).float(), "amax")
        keep, rank = top_sorted(set_key, n, ranked=True)                # set ids ascend with position
        bias = log_count(count) if self.count_bias else torch.zeros_like(count)
        bias = bias.masked_fill(set_valid == 0, NEG_INF).gather(2, keep).masked_fill(rank >= rows, NEG_INF)
        return Compressed(gather_slots(merged_k, keep), gather_slots(merged_v, keep), bias,
                          torch.zeros(keep.shape, device=k.device), pivot.gather(2, keep))
