"""Compression policies: frozen dataclasses holding a paper's hyperparameters.

A policy is built from the primitives of DESIGN.md §3:
  * score    -- how much each cache slot is worth keeping (``Policy.score``);
  * keep     -- sinks + observation window always, then the best-scored slots,
                padding last (``Policy.select``, shared by every preset);
  * fold     -- what happens to the rest (eviction here; merging and
                compensation tokens slot in through ``Policy.fold``);
  * schedule -- when compression runs (``Policy.schedule``: once after prefill);
  * plan     -- the budget of each layer (``Policy.layer_budget``).

The machinery that applies a policy (custom ops, FX rewrite, runtime) lives
elsewhere; a preset only says *what* to keep.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from fractions import Fraction
from typing import ClassVar, Optional

import sympy
import torch

from kvfx.kernels import scores as score_kernels
from kvfx.kernels.column_sums import column_sums
from kvfx.kernels.gather import gather_slots

Budget = float | int


def _fail(policy: str, field: str, value, allowed: str) -> None:
    raise ValueError(f"{policy}.{field}={value!r} is invalid: {field} must be {allowed}")


def _check_int(policy: str, field: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(policy, field, value, f"an int >= {lo}")


def check_budget(policy: str, budget) -> None:
    """A budget is a fraction of the prompt in (0, 1] or a token count >= 1."""
    allowed = "a fraction of the prompt in (0, 1] (float) or a token count >= 1 (int)"
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        _fail(policy, "budget", budget, allowed)
    if isinstance(budget, float) and not (0.0 < budget <= 1.0 and math.isfinite(budget)):
        _fail(policy, "budget", budget, allowed)
    if isinstance(budget, int) and budget < 1:
        _fail(policy, "budget", budget, allowed)


def smin(a, b):
    """min() that stays guard-free on SymInts and symbolic on sympy
    expressions (``kvfx.explain``'s memory formulas)."""
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return torch.sym_min(a, b)


def smax(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return torch.sym_max(a, b)


def budget_tokens(budget: Budget, length):
    """Tokens a budget allows for a prompt of ``length`` (int or SymInt).

    Integer ceil keeps the arithmetic guard-free on a symbolic length: a float
    product or Python ``math.ceil`` would specialise and recompile.
    """
    if isinstance(budget, int):
        return budget
    frac = Fraction(budget).limit_denominator(10_000)
    return (frac.numerator * length + frac.denominator - 1) // frac.denominator


@dataclasses.dataclass
class Compressed:
    """What a policy leaves of one layer's cache: [B, Hkv, n, D] keys/values,
    and per slot its bias (0, -inf for invalid, log(count) for a slot standing
    for several tokens), its running score, and the position it came from."""

    k: torch.Tensor
    v: torch.Tensor
    slot_bias: torch.Tensor    # [B, Hkv, n] float32
    slot_score: torch.Tensor   # [B, Hkv, n] float32
    index: torch.Tensor        # [B, Hkv, n] int64


def bias_of(valid: torch.Tensor) -> torch.Tensor:
    """Slot bias of plain slots: 0 where valid, -inf where padding."""
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))


