"""Eviction presets: one score each, the default keep (top tokens) and fold (evict)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import ClassVar

from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, as_fraction, budget_tokens, ceil_linear, check_int, fail, named_rule, smax
from kvfx.policies.keep import TopTokensAcrossHeads
from kvfx.policies.registry import preset
from kvfx.policies.scores import attention_sums, recency, window_mean_attention


@preset
@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models
    with Attention Sinks"): keep the first ``sinks`` tokens and the most recent
    ones up to the budget."""

    budget: Budget = 0.5
    sinks: int = 4

    needs_queries: ClassVar[bool] = False

    def score(self, q, k, valid, scale):
        return recency(k)


@preset
@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for
    Before Generation"): score each slot by the attention the last ``window``
    queries pay it on average (``scores.window_mean_attention``, kvpress's
    mean), average-pooled over ``kernel`` neighbours as the authors' code
    pools (the prefix only, zero-padded), averaged over a GQA group; keep the
    observation window and the top slots per KV head."""

    budget: Budget = 0.5
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            fail(type(self).__name__, "kernel", self.kernel, "an odd int >= 1")
        if self.window < 1:
            fail(type(self).__name__, "window", self.window, "an int >= 1 (the observation window)")

    def score(self, q, k, valid, scale):
        return window_mean_attention(q, k, valid, scale, self.window, self.kernel)

    @property
    def observed_window(self) -> tuple[int, int]:  # type: ignore[override]
        return (self.window, self.kernel)


@preset
@dataclasses.dataclass(frozen=True)
class KNorm(Policy):
    """Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2
    Norm-Based Strategy for KV Cache Compression"): keys with a low L2 norm
    draw the most attention, so keep the lowest-norm keys."""

    budget: Budget = 0.5

    needs_queries: ClassVar[bool] = False

    def score(self, q, k, valid, scale):
        return -k.float().norm(dim=-1)


@preset
@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models"): keep the tokens that
    received the most attention over the whole prompt (column sums of the
    causal attention) plus the ``window`` most recent ones.

    ``sum_queries``: 0 (default) sums the attention of every prompt query, as
    the paper does; n >= 1 sums only the last n queries' attention (the
    window approximation: prefill cost grows with n, not the prompt, and the
    kept set changes: docs/policies.md gives its measured quality cost).
    """

    budget: Budget = 0.5
    window: int = 32
    sum_queries: int = 0

    sums_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("H2O", "sum_queries", self.sum_queries, 0)

    def sum_terms(self) -> tuple:
        return (1.0, self.sum_queries)

    def score(self, q, k, valid, scale):
        return attention_sums(q, k, valid, scale, *self.sum_terms())

    @property
    def accumulates_attention(self) -> bool:  # type: ignore[override]
        return True


@preset
@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the
    slots the current query attends to most; at every decode step over budget,
    evict the slot with the lowest attention (averaged over a GQA group)."""

    budget: Budget = 0.5

    schedule: ClassVar[str] = "continuous"

    def score(self, q, k, valid, scale):
        return window_mean_attention(q, k, valid, scale, 1, 1)


@preset
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression
    based on Pyramidal Information Funneling"): SnapKV with budgets that fall
    linearly over the layers. Every layer keeps its sinks + window; the rest
    of the mean budget is spread from ``2 - 1/beta`` times its share at the
    first layer to ``1/beta`` at the last, so the mean kept per layer is
    ``budget`` (+ less than one token of rounding) whenever the budget holds
    the always-kept tokens."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            fail(type(self).__name__, "beta", self.beta, "a number >= 1")

    def share(self, layer: int, n_layers: int) -> Fraction:
        """This layer's part of the budget above the always-kept tokens, as a
        multiple of the mean part (mean over the layers = 1)."""
        if n_layers <= 1:
            return Fraction(1)
        low = 1 / as_fraction(self.beta)
        return (2 - low) - (2 - 2 * low) * Fraction(layer, n_layers - 1)

    def layer_tokens(self, length, layer: int, n_layers: int):
        always = self.sinks + self.window
        share = self.share(layer, n_layers)
        if isinstance(self.budget, int):
            extra = budget_tokens(share * (self.budget - always), 1) if self.budget > always else 0
        else:  # ceil(share * (budget * length - always)), guard-free
            extra = ceil_linear(share * as_fraction(self.budget), length, share * always)
        return always + smax(extra, 0)


@preset
@dataclasses.dataclass(frozen=True)
class AdaKV(SnapKV):
    """AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by
    Adaptive Budget Allocation for Efficient LLM Inference"): SnapKV's scores
    with one budget per layer shared by its KV heads. The layer keeps its
    ``Hkv x budget`` best slots across all heads, so heads keep different
    numbers of slots; every head keeps its observation window and its
    ``safeguard`` x budget best slots first (the paper's alpha = 0.2).
    kvfx's slot store holds each head's own slots only, so the layer costs
    its budget (+ less than a page per head), not its longest head."""

    safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.keep()  # validates safeguard under AdaKV's name

    def keep(self) -> TopTokensAcrossHeads:
        return named_rule(TopTokensAcrossHeads, type(self).__name__, safeguard=self.safeguard)
