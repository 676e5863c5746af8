"""The base of every policy, and the one driver that applies its primitives.

A policy composes the primitives of DESIGN.md §3:
  * score    -- ``score``: how much each prompt slot is worth keeping;
  * keep     -- ``keep()``: a rule of ``kvfx.policies.keep`` (top tokens, top chunks);
  * fold     -- ``fold()``: a rule of ``kvfx.policies.fold`` (evict, compensate, merge);
  * schedule -- ``schedule``: once after prefill, or also at every decode step
                (``step_score`` + the fold's ``step``);
  * plan     -- ``layer_budget`` / ``layer_tokens``: each layer's budget;
                ``full_heads``: heads that keep everything; ``reuse_source``:
                a layer that reuses another's kept indices.

``compress`` and ``step`` apply them; a preset only says which primitives it
uses. The per-row budget of a padded batch (a row keeps what it would keep
alone) is computed in one place, ``row_keep``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from kvfx.policies.budgets import Budget, budget_tokens, cdiv, check_budget, check_int, smax, smin
from kvfx.policies.fold import Compressed, Evict, Fold, evict_to, whole_heads
from kvfx.policies.keep import Keep, TopTokens
from kvfx.policies.registry import register_class
from kvfx.policies.scores import query_attention


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base of every preset. A subclass is a frozen dataclass of its paper's
    hyperparameters that overrides ``score`` (and, where its paper says so,
    ``keep``, ``fold``, ``layer_budget``, ``full_heads`` or ``step_score``)."""

    budget: Budget = 0.5
    sinks: int = 0
    window: int = 0

    #: when compression runs: "prefill" = once, right after the prompt is
    #: cached; "continuous" = also at every decode step.
    schedule: ClassVar[str] = "prefill"
    #: whether ``score`` reads the queries; when False the graph does not pass
    #: them (``q`` is None), so a subclass whose score reads q must say True.
    needs_queries: ClassVar[bool] = True
    #: whether ``score`` reads the values too: it is then called as
    #: ``score(q, k, valid, scale, v)`` with v [B, Hkv, S, D] (LagKV, CUR)
    needs_values: ClassVar[bool] = False
    #: whether ``_score`` reads the weight of the linear layer after the
    #: attention (``scores.lent_out_projection``): the rewrite finds and lends it
    needs_out_projection: ClassVar[bool] = False
    #: whether ``score`` reads the queries *before* their rotary embedding
    #: (``q`` is then those) and the embedding itself
    #: (``expected.lent_rotary``): the rewrite finds and lends both
    needs_rotary: ClassVar[bool] = False
    #: whether ``score`` sums the prompt's whole causal attention
    #: (``scores.attention_sums``): the rewrite then has the prompt's attention
    #: return its log-sum-exp (one pass over q.k instead of two) or, on the
    #: CPU, the sums themselves (``sum_terms`` says which).
    sums_attention: ClassVar[bool] = False
    #: whether ``compress`` reads each prompt query's log-sum-exp
    #: (``scores.lent_lse``): the rewrite has the prompt's attention return it
    needs_lse: ClassVar[bool] = False
    #: whether ``cut_channels`` zeroes key channels after the fold (ThinK):
    #: the keys must then be per KV head (not a latent, MLA)
    cuts_key_channels: ClassVar[bool] = False
    #: whether the prompt is fed twice, the second time after an instruction to
    #: repeat it, and each layer's kept slots chosen after the call (KVzip)
    reconstructs: ClassVar[bool] = False
    #: whether sinks + window must fit in a token budget (not for a policy
    #: whose budget sizes only part of what it keeps, like RazorAttention).
    window_within_budget: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        register_class(cls)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_budget(name, self.budget)
        check_int(name, "sinks", self.sinks, 0)
        check_int(name, "window", self.window, 0)
        if self.window_within_budget and isinstance(self.budget, int) and self.sinks + self.window > self.budget:
            raise ValueError(
                f"{name}: sinks + window = {self.sinks + self.window} exceeds budget={self.budget}; "
                f"the always-kept tokens must fit in the budget (make budget >= {self.sinks + self.window} "
                "or shrink sinks/window)"
            )

    # -- primitives ---------------------------------------------------------
    def sum_terms(self) -> tuple:
        """(decay, queries) of ``scores.attention_sums`` when
        ``sums_attention``: the presets' ``score`` passes exactly these, and the
        prompt's attention sums with them (lent sums serve only equal terms)."""
        return (1.0, 0)

    def score(self, q: Optional[torch.Tensor], k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        """Worth of each slot, higher = keep. q: [B, H, Sq, D] (None unless
        ``needs_queries``), k: [B, Hkv, S, D], valid: [B, S] bool (a policy
        that ``needs_values`` also gets v [B, Hkv, S, D]).
        Returns [B, Hkv, S]."""
        raise NotImplementedError(f"{type(self).__name__} must define score(q, k, valid, scale)")

    def keep(self) -> Keep:
        return TopTokens()

    def fold(self) -> Fold:
        return Evict()

    def step_score(self, q, k, slot_bias, slot_score, scale) -> torch.Tensor:
        """Score a continuous policy ranks slots by at a decode step (and stores
        as their running score): ``running_score`` of the newest query's
        attention."""
        return self.running_score(query_attention(q, k, slot_bias, scale), slot_score)

    def running_score(self, attention, slot_score) -> torch.Tensor:
        """The running score [B, Hkv, S] after a decode step from the newest
        query's attention (averaged over each KV head's query heads) and the
        score the slots held: the attention itself."""
        return attention

    @property
    def steps_on_attention(self) -> bool:
        """Whether ``step_score`` is ``running_score`` of the newest query's
        attention, so a decode graph may hand the step the attention it
        computed for the layer's output instead of computing it again."""
        return type(self).step_score is Policy.step_score

    # -- plan ---------------------------------------------------------------
    def layer_budget(self, layer: int, n_layers: int) -> Budget:
        """Budget of one layer; uniform unless a preset plans otherwise."""
        return self.budget

    def layer_tokens(self, length, layer: int, n_layers: int):
        """Tokens the plan gives a layer of ``length`` slots (before the always-kept floor)."""
        return budget_tokens(self.layer_budget(layer, n_layers), length)

    def full_heads(self, layer: int) -> tuple[int, ...]:
        """KV heads of ``layer`` that keep every slot."""
        return ()

    def reuse_source(self, layer: int) -> Optional[int]:
        """Layer whose kept indices this layer reuses (ChunkKV); None = its own."""
        return None

    @property
    def while_decoding(self) -> str:
        """What a continuous policy does to the cache while decoding, as a
        warning says it ("TOVA ranks slots at every decode step")."""
        return "ranks slots at every decode step"

    @property
    def observed_window(self) -> Optional[tuple[int, int]]:
        """(window, kernel) when the score is the attention the last
        ``window`` queries pay each slot, the prefix pooled over ``kernel``
        neighbours (SnapKV's): ``Recompress`` then gathers that attention
        decode step by step instead of scoring with one step's query. None:
        any other score."""
        return None

    @property
    def accumulates_attention(self) -> bool:
        """Whether the score is the attention every query so far has paid
        each slot, summed over a KV head's query heads (H2O's column sums):
        ``Recompress`` then starts the slots it keeps from the prompt's sums,
        adds each decode query's attention and carries the sums across
        recompressions, as the paper's H2O does."""
        return False

    @property
    def keeps_prompt_score(self) -> bool:
        """Whether the prompt's compression hands each kept slot its score as
        the running score (``Recompress`` of an ``accumulates_attention``
        score); else the running score starts at 0."""
        return False

    @property
    def base_scorer(self) -> "Policy":
        """The policy whose score a recompression ranks before any correction
        (``Recompress``): itself, or what a correcting wrapper corrects
        (CriticalKV's policy)."""
        return self

    def corrected_score(self, base: torch.Tensor, valid: torch.Tensor, v, keep) -> torch.Tensor:
        """A recompression's score from ``base_scorer``'s (``base`` [B, Hkv,
        S], the gathered window's attention, pooled, where the score is that):
        ``base`` itself, or a correcting wrapper's correction of it (CriticalKV).
        valid: [B, S] or, where each head holds its own slots, [B, Hkv, S]; v
        [B, Hkv, S, D]; ``keep``: slots the recompression keeps per row."""
        return base

    def idle_step(self, length, new) -> bool:
        """Whether a decode step over rows of ``length`` slots, ``new`` of them
        this call's, changes nothing (a schedule not due and no score to
        gather): the store skips it."""
        return False

    def step_scores_only(self, length, new) -> bool:
        """Whether such a step changes the running score alone (its keys and
        values stay): the store then reads no values and writes the score."""
        return False

    @property
    def ragged_rows(self) -> bool:
        """Whether decode steps leave the KV heads of a layer holding different
        counts (``Recompress`` of a budget the heads share, AdaKV): its
        ``step_rows`` then steps them, on kvfx's slot store only."""
        return False

    @property
    def keeps_running_score(self) -> bool:
        """Whether slots carry a running score between decode steps (a float32
        per slot in the store): a continuous policy's, unless it ranks afresh."""
        return self.schedule == "continuous"

    @property
    def supports_padding(self) -> bool:
        """Whether a left-padded row compresses as it would alone (else kvfx.compile refuses padded batches)."""
        return self.keep().supports_padding

    # -- lengths ------------------------------------------------------------
    def keep_count(self, length, layer: int = 0, n_layers: int = 1, cap=None):
        """Slots the keep rule keeps of ``length`` (the fold's own slots apart):
        the plan's tokens, never fewer than the always-kept ones, at most
        ``cap`` (default: what the fold leaves of ``length``)."""
        fold = self.fold()
        n = smax(self.layer_tokens(length, layer, n_layers) - fold.reserve,
                 self.sinks + self.window + fold.min_keep)
        return self.keep().fit(self, smin(n, length - fold.reserve if cap is None else cap), length)

    def budget_length(self, length, layer: int = 0, n_layers: int = 1):
        """Slots a compressed head keeps out of ``length`` (guard-free)."""
        return self.keep_count(length, layer, n_layers) + self.fold().reserve

    def kept_length(self, length, layer: int = 0, n_layers: int = 1):
        """Slots a rectangular cache keeps out of ``length``: the longest head's
        (every slot when some head may keep them all)."""
        if self.full_heads(layer) or self.keep().shared_across_heads:
            return length
        return self.budget_length(length, layer, n_layers)

    def head_slots(self, length, layer: int, n_layers: int, kv_heads: int) -> list:
        """Slots each of ``kv_heads`` KV heads keeps out of ``length`` (guard-free)."""
        n = self.budget_length(length, layer, n_layers)
        full = set(self.full_heads(layer))
        return [length if h in full else n for h in range(kv_heads)]

    def store_pages(self, length, layer: int, n_layers: int, kv_heads: int, page: int):
        """(pages one batch row of a layer's slot store needs, most pages one
        head needs) right after compressing ``length`` slots: the sum over its
        heads, each rounded up to whole pages (guard-free)."""
        if self.keep().shared_across_heads:
            # Heads share kv_heads * n slots; each wastes less than one page.
            n = self.budget_length(length, layer, n_layers)
            return (kv_heads * n + kv_heads * (page - 1)) // page, cdiv(smin(length, kv_heads * n), page)
        pages = [cdiv(n, page) for n in self.head_slots(length, layer, n_layers, kv_heads)]
        total, widest = pages[0], pages[0]
        for p in pages[1:]:
            total, widest = total + p, smax(widest, p)
        return total, widest

    def row_keep(self, valid: torch.Tensor, layer: int = 0, n_layers: int = 1) -> torch.Tensor:
        """[B, 1, 1]: slots each row keeps of its own real tokens, so a padded
        row keeps what it would keep alone (the cache is rectangular: a shorter
        row fills the rest with invalid slots)."""
        real = valid.sum(-1)
        return torch.as_tensor(self.keep_count(real, layer, n_layers, cap=real), device=valid.device)[:, None, None]

    def decode_length(self, total, new):
        """Slots kept after a decode step that brought ``total`` slots (``new``
        of them new): grow until a token budget, then stay; a fraction budget
        keeps the size the prompt was compressed to."""
        cap = self.budget if isinstance(self.budget, int) else 0
        return smin(total, smax(total - new, cap))

    # -- the driver ---------------------------------------------------------
    def select(self, q, k, valid, scale, layer: int = 0, n_layers: int = 1, v=None) -> torch.Tensor:
        """The slots the keep rule keeps, [B, Hkv, n] ascending (before the fold)."""
        n = self.keep_count(k.shape[-2], layer, n_layers)
        return self.keep().select(self, self._score(q, k, valid, scale, v, layer, n_layers), valid, n).index

    def compress(self, q, k, v, valid, scale, layer: int = 0, n_layers: int = 1, reuse_index=None,
                 score_keys=None) -> Compressed:
        """Compress one layer's prompt cache: score, keep, fold, then the
        layer's whole heads. k, v: [B, Hkv, S, D]; valid: [B, S].
        ``score_keys`` [B, H, S, D]: score on these keys instead (a latent
        cache's per-head keys), averaged over the heads each of k's shares."""
        if reuse_index is not None:
            return self.cut_channels(q, valid, evict_to(reuse_index, k, v, valid))
        s = k.shape[2]
        n = self.budget_length(s, layer, n_layers)
        if score_keys is None:
            score = self._score(q, k, valid, scale, v, layer, n_layers)
        else:  # a latent's values are not per head: a score that reads values refuses them in _score
            score = self._score(q, score_keys, valid, scale, v, layer, n_layers)
            score = score.unflatten(1, (k.shape[1], -1)).mean(2)
        fold = self.fold()
        rows = self.row_keep(valid, layer, n_layers)
        kept = self.keep().select(self, score, valid, n - fold.reserve, rows)
        out = fold.apply(self, k, v, valid, score, kept, n, rows)
        heads = self.full_heads(layer)
        out = whole_heads(out, k, v, valid, heads) if heads and out.k.shape[2] < s else out
        return self.cut_channels(q, valid, out)

    def cut_channels(self, q, valid, out: Compressed) -> Compressed:
        """After the fold: a cut along head_dim of the kept keys (ThinK); none here."""
        return out

    def step(self, q, k, v, slot_bias, slot_score, scale, layer: int = 0, n_layers: int = 1):
        """One decode step of a continuous policy: returns (k, v, slot_bias, slot_score)."""
        return self.fold().step(self, q, k, v, slot_bias, slot_score, scale)

    def _score(self, q, k, valid, scale, v=None, layer: int = 0, n_layers: int = 1) -> torch.Tensor:
        """``score`` with the values where it reads them; ``layer`` of
        ``n_layers`` for a wrapper whose score depends on the layer's budget
        (``CriticalKV``)."""
        if self.needs_values:
            self._check_values(k, v)
            return self.score(q, k, valid, scale, v)
        try:
            return self.score(q, k, valid, scale)
        except (AttributeError, TypeError) as err:
            if q is None:
                raise TypeError(f"{type(self).__name__}.score failed with q=None ({err}): a score that reads the "
                                f"queries needs `needs_queries = True` on {type(self).__name__}") from err
            raise

    def _check_values(self, k, v) -> None:
        if v is None or v.shape[:3] != k.shape[:3]:
            seen = "no values" if v is None else f"values of shape {tuple(v.shape)} (a latent cache's, MLA)"
            raise ValueError(f"{type(self).__name__} scores the values too and needs them per KV head, "
                             f"[B, Hkv, S, D] beside keys {tuple(k.shape)}; it got {seen}")
