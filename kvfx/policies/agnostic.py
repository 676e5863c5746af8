"""Query-agnostic presets: scores read the keys (and values) alone, so one
compressed cache serves any question asked after it (kvpress's KeyDiffPress,
LagKVPress, CURPress). Each costs O(S x D) at prefill: no pass over q.k."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, check_int, fail
from kvfx.policies.registry import preset
from kvfx.policies.scores import LEVERAGES, by_real_tokens, key_diff, lag_relative, leverage


@preset
@dataclasses.dataclass(frozen=True)
class KeyDiff(Policy):
    """KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache
    Eviction for Long-Context LLM Inference in Resource-Constrained
    Environments"): keep the keys least similar (cosine) to the mean of the
    normalised keys: distinctive keys draw attention, common ones are
    redundant. One-shot over the prompt, as kvpress's ``KeyDiffPress`` (the
    paper also evicts block by block while prefilling)."""

    budget: Budget = 0.5

    needs_queries: ClassVar[bool] = False

    def score(self, q, k, valid, scale):
        return key_diff(k, valid)


@preset
@dataclasses.dataclass(frozen=True)
class LagKV(Policy):
    """LagKV (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV
    Cache Tells Which Tokens Are Important"): after the ``sinks``, partitions
    of ``lag`` tokens; each token scores by how spread its key and value are
    once min-max normalised by the next partition's range, and each partition
    keeps its best-ranked tokens (``cross_scoring``: compare raw scores across
    partitions instead). The sinks, then the last partition and the
    remainder (most recent first), rank above every scored token: a budget
    too small for them keeps the sinks and the most recent tokens. A prompt
    shorter than sinks + 2 x lag keeps its most recent tokens."""

    budget: Budget = 0.5
    sinks: int = 4
    lag: int = 128
    cross_scoring: bool = False

    needs_queries: ClassVar[bool] = False
    needs_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("LagKV", "lag", self.lag, 1)
        if not isinstance(self.cross_scoring, bool):
            fail("LagKV", "cross_scoring", self.cross_scoring, "True or False")

    def score(self, q, k, valid, scale, v):
        return by_real_tokens(lambda k, v: lag_relative(k, v, self.sinks, self.lag, self.cross_scoring), k, v, valid)


@preset
@dataclasses.dataclass(frozen=True)
class CUR(Policy):
    """CUR (Sengupta et al., 2025, "Value-Guided KV Compression for LLMs via
    Approximated CUR Decomposition", CurDKV): keep the tokens with the
    highest leverage, approximated by their squared key and value norms
    normalised within ``local_window``-token windows (0: over the whole
    prompt), combined as ``leverage`` ("key", "value", "kv_avg" or
    "kv_product"), plus the first ``sinks`` tokens."""

    budget: Budget = 0.5
    sinks: int = 4
    leverage: str = "kv_product"
    local_window: int = 16

    needs_queries: ClassVar[bool] = False
    needs_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.leverage not in LEVERAGES:
            fail("CUR", "leverage", self.leverage, "one of " + ", ".join(repr(x) for x in LEVERAGES))
        check_int("CUR", "local_window", self.local_window, 0)

    def score(self, q, k, valid, scale, v):
        return by_real_tokens(lambda k, v: leverage(k, v, self.sinks, self.leverage, self.local_window), k, v, valid)