def evict_to(index: torch.Tensor, k, v, valid, score=None, slot_valid=None) -> Compressed:
    """Keep the slots ``index`` names (fold = evict): gather K, V; padding
    that had to be kept, and slots ``slot_valid`` ([B, Hkv, n]) rules out,
    get -inf."""
    kept_valid = valid[:, None, :].expand(-1, k.shape[1], -1).gather(2, index)
    if slot_valid is not None:
        kept_valid = kept_valid & slot_valid
    bias = bias_of(kept_valid)
    kept_score = torch.zeros_like(bias) if score is None else score.float().gather(2, index)
    return Compressed(gather_slots(k, index), gather_slots(v, index), bias, kept_score, index)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base of every preset. Subclasses override ``score`` (and may override
    ``layer_budget``, ``compress`` or ``step``); everything else is shared."""

    budget: Budget = 0.5
    sinks: int = 0
    window: int = 0

    #: when compression runs: "prefill" = once, right after the prompt is
    #: cached; "continuous" = also at every decode step (``step``).
    schedule: ClassVar[str] = "prefill"
    #: what happens to slots not kept: "evict" frees them; "merge" and
    #: "compensate" fold them into weighted slots.
    fold: ClassVar[str] = "evict"
    #: whether ``score`` reads the queries (SnapKV) or only the keys.
    needs_queries: ClassVar[bool] = False
    #: whether sinks + window must fit in a token budget (not for a policy
    #: whose budget sizes only part of what it keeps, like RazorAttention).
    window_within_budget: ClassVar[bool] = True
    #: whether a left-padded row compresses as it would alone (else kvfx.compile refuses padded batches).
    supports_padding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_budget(name, self.budget)
        _check_int(name, "sinks", self.sinks, 0)
        _check_int(name, "window", self.window, 0)
        if self.window_within_budget and isinstance(self.budget, int) and self.sinks + self.window > self.budget:
            raise ValueError(
                f"{name}: sinks + window = {self.sinks + self.window} exceeds budget={self.budget}; "
                f"the always-kept tokens must fit in the budget (make budget >= {self.sinks + self.window} "
                "or shrink sinks/window)"
            )

    # -- plan ---------------------------------------------------------------
    def layer_budget(self, layer: int, n_layers: int) -> Budget:
        """Budget of one layer; uniform unless a preset plans otherwise."""
        return self.budget

    def kept_length(self, length, layer: int = 0, n_layers: int = 1):
        """Slots a layer keeps out of ``length``: the budget, never fewer than
        the always-kept tokens, never more than the prompt (guard-free)."""
        n = budget_tokens(self.layer_budget(layer, n_layers), length)
        n = smax(n, self.sinks + self.window)
        return smin(n, length)

    def reuse_source(self, layer: int) -> Optional[int]:
        """Layer whose kept indices this layer reuses (ChunkKV); None = its own."""
        return None

    # -- score --------------------------------------------------------------
    def score(self, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        """Worth of each slot, higher = keep. q: [B, H, Sq, D], k: [B, Hkv, S, D],
        valid: [B, S] bool. Returns [B, Hkv, S] float32."""
        raise NotImplementedError

    # -- keep ---------------------------------------------------------------
    def select(self, q, k, valid, scale, layer: int = 0, n_layers: int = 1, score=None) -> torch.Tensor:
        """Indices of the slots kept, [B, Hkv, n], ascending (original order)."""
        return self._select_ranked(q, k, valid, scale, layer, n_layers, score)[0]

    def _select_ranked(self, q, k, valid, scale, layer, n_layers, score=None):
        """Kept indices and each one's rank (0 = best)."""
        n = self.kept_length(k.shape[-2], layer, n_layers)
        key = (self.score(q, k, valid, scale) if score is None else score).float()
        key = score_kernels.protect(key, valid, self.sinks, self.window)
        return top_sorted(key, n, ranked=True)

    def row_limits(self, valid: torch.Tensor, layer: int = 0, n_layers: int = 1) -> torch.Tensor:
        """Real slots each row keeps, [B]: the budget of its own real tokens. The
        cache is rectangular (``kept_length`` of the padded length), so a padded
        row fills the rest with invalid slots and decodes as it would alone."""
        real = valid.sum(-1)
        n = budget_tokens(self.layer_budget(layer, n_layers), real)
        n = torch.clamp(torch.as_tensor(n, device=valid.device), min=self.sinks + self.window)
        return torch.minimum(n, real)

    # -- fold ---------------------------------------------------------------
    def compress(self, q, k, v, valid, scale, layer: int = 0, n_layers: int = 1, reuse_index=None) -> Compressed:
        """Compress one layer's prompt cache (fold = evict by default)."""
        if reuse_index is not None:
            return evict_to(reuse_index, k, v, valid)
        index, rank = self._select_ranked(q, k, valid, scale, layer, n_layers)
        return evict_to(index, k, v, valid, slot_valid=rank < self.row_limits(valid, layer, n_layers)[:, None, None])

    # -- schedule: continuous policies only ---------------------------------
    def decode_length(self, total, new):
        """Slots kept after a decode step that brought ``total`` slots
        (``new`` of them new): grow until the token budget, then stay."""
        cap = self.budget if isinstance(self.budget, int) else 0
        if isinstance(total, torch.Tensor):  # per row: a padded row's count of its real slots
            return torch.minimum(total, torch.clamp(total - new, min=cap))
        return smin(total, smax(total - new, cap))

    def step(self, q, k, v, slot_bias, slot_score, scale, layer: int = 0, n_layers: int = 1):
        """One decode step of a continuous policy: returns (k, v, slot_bias, slot_score)."""
        raise NotImplementedError

    def spec(self) -> str:
        """Text that ``parse_policy`` turns back into this policy (custom-op argument)."""
        return repr(self)


