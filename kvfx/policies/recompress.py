"""Recompress: any one-shot policy applied again while decoding (kvpress's
``DecodingPress``), so that a long generation's cache stays near a target
size instead of growing with every new token."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from kvfx.kernels.gather import gather_slots
from kvfx.kernels.window_scores.reference import pool_prefix
from kvfx.policies.budgets import check_int, fail, smin
from kvfx.policies.compose import Compose, _inherited
from kvfx.policies.fold import NEG_INF, Evict, Fold, evict_to
from kvfx.policies.keep import Keep, TopChunks, TopTokens, TopTokensAcrossHeads
from kvfx.policies.registry import shipped


@shipped
@dataclasses.dataclass(frozen=True)
class Recompress(Compose):
    """``policy`` compresses the prompt as it would alone; while decoding,
    whenever a layer's rows reach ``target + every`` slots, the same policy
    ranks the slots again and keeps ``target`` of them (its sinks and its
    window -- the most recent tokens -- first), so the cache never holds
    more than ``target + every - 1`` slots after a call. The policy's score
    sees the slots the cache holds. A score that is the attention of the
    last ``window`` queries (SnapKV, PyramidKV, ChunkKV: ``observed_window``)
    gets exactly that: the decode calls of the last ``window`` tokens before
    a recompression add the attention their queries pay each slot to the
    slot's running score (kvpress buffers the hidden states and recomputes
    their queries instead), pooled at the recompression as at the prompt
    (``pool_prefix``). A score that is the attention every query has paid
    (H2O: ``accumulates_attention``) gets that: the kept prompt slots start
    from their column sums, every decode call adds its queries' attention,
    and the kept slots carry their sums across recompressions. Any other
    score reads the decode call's own queries.
    The slots keep their order, so "sinks" and "window" keep their meaning
    across recompressions. A padded batch recompresses together, when its
    longest row is due; each row keeps at most ``target`` of its real slots.

    A policy that keeps whole chunks (ChunkKV) keeps them again: the slots
    held are cut into chunks from the first, the newest ``window`` slots and
    the partial chunk before them stay, and the best chunks (scores summed
    over the KV heads) fill the rest, so a recompression keeps the largest
    whole-chunk count within ``target`` and every head keeps the same slots.

    A policy whose KV heads share the layer's budget (AdaKV) shares it
    again: each head keeps its sinks, window and ``safeguard`` share, and the
    best slots across the layer's heads fill ``Hkv x target`` per batch row,
    so heads hold different counts (``ragged_rows``: kvfx's slot store only,
    which repages the rows at each recompression). The schedule then follows
    the mean a head holds, which every call moves by its new tokens.

    CriticalKV around such a policy corrects each recompression's ranking
    as it corrects the prompt's (``corrected_score``, its first stage
    ``first_stage x target``): the rewrite lends the decode step W_o.

    ``policy``: a one-shot policy that evicts (TopTokens, TopChunks or
    TopTokensAcrossHeads keep, Evict fold); ``every`` >= 1 new tokens between
    recompressions; ``target`` >= the policy's sinks + window, in slots per
    KV head."""

    every: int = 512
    target: int = 2048
    # The decode step keeps the best tokens and evicts the rest, whatever rule
    # one would name: not fields here.
    keep_rule: Optional[Keep] = _inherited()
    fold_rule: Optional[Fold] = _inherited()

    schedule = "continuous"   # (a class attribute: ranked again while decoding)

    @property
    def while_decoding(self) -> str:  # type: ignore[override]
        return f"compresses again every {self.every} new tokens"

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.policy
        name = type(inner).__name__
        if inner.schedule != "prefill":
            fail("Recompress", "policy", inner, f"a policy that compresses the prompt once ({name} already "
                 f"{inner.while_decoding})")
        if type(inner.keep()) not in (TopTokens, TopChunks, TopTokensAcrossHeads) or type(inner.fold()) is not Evict:
            fail("Recompress", "policy", inner, "a policy that keeps its best tokens per KV head or across a "
                 "layer's heads, or whole chunks, and evicts the rest (TopTokens, TopTokensAcrossHeads or TopChunks "
                 f"keep, Evict fold); {name} uses {type(inner.keep()).__name__} and {type(inner.fold()).__name__}")
        if inner.reuse_source(1) is not None or inner.reuse_source(2) is not None:
            fail("Recompress", "policy", inner, "a policy whose every layer chooses its own slots (each layer "
                 f"recompresses alone while decoding; {name} reuses another layer's choice)")
        if inner.needs_rotary:
            fail("Recompress", "policy", inner, f"a policy whose score needs no rotary embedding ({name}'s "
                 "queries before it are lent only to the prompt's compression)")
        check_int("Recompress", "every", self.every, 1)
        check_int("Recompress", "target", self.target, max(1, inner.sinks + inner.window))

    @property
    def keeps_running_score(self) -> bool:  # type: ignore[override]
        # the attention gathered before a recompression, or since the prompt (H2O)
        return self.policy.observed_window is not None or self.policy.accumulates_attention

    @property
    def keeps_prompt_score(self) -> bool:  # type: ignore[override]
        return self.policy.accumulates_attention

    @property
    def due(self) -> int:
        """Slots at which rows are recompressed (a longer row: at once)."""
        return self.target + self.every

    def idle_step(self, length, new) -> bool:
        if self.policy.accumulates_attention:
            return False   # every query's attention counts
        observed = self.policy.observed_window
        return self.decode_length(length, new) >= length and (observed is None or length <= self.due - observed[0])

    def step_scores_only(self, length, new) -> bool:
        return self.decode_length(length, new) >= length and not self.idle_step(length, new)

    def decode_length(self, total, new):
        """Rows of ``total`` slots keep them until ``target + every``, then
        ``target`` (+ what a multi-token call brought past a multiple of
        ``every``): guard-free, so one compiled graph serves every step."""
        n = smin(total, self.target + (total - self.target) % self.every)
        return self.keep().fit(self.policy, n, total)   # (whole chunks: the largest count within n)

    @property
    def ragged_rows(self) -> bool:  # type: ignore[override]
        return self.keep().shared_across_heads

    def room_after(self, length) -> int:
        """Slots each row gains before the next recompression, after one that
        left rows of ``length`` (mean) slots: a ragged store pages for them."""
        return self.due - length

    def step(self, q, k, v, slot_bias, slot_score, scale, layer: int = 0, n_layers: int = 1):
        if self.ragged_rows:
            raise RuntimeError("kvfx: Recompress of a budget the KV heads share (AdaKV) steps through "
                               "step_rows: its rows hold different counts (kvfx's slot store only)")
        s, new = k.shape[2], q.shape[2]
        n = self.decode_length(s, new)
        if self.keeps_running_score and not self.idle_step(s, new):
            slot_score = slot_score + self.observed_attention(q, k, slot_bias, scale)
        if n >= s:
            return k, v, slot_bias, slot_score
        b, kv_heads = k.shape[:2]
        if isinstance(self.keep(), TopChunks):
            return self._keep_chunks(q, k, v, slot_bias, slot_score, scale, n, layer, n_layers)
        # Each (batch, KV head) row is scored as a batch row of its own, its
        # invalid slots moved to the front (stable: the real ones keep their
        # order), so every score's left-padding rule applies per row.
        valid = slot_bias != NEG_INF
        order = torch.sort(valid.to(torch.uint8), dim=-1, stable=True).indices
        rows_of = lambda x: x.flatten(0, 1).unsqueeze(1)  # noqa: E731
        k1, v1, valid1 = gather_slots(k, order), gather_slots(v, order), valid.gather(2, order)
        running = slot_score.gather(2, order)
        keep = smin(valid1.sum(-1, keepdim=True), n)                               # [B, Hkv, 1]
        score = self._ranking(q, k1, v1, valid1, running, scale, keep, layer, n_layers)
        k1, v1, valid1, keep = rows_of(k1), rows_of(v1), valid1.flatten(0, 1), keep.flatten(0, 1)[:, :, None]
        kept = TopTokens().select(self.policy, rows_of(score), valid1, n, keep)
        out = evict_to(kept.index, k1, v1, valid1, rows_of(running), slot_valid=kept.rank < keep)
        back = lambda x: x.squeeze(1).unflatten(0, (b, kv_heads))  # noqa: E731
        bias = back(out.slot_bias)
        return back(out.k), back(out.v), bias, self._carried(back(out.slot_score), bias)

    def step_rows(self, q, k, v, slot_bias, slot_score, scale, width: int, layer: int = 0, n_layers: int = 1):
        """The step over rows that each hold their own count of slots (a keep
        whose KV heads share the budget: AdaKV). k, v [B, Hkv, W, D] (v None:
        a call that only gathers scores), slot_bias, slot_score [B, Hkv, W]:
        each row's slots in order, invalid ones (-inf) anywhere, this call's
        tokens its last real ones; ``width``: the schedule's row length (the
        mean a head holds, this call's tokens included). Returns (k, v,
        slot_bias, slot_score), each W wide: as given with the running score
        updated, or, at a recompression, each row's kept slots first, in
        order (-inf past them)."""
        new = q.shape[2]
        n = self.decode_length(width, new)
        gathers = self.keeps_running_score and not self.idle_step(width, new)
        if n >= width and new == 1:   # one query sees every real slot, wherever the rows hold them
            seen = self.observed_attention(q, k, slot_bias, scale, width) if gathers else 0.0
            return k, v, slot_bias, slot_score + seen
        valid = slot_bias != NEG_INF
        order = torch.sort(valid.to(torch.uint8), dim=-1, stable=True).indices   # invalid first, real in order
        k1, bias1 = gather_slots(k, order), slot_bias.gather(2, order)
        score1 = slot_score.gather(2, order).masked_fill(bias1 == NEG_INF, 0.0)
        if gathers:
            score1 = score1 + self.observed_attention(q, k1, bias1, scale, width)
        if n >= width:
            return k, v, slot_bias, torch.zeros_like(slot_score).scatter(2, order, score1)
        w = slot_bias.shape[2]
        v1, valid1 = gather_slots(v, order), bias1 != NEG_INF
        score = self._ranking(q, k1, v1, valid1, score1, scale, n, layer, n_layers)
        kept = self.keep().select(self.policy, score, valid1, n)     # at most Hkv x n of a batch row's real slots
        live = torch.arange(w, device=k.device) < kept.length[..., None]
        bias = torch.zeros_like(slot_bias).masked_fill(~live, NEG_INF)
        return (gather_slots(k1, kept.index), gather_slots(v1, kept.index), bias,
                self._carried(score1.gather(2, kept.index), bias))

    def _ranking(self, q, k, v, valid, gathered, scale, keep, layer, n_layers) -> torch.Tensor:
        """What a recompression ranks the slots by. k, v [B, Hkv, S, D], valid
        and ``gathered`` (the running score) [B, Hkv, S], each row's real
        slots last; ``keep``: slots each row keeps. The gathered window's
        attention, pooled, the sums of every query's attention (H2O), or the
        base scorer's score with the call's own
        queries (each (batch, KV head) row scored as a batch row of its own,
        so the left-padding rule applies per row); then the policy's
        correction of it (CriticalKV). -> [B, Hkv, S]"""
        base = self._gathered_score(gathered)
        if base is None:
            b, kv_heads, s = valid.shape
            scorer = self.policy.base_scorer
            rows_of = lambda x: x.flatten(0, 1).unsqueeze(1)  # noqa: E731
            q1 = q.unflatten(1, (kv_heads, -1)).flatten(0, 1) if scorer.needs_queries else None
            base = scorer._score(q1, rows_of(k), valid.flatten(0, 1), scale, rows_of(v), layer,
                                 n_layers).view(b, kv_heads, s)
        return self.policy.corrected_score(base, valid, v, keep)

    def _gathered_score(self, running) -> Optional[torch.Tensor]:
        """The base score a recompression reads off the running score: the
        gathered window's attention, pooled (SnapKV), or every query's sums
        (H2O); None for a score computed from the slots themselves."""
        observed = self.policy.observed_window
        if observed is not None:
            return pool_prefix(running, *observed)
        return running if self.policy.accumulates_attention else None

    def observed_attention(self, q, k, slot_bias, scale, width=None) -> torch.Tensor:
        """The attention this call's queries among the last ``window`` before
        the next recompression pay each slot (causal within the call), summed
        over those queries, averaged over each KV head's query heads; for a
        score that ``accumulates_attention`` (H2O), every query's, summed over
        the query heads as the prompt's column sums are.
        q: [B, H, Sq, D], k: [B, Hkv, S, D] (the call's tokens last); ``width``:
        the schedule's row length when it is not S (ragged rows). -> [B, Hkv, S]"""
        b, h, sq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        length = s if width is None else width
        seen = torch.arange(s - sq + 1, s + 1, device=q.device)          # slots each query sees
        groups = q.float().view(b, hkv, h // hkv, sq, d)
        logits = groups @ k.float()[:, :, None].transpose(-1, -2) * scale + slot_bias[:, :, None, None, :]
        visible = torch.arange(s, device=q.device) < seen[:, None]       # [Sq, S]
        probs = logits.masked_fill(~visible, NEG_INF).softmax(-1).nan_to_num(0.0)
        if self.policy.accumulates_attention:
            return probs.sum((2, 3))
        window = self.policy.observed_window[0]
        counted = torch.arange(length - sq + 1, length + 1, device=q.device) > max(self.due, length) - window
        return (probs * counted[:, None]).sum(3).mean(2)

    def _carried(self, score, slot_bias) -> torch.Tensor:
        """The running score the kept slots carry past a recompression: their
        sums for a score that accumulates (H2O), else 0 (a window score
        gathers afresh before the next one)."""
        if not self.policy.accumulates_attention:
            return torch.zeros_like(slot_bias)
        return score.masked_fill(slot_bias == NEG_INF, 0.0)

    def _keep_chunks(self, q, k, v, slot_bias, slot_score, scale, n, layer, n_layers):
        """The chunk keep over rows every KV head shares (a chunk policy keeps
        the same slots in every head and refuses padded rows, so every slot
        held is real): each head scored, the heads summed per chunk."""
        valid = slot_bias[:, 0] != NEG_INF
        score = self._gathered_score(slot_score)
        if score is None:
            scorer = self.policy.base_scorer
            score = scorer._score(q if scorer.needs_queries else None, k, valid, scale, v, layer, n_layers)
        score = self.policy.corrected_score(score, valid, v, n)
        kept = self.keep().select(self.policy, score, valid, n)
        out = evict_to(kept.index, k, v, valid, slot_score)
        return out.k, out.v, out.slot_bias, self._carried(out.slot_score, out.slot_bias)

