"""The four seed methods: merge (KVMerger), chunk keep (ChunkKV),
compensation token (RazorAttention), residual merge (ZeroMerge).

Algorithms, defaults and sources: DESIGN.md §5. Each preset is its paper's
hyperparameters, a score, and its choice of keep and fold rules.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, budget_tokens, check_int, fail, named_rule, smax
from kvfx.policies.fold import Compensate, GaussianMerge, ResidualMerge
from kvfx.policies.keep import TopChunks
from kvfx.policies.registry import preset
from kvfx.policies.scores import attention_sums, recency, window_mean_attention


def _check_scorer(name: str, scorer) -> None:
    if scorer is not None and not isinstance(scorer, Policy):
        fail(name, "scorer", scorer, "a kvfx policy whose score ranks the tokens (e.g. kvfx.SnapKV()), or None")
    if scorer is not None and scorer.reconstructs:
        fail(name, "scorer", scorer, "a policy that scores the prompt in its own prefill (KVzip scores a second, "
             "reconstruction prefill)")


class _ScorerGuided:
    """What a policy with a ``scorer`` field (any policy, or None for its
    paper's own score) takes from it: its score and the inputs it reads."""

    scorer: Optional[Policy]

    @property
    def needs_values(self) -> bool:
        return self.scorer is not None and self.scorer.needs_values

    @property
    def needs_out_projection(self) -> bool:
        return self.scorer is not None and self.scorer.needs_out_projection

    @property
    def needs_rotary(self) -> bool:
        return self.scorer is not None and self.scorer.needs_rotary

    def _score(self, q, k, valid, scale, v=None, layer=0, n_layers=1):
        if self.scorer is not None:
            return self.scorer._score(q, k, valid, scale, v, layer, n_layers)
        return super()._score(q, k, valid, scale, v, layer, n_layers)

    @property
    def base_scorer(self):
        return self if self.scorer is None else self.scorer.base_scorer

    @property
    def accumulates_attention(self) -> bool:
        return self.scorer is not None and self.scorer.accumulates_attention

    def corrected_score(self, base, valid, v, keep):
        return base if self.scorer is None else self.scorer.corrected_score(base, valid, v, keep)


@preset
@dataclasses.dataclass(frozen=True)
class KVMerger(_ScorerGuided, Policy):
    """KVMerger (Wang et al., 2024, "Model Tells You Where to Merge: Adaptive
    KV Cache Merging for LLMs on Long-Context Tasks").

    Score = accumulated attention (column sums of the prompt's causal
    attention). Fold = ``GaussianMerge``: the most recent ``recent`` and the
    ``protect_top`` most-attended fractions of the prompt are protected;
    consecutive tokens whose adjacent keys have cosine similarity above
    ``epsilon`` merge into one slot around their most-attended pivot with
    Gaussian-kernel weights ``exp(-|k_p - k_i|^2 / 2 sigma^2)``; the strongest
    similarities merge first so the budget is met exactly, and when the sets
    cannot reach it the least-attended slots are evicted. ``count_bias`` adds
    log(set size) to a merged slot's logit (off = the paper). Layers in
    ``exempt_layers`` keep everything (the paper leaves the first two and the
    last layer unmerged; negative indices count from the model's last layer).
    ``sum_queries``: 0 (default) sums the attention of every prompt query, as
    the paper does; n >= 1 sums only the last n queries' attention (the
    window approximation: prefill cost grows with n, not the prompt, and the
    kept set changes: docs/policies.md gives its measured quality cost).
    ``scorer``: another policy whose score picks the protected set and the
    pivots instead of the accumulated attention (e.g. ``kvfx.SnapKV()``'s
    observation window); None (default) = the paper's.
    """

    budget: Budget = 0.5
    epsilon: float = 0.75
    sigma: float = 5.0
    recent: float = 0.17
    protect_top: float = 0.12
    count_bias: bool = False
    exempt_layers: tuple = (0, 1, -1)
    sum_queries: int = 0
    scorer: Optional[Policy] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("KVMerger", "sum_queries", self.sum_queries, 0)
        self.fold()  # validates epsilon, sigma, recent, protect_top under their names
        if not isinstance(self.exempt_layers, tuple) or not all(isinstance(i, int) for i in self.exempt_layers):
            fail("KVMerger", "exempt_layers", self.exempt_layers, "a tuple of layer indices (negative counts from the end)")
        _check_scorer("KVMerger", self.scorer)

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.scorer is None or self.scorer.needs_queries

    @property
    def sums_attention(self) -> bool:  # type: ignore[override]
        return self.scorer.sums_attention if self.scorer is not None else True

    def sum_terms(self) -> tuple:
        return self.scorer.sum_terms() if self.scorer is not None else (1.0, self.sum_queries)

    def score(self, q, k, valid, scale):
        return attention_sums(q, k, valid, scale, *self.sum_terms())

    def fold(self) -> GaussianMerge:
        return named_rule(GaussianMerge, "KVMerger", epsilon=self.epsilon, sigma=self.sigma, recent=self.recent,
                      protect_top=self.protect_top, count_bias=self.count_bias)

    def layer_budget(self, layer: int, n_layers: int) -> Budget:
        exempt = {i % n_layers for i in self.exempt_layers} if n_layers > 0 else set()
        return 1.0 if layer in exempt else self.budget


@preset
@dataclasses.dataclass(frozen=True)
class ChunkKV(_ScorerGuided, Policy):
    """ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache
    Compression for Efficient Long-Context LLM Inference").

    Keep = ``TopChunks``: token scores summed over all heads, chunk score =
    mean over its ``chunk`` tokens; the top chunks fill the budget, whole
    chunks only, the same indices for every head, in original order; the
    observation window (and the partial chunk before it) is always kept.
    Token scores are the attention of the last ``window`` queries, or any
    policy's ``scorer`` score (as kvpress's ``ChunkKVPress(press=...)``).
    ``reuse_every=N``: layers ``l`` with ``l % N != 0`` reuse the indices of
    layer ``l - l % N`` (plain dataflow in the graph; a layer whose source sits
    in another graph computes its own and says so).
    """

    budget: Budget = 0.5
    window: int = 32
    chunk: int = 10
    reuse_every: int = 1
    scorer: Optional[Policy] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("ChunkKV", "chunk", self.chunk, 1)
        check_int("ChunkKV", "reuse_every", self.reuse_every, 1)
        _check_scorer("ChunkKV", self.scorer)

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.scorer is None or self.scorer.needs_queries

    @property
    def sums_attention(self) -> bool:  # type: ignore[override]
        return self.scorer is not None and self.scorer.sums_attention

    def sum_terms(self) -> tuple:
        return self.scorer.sum_terms() if self.scorer is not None else super().sum_terms()

    def score(self, q, k, valid, scale):
        return window_mean_attention(q, k, valid, scale, self.window, 1)

    @property
    def observed_window(self) -> Optional[tuple[int, int]]:  # type: ignore[override]
        return (self.window, 1) if self.scorer is None else self.scorer.observed_window

    def keep(self) -> TopChunks:
        return TopChunks(self.chunk)

    def reuse_source(self, layer: int) -> Optional[int]:
        return layer - layer % self.reuse_every if layer % self.reuse_every else None


@preset
@dataclasses.dataclass(frozen=True)
class RazorAttention(Policy):
    """RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache
    Compression Through Retrieval Heads").

    Retrieval heads (``retrieval_heads``: (layer, KV head) pairs) keep every
    token. None (the default): kvfx finds them when it compiles the model,
    probing it once (``kvfx.find_retrieval_heads``) and caching the map per
    model in ``kvfx.heads.cache_dir()``; ``()``: no retrieval heads, said
    explicitly. Every other head keeps
    ``sinks`` + a recent window of ``max(window, budget * S)`` tokens + one
    compensation token (fold = ``Compensate``): the mean of the dropped keys
    and values, whose logit gets ``+ln|D|`` (``compensation_bias``; the
    deployment code omits it).

    A rectangular cache costs its longest head: a layer with any retrieval
    head holds S slots (the others padded with invalid slots), so only layers
    without retrieval heads free memory (``kvfx.explain`` shows the bytes).
    """

    budget: Budget = 0.2
    sinks: int = 4
    window: int = 256
    retrieval_heads: Optional[tuple] = None
    compensation_bias: bool = True

    needs_queries: ClassVar[bool] = False
    window_within_budget: ClassVar[bool] = False  # budget sizes the recent window: max(window, budget * S)

    def __post_init__(self) -> None:
        super().__post_init__()
        heads = self.retrieval_heads
        if heads is not None and not (isinstance(heads, tuple) and all(
                isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p) for p in heads)):
            fail("RazorAttention", "retrieval_heads", heads,
                 "a tuple of (layer, kv_head) pairs of ints >= 0, () for none, or None to find them")

    def score(self, q, k, valid, scale):
        return recency(k)

    def fold(self) -> Compensate:
        return Compensate(log_count=self.compensation_bias)

    def layer_tokens(self, length, layer: int, n_layers: int):
        # sinks + the recent window + the compensation slot
        return self.sinks + smax(self.window, budget_tokens(self.budget, length)) + 1

    def full_heads(self, layer: int) -> tuple[int, ...]:
        if self.retrieval_heads is None:
            raise ValueError("RazorAttention: retrieval_heads=None means \"find them\", which kvfx does when it "
                             "compiles a model (kvfx.compile(model, policy), or kvfx.backend(policy, model=model)); "
                             "this policy reached compression without them: pass retrieval_heads=..., or () for none")
        return tuple(sorted(h for l, h in self.retrieval_heads if l == layer))