def top_sorted(key: torch.Tensor, n, ranked: bool = False):
    """The ``n`` best slots per row of key [..., S], in original order.
    A stable descending sort breaks ties by position, so the reference, the
    compiled graph and any kernel agree on which slots survive.
    ``ranked``: also return each kept slot's rank (0 = best)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    index, rank = order.sort(dim=-1)
    return (index, rank) if ranked else index


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models
    with Attention Sinks"): keep the first ``sinks`` tokens and the most recent
    ones up to the budget."""

    budget: Budget = 0.5
    sinks: int = 4

    def score(self, q, k, valid, scale):
        return score_kernels.recency(k)


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for
    Before Generation"): score each slot by the attention the last ``window``
    queries pay it, average-pooled over ``kernel`` neighbours, averaged over a
    GQA group; keep the observation window and the top slots per KV head."""

    budget: Budget = 0.5
    window: int = 32
    kernel: int = 5

    needs_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            _fail(type(self).__name__, "kernel", self.kernel, "an odd int >= 1")
        if self.window < 1:
            _fail(type(self).__name__, "window", self.window, "an int >= 1 (the observation window)")

    def score(self, q, k, valid, scale):
        return score_kernels.window_attention(q, k, valid, scale, self.window, self.kernel)


@dataclasses.dataclass(frozen=True)
class KNorm(Policy):
    """Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2
    Norm-Based Strategy for KV Cache Compression"): keys with a low L2 norm
    draw the most attention, so keep the lowest-norm keys."""

    budget: Budget = 0.5

    def score(self, q, k, valid, scale):
        return -k.float().norm(dim=-1)


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models"): keep the tokens that
    received the most attention over the whole prompt (column sums of the
    causal attention) plus the ``window`` most recent ones."""

    budget: Budget = 0.5
    window: int = 32

    needs_queries: ClassVar[bool] = True

    def score(self, q, k, valid, scale):
        return column_sums(q, k, valid, scale)


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the
    slots the current query attends to most; at every decode step over budget,
    evict the slot with the lowest attention (averaged over a GQA group)."""

    budget: Budget = 0.5

    schedule: ClassVar[str] = "continuous"
    needs_queries: ClassVar[bool] = True

    def score(self, q, k, valid, scale):
        return score_kernels.window_attention(q, k, valid, scale, 1, 1)

    def step(self, q, k, v, slot_bias, slot_score, scale, layer=0, n_layers=1):
        new = q.shape[-2]
        n = self.decode_length(k.shape[-2], new)
        invalid = slot_bias == float("-inf")
        attention = score_kernels.query_attention(q, k, slot_bias, scale)  # [B, Hkv, S]
        index, rank = top_sorted(attention.masked_fill(invalid, float("-inf")), n, ranked=True)
        # Each row applies the rule to its own real slots, so a padded row
        # evicts a real slot, not one of its invalid fillers, as it would alone.
        real = (~invalid).sum(-1, keepdim=True)
        bias = slot_bias.gather(2, index).masked_fill(rank >= self.decode_length(real, new), float("-inf"))
        return gather_slots(k, index), gather_slots(v, index), bias, slot_score.gather(2, index)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression
    based on Pyramidal Information Funneling"): SnapKV with budgets that
    decrease linearly from the first layer to the last; the mean is
    ``budget``, the last layer gets ``budget / beta``."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            _fail(type(self).__name__, "beta", self.beta, "a number >= 1")

    def layer_budget(self, layer: int, n_layers: int) -> Budget:
        low = self.budget / self.beta
        high = 2 * self.budget - low
        at = high - (high - low) * layer / max(n_layers - 1, 1)
        if isinstance(self.budget, int):
            return max(1, round(at))
        return min(1.0, max(at, 1e-4))


PRESETS: dict[str, type[Policy]] = {}


def preset(cls: type[Policy]) -> type[Policy]:
    """Register a preset so ``parse_policy`` and the command line know it."""
    PRESETS[cls.__name__] = cls
    return cls


for _cls in (StreamingLLM, SnapKV, KNorm, H2O, TOVA, PyramidKV):
    preset(_cls)


def parse_policy(text: str) -> Policy:
    """Parse ``"SnapKV(budget=0.25, window=16)"`` without eval: only a preset
    name called with literal arguments is accepted."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"policy {text!r} is not of the form Preset(name=value, ...): {err.msg}") from None
    if isinstance(tree, ast.Name):
        tree = ast.Call(func=tree, args=[], keywords=[])
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
        raise ValueError(f"policy {text!r} is not of the form Preset(name=value, ...)")
    name = tree.func.id
    if name not in PRESETS:
        raise ValueError(f"policy {name!r} is unknown; presets are: {', '.join(sorted(PRESETS))}")
    try:
        args = [ast.literal_eval(a) for a in tree.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}
    except ValueError:
        raise ValueError(f"policy {text!r}: arguments must be literals (numbers, strings)") from None
    if None in kwargs:
        raise ValueError(f"policy {text!r}: **kwargs are not allowed")
    try:
        return PRESETS[name](*args, **kwargs)
    except TypeError as err:
        fields = ", ".join(f.name for f in dataclasses.fields(PRESETS[name]))
        raise ValueError(f"policy {text!r}: {err}; {name} takes: {fields}") from None


_BY_SPEC: dict[str, Policy] = {}


def policy_from_spec(spec: str) -> Policy:
    """The policy a custom op was given (cached: ops run every decode step)."""
    policy = _BY_SPEC.get(spec)
    if policy is None:
        policy = _BY_SPEC[spec] = parse_policy(spec)
    return policy
