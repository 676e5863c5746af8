"""KVzip: query-agnostic eviction scored by how much each cached token is
attended to while the model reconstructs its context (kvpress's ``KVzipPress``).

The prompt is fed once more, after an instruction to repeat it: ``[context,
repeat instruction, context]`` in one prefill (``kvfx.integrations.reconstruct``
builds that call). At each layer the score of a context slot is the largest
attention any query of the second half pays it; then every layer's slots
are ranked together (or each layer's apart, ``layerwise``) and the best
``budget`` of them kept, so layers and heads keep different counts. The
second half's keys are dropped."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F

from kvfx.policies.base import Policy
from kvfx.policies.budgets import as_fraction, cdiv, ceil_linear, check_int, fail
from kvfx.policies.fold import identity
from kvfx.policies.keep import Keep, TopTokensAcrossHeads
from kvfx.policies.registry import shipped
from kvfx.policies.scores import lent_lse

# What the prompt's compression of each layer scored, while a reconstruction call runs.
_collected: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("kvfx_kvzip_scores", default=None)
QUERY_CHUNK = 512   # reconstruction queries scored at a time: bounds the [chunk, L] attention held


@contextlib.contextmanager
def collecting() -> Iterator[dict]:
    """Collect ``{layer: score [B, Hkv, S]}`` from every KVzip compression in the block."""
    scores: dict = {}
    token = _collected.set(scores)
    try:
        yield scores
    finally:
        _collected.reset(token)


def reconstruction_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float,
                          context: int, unseen: Optional[torch.Tensor] = None,
                          lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, Hkv, context] float32: for each of the first ``context`` slots, the
    largest causal attention (softmax over every real key up to the query)
    that a real query at a position >= ``context`` pays it, the max also
    over the query heads of each KV head. q: [B, H, L, D], k: [B, Hkv, L, D],
    valid: [B, L]. ``unseen`` [B, context]: slots left out of the softmax
    (kvpress's reconstruction attends to the chat header's first sinks
    only); they score 0. ``lse`` [B, H, L]: each query's causal log-sum-exp,
    when the prompt's attention lent it. Padding slots score -inf."""
    b, h, length, d = q.shape
    kv_heads = k.shape[1]
    if bool(valid.all()):
        return _unpadded_scores(q, k, scale, context, lse, unseen)
    keys_valid = valid if unseen is None else valid & ~F.pad(unseen, (0, length - context))
    keys = k.float().repeat_interleave(h // kv_heads, dim=1)
    best = torch.full((b, h, context), float("-inf"), device=q.device)
    position = torch.arange(length, device=q.device)
    for start in range(context, length, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, length)
        logits = q[:, :, start:end].float() @ keys.transpose(-1, -2) * scale               # [B, H, c, L]
        seen = (position[None, :] <= position[start:end, None])[None] & keys_valid[:, None, :]  # [B, c, L]
        logits = logits.masked_fill(~seen[:, None], float("-inf"))
        weights = logits.softmax(-1)[..., :context]
        weights = weights.masked_fill(~valid[:, None, start:end, None], float("-inf"))     # padding queries
        best = torch.maximum(best, weights.amax(dim=2))
    best = best.view(b, kv_heads, h // kv_heads, context).amax(dim=2)
    if unseen is not None:
        best = best.masked_fill(unseen[:, None], 0.0)
    return best.masked_fill(~valid[:, None, :context], float("-inf"))


def _unpadded_scores(q: torch.Tensor, k: torch.Tensor, scale: float, context: int,
                     lse: Optional[torch.Tensor] = None, unseen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``reconstruction_scores`` of rows with no padding: each query's
    log-sum-exp from the fused causal attention kernel, then only the
    context's columns, whose log-probability q.k - lse is one matmul of
    [q·scale, -lse] by [k, 1] (every reconstruction query sees the whole
    context): half the q.k of the full rows, and no softmax over them.
    ``unseen`` slots (a chat header's) leave the softmax: each query's
    normaliser loses their mass, log(1 - sum exp(q.k - lse)) over them."""
    b, h, length, d = q.shape
    kv_heads, group = k.shape[1], h // k.shape[1]
    if lse is None:
        lse = causal_lse(q, k.repeat_interleave(group, dim=1), scale)
    lse = lse[:, :, context:].float()                                                      # [B, H, L - S]
    context_keys = F.pad(k[:, :, :context].float(), (0, 1), value=1.0).transpose(-1, -2)   # [B, Hkv, D + 1, S]
    best = torch.full((b, kv_heads, context), float("-inf"), device=q.device)
    if unseen is not None:
        if not bool(unseen.any()):
            unseen = None
        else:  # the header's columns, a few: the last unseen slot bounds them (read once per layer)
            width = int(unseen.any(0).nonzero().max()) + 1
    for start in range(context, length, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, length)
        shifted = torch.cat([q[:, :, start:end].float() * scale, -lse[:, :, start - context:end - context, None]], -1)
        logp = shifted.view(b, kv_heads, group * (end - start), d + 1) @ context_keys         # a KV head's queries
        if unseen is not None:
            hidden = unseen[:, None, None, :width]
            mass = logp[..., :width].masked_fill(~hidden, float("-inf")).logsumexp(-1, keepdim=True)
            logp = logp - torch.log(torch.clamp(-torch.expm1(mass), min=1e-30))
        best = torch.maximum(best, logp.amax(dim=2))
    best = best.exp()
    return best if unseen is None else best.masked_fill(unseen[:, None], 0.0)


def causal_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, L] float32: each query's log-sum-exp over the keys up to it (k has q's heads)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, True, scale=scale)[1].float()
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True, False, scale=scale)[1].float()
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, float("-inf")).logsumexp(-1)


@shipped
@dataclasses.dataclass(frozen=True)
class KVzip(Policy):
    """KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression
    with Context Reconstruction"): the prompt is fed again after the
    ``repeat`` instruction's token ids, in the same prefill, and each context
    slot scores the largest attention a query of that reconstruction pays it
    (max over queries and the query heads of its KV head). The first
    ``sinks`` real tokens always stay. ``prefix``: leading tokens of every
    prompt that are a chat template's header: they are not repeated, and the
    reconstruction's attention is normalised over the first ``min(sinks,
    prefix)`` of them only, the rest scoring 0 (kvpress's handling). Every
    layer's slots of a batch row are then ranked together and the best
    ``budget`` of them (a fraction of the row's slots, or a mean per KV
    head) kept -- ``layerwise=True``: each
    layer's best ``budget`` of its own -- so each layer and KV head keeps its
    own count (the slot store holds exactly that). The second prompt's keys
    are dropped. It costs a prefill of 2S + len(repeat) - prefix tokens
    for an S-token prompt.

    Build it for a tokenizer with ``KVzip.for_tokenizer(tokenizer, budget=...)``
    (kvpress's instruction and chat-template suffix). It runs under
    ``kvfx.compile`` on transformers models, whose forward kvfx calls."""

    budget: float | int = 0.5
    sinks: int = 4
    repeat: tuple[int, ...] = ()
    prefix: int = 0
    layerwise: bool = False

    #: the prompt is fed twice (``kvfx.integrations.reconstruct``)
    reconstructs: ClassVar[bool] = True
    #: the prompt's attention lends each query's log-sum-exp to the score
    needs_lse: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.repeat, tuple) or not self.repeat or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.repeat):
            fail("KVzip", "repeat", self.repeat, "a non-empty tuple of token ids (ints >= 0): the instruction "
                 "between the context and its repetition; KVzip.for_tokenizer(tokenizer) builds kvpress's")
        check_int("KVzip", "prefix", self.prefix, 0)
        if not isinstance(self.layerwise, bool):
            fail("KVzip", "layerwise", self.layerwise, "True or False")
        if self.window:
            fail("KVzip", "window", self.window, "0 (KVzip keeps no recent window)")

    @classmethod
    def for_tokenizer(cls, tokenizer, chat: Optional[bool] = None, **fields) -> "KVzip":
        """KVzip as kvpress builds it for ``tokenizer``: the instruction
        "\\n\\nRepeat the previous context exactly.", then for chat prompts the
        end of a user turn and the start of the assistant's, else "\\n";
        ``prefix`` is the chat template's header. ``chat``: whether prompts are
        rendered with the chat template (default: the tokenizer has one)."""
        chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
        suffix, prefix = "\n", ""
        if chat:
            dummy, separator = "dummy context", "\n" + "#" * len("dummy context")
            text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                                 add_generation_prompt=True, tokenize=False, enable_thinking=False)
            head, suffix = text.split(separator)
            prefix = head.split(dummy)[0]
        ids = tokenizer.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
        ids += tokenizer.encode(suffix, add_special_tokens=False)
        fields.setdefault("prefix", len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0)
        return cls(repeat=tuple(int(t) for t in ids), **fields)

    def keep(self) -> Keep:
        # Heads (and layers) share one budget: rows hold their own counts, so
        # decode attention reads the store as ragged rows.
        return TopTokensAcrossHeads(safeguard=0.0)

    # -- the prefill of [context, repeat, context] ------------------------------
    def context_length(self, length):
        """Context tokens of a reconstruction prefill of ``length`` = 2S + len(repeat) - prefix tokens."""
        return (length - len(self.repeat) + self.prefix) // 2

    def budget_length(self, length, layer: int = 0, n_layers: int = 1):
        # The prefill keeps every context slot; the allocation across layers follows the call.
        return self.context_length(length)

    def kept_length(self, length, layer: int = 0, n_layers: int = 1):
        return self.context_length(length)

    def head_slots(self, length, layer: int, n_layers: int, kv_heads: int) -> list:
        return [self.context_length(length)] * kv_heads

    def store_pages(self, length, layer: int, n_layers: int, kv_heads: int, page: int):
        per_head = cdiv(self.context_length(length), page)
        return kv_heads * per_head, per_head

    def compress(self, q, k, v, valid, scale, layer: int = 0, n_layers: int = 1, reuse_index=None,
                 score_keys=None):
        scores = _collected.get()
        if scores is None:
            raise RuntimeError("kvfx: KVzip's prefill ran outside a reconstruction call: its prompt must be fed "
                               "twice by kvfx.compile's transformers forward (or kvfx.testing.reference)")
        context = self.context_length(k.shape[2])
        scores[layer] = reconstruction_scores(q, k, valid, scale, context, self.header(valid[:, :context]),
                                              lent_lse(q))
        valid = valid[:, :context]
        return self.cut_channels(q, valid, identity(k[:, :, :context], v[:, :, :context], valid))

    def header(self, valid: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, S]: the chat header's tokens past its first ``sinks``, which the
        reconstruction's attention leaves out (None: no header)."""
        if not self.prefix:
            return None
        rank = valid.long().cumsum(-1)
        return valid & (rank > min(self.sinks, self.prefix)) & (rank <= self.prefix)

    # -- after the call: which slots each layer keeps ------------------------------
    def kept_slots(self, scores: dict, valid: torch.Tensor) -> dict:
        """{layer: [B, Hkv, S] bool}: the slots each layer's heads keep, from
        every layer's reconstruction ``scores`` {layer: [B, Hkv, S]} and the
        context's real tokens ``valid`` [B, S]. Ties go to the earlier layer,
        head, then position."""
        layers = sorted(scores)
        real = valid.long().cumsum(-1)
        sink = valid & (real <= self.sinks)
        ranked = {l: scores[l].float().masked_fill(sink[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
                  for l in layers}
        groups = [[l] for l in layers] if self.layerwise else [layers]
        kept = {}
        for group in groups:
            key = torch.cat([ranked[l] for l in group], dim=1)                 # [B, len(group) x Hkv, S]
            b, rows, s = key.shape
            slots = valid.sum(-1) * rows                                       # [B] real slots of the group
            if isinstance(self.budget, int):
                keep = torch.clamp(slots, max=self.budget * rows)
            else:
                keep = ceil_linear(as_fraction(self.budget), slots)
            order = torch.sort(key.reshape(b, rows * s), dim=-1, descending=True, stable=True).indices
            chosen = torch.zeros(b, rows * s, dtype=torch.bool, device=key.device)
            chosen.scatter_(1, order, torch.arange(rows * s, device=key.device).expand(b, -1) < keep[:, None])
            chosen = chosen.view(b, rows, s) & valid[:, None]
            for i, l in enumerate(group):
                h = scores[l].shape[1]
                kept[l] = chosen[:, i * h:(i + 1) * h]
        return kept