@preset
@dataclasses.dataclass(frozen=True)
class ZeroMerge(_ScorerGuided, Policy):
    """ZeroMerge (Liu et al., 2025, "ZeroMerge: Parameter-Free KV Cache
    Compression for Memory-Efficient Long-Context LLMs").

    A fixed budget per KV head laid out as [``residual`` | top | ``window``
    (tail)]. Score = attention accumulated with ``decay``. Fold =
    ``ResidualMerge``: prefill keeps the tail and the top-scored tokens and
    averages the rest into the residual slots (count = tokens merged); every
    decode step once full, the oldest tail token graduates, the lowest-scored
    top entry merges into the most similar residual slot (count-weighted
    average, counts add, score = max), the new token enters the tail.
    Attention adds ln(count) to each slot's logit. The cache size stays
    constant while decoding. ``sum_queries``: 0 (default) sums the attention
    of every prompt query, as the paper does; n >= 1 sums only the last n
    queries' attention (the window approximation: prefill cost grows with n,
    not the prompt, and the kept set changes: docs/policies.md gives its
    measured quality cost). ``scorer``: another policy whose score ranks the
    prompt's tokens into the top slots instead of the decayed accumulated
    attention (e.g. ``kvfx.SnapKV()``); each decode step still adds the new
    query's attention to the running scores (decayed), as in the paper, so an
    attention-valued scorer (SnapKV, PyramidKV, TOVA, H2O) keeps the two on
    one scale. None (default) = the paper's.
    """

    budget: Budget = 0.05
    residual: int = 2
    window: int = 8
    decay: float = 0.98
    sum_queries: int = 0
    scorer: Optional[Policy] = None

    schedule: ClassVar[str] = "continuous"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("ZeroMerge", "residual", self.residual, 1)
        check_int("ZeroMerge", "sum_queries", self.sum_queries, 0)
        _check_scorer("ZeroMerge", self.scorer)
        if not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            fail("ZeroMerge", "decay", self.decay, "a number in (0, 1]")
        if isinstance(self.budget, int) and self.budget < self.residual + self.window + 1:
            raise ValueError(f"ZeroMerge: budget={self.budget} leaves no top slot; it must be >= residual + "
                             f"window + 1 = {self.residual + self.window + 1}")

    @property
    def sums_attention(self) -> bool:  # type: ignore[override]
        return self.scorer.sums_attention if self.scorer is not None else True

    def sum_terms(self) -> tuple:
        return self.scorer.sum_terms() if self.scorer is not None else (float(self.decay), self.sum_queries)

    def score(self, q, k, valid, scale):
        return attention_sums(q, k, valid, scale, *self.sum_terms())

    def fold(self) -> ResidualMerge:
        return ResidualMerge(self.residual)

    def running_score(self, attention, slot_score):
        # s <- decay * s + a: the prefill score, continued one query at a time.
        return self.decay * slot_score + attention
