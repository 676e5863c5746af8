"""ThinK: a cut along head_dim instead of along the tokens -- each KV head's
least useful key channels zeroed in the prompt's cache (kvpress's ``ThinKPress``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from kvfx.policies.budgets import check_int, fail
from kvfx.policies.compose import Compose, _inherited
from kvfx.policies.fold import NEG_INF, Compressed, Fold
from kvfx.policies.keep import Keep
from kvfx.policies.registry import shipped


def channel_scores(q: torch.Tensor, k: torch.Tensor, q_valid: torch.Tensor, k_valid: torch.Tensor,
                   window: int) -> torch.Tensor:
    """ThinK's score of every key channel, [B, Hkv, D] float32: the mean
    square of the last ``window`` real queries' channel (averaged over the
    query heads of each KV head) times the mean square of the kept keys'.
    q: [B, H, Sq, D], k: [B, Hkv, n, D]; q_valid [B, Sq], k_valid [B, Hkv, n]:
    real queries and kept slots (a padded row's fillers count for neither)."""
    b, hkv, _, d = k.shape
    # The last `window` real queries of each row (left padding: the real ones end every row).
    recent = q_valid & (q_valid.long().flip(-1).cumsum(-1).flip(-1) <= window)
    weight = recent[:, None, :, None].float()
    q_sq = (q.float().square() * weight).sum(2) / weight.sum(2).clamp(min=1)        # [B, H, D]
    q_sq = q_sq.view(b, hkv, -1, d).mean(2)
    kept = k_valid[..., None].float()
    k_sq = (k.float().square() * kept).sum(2) / kept.sum(2).clamp(min=1)             # [B, Hkv, D]
    return q_sq * k_sq


def pruned_channels(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, Hkv, D] bool: the ``int(D x ratio)`` lowest-scored channels of each
    head (ties by channel order, so the reference and the graph agree)."""
    d = score.shape[-1]
    n = int(d * ratio)
    order = torch.sort(score, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, True)


@shipped
@dataclasses.dataclass(frozen=True)
class ThinK(Compose):
    """ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven
    Pruning"): after ``policy`` keeps its tokens, each KV head zeroes the
    ``key_channels`` fraction (``int(head_dim x key_channels)`` channels) of
    its kept keys' channels with the lowest score |q_c|^2 |k_c|^2 -- the mean
    square of channel c over the last ``channel_window`` prompt queries
    (averaged over the head's query heads) times its mean square over the kept
    keys. Values and the keys written while decoding keep every channel; the
    queries keep theirs, so attention over a pruned key is the dot product of
    its remaining channels.

    It cuts along head_dim, so it composes with any token policy:
    ``ThinK(kvfx.SnapKV(budget=0.5), key_channels=0.5)`` keeps SnapKV's
    tokens and zeroes half of their key channels (kvpress's
    ``ComposedPress([SnapKVPress(0.5), ThinKPress(0.5)])``);
    ``ThinK(kvfx.StreamingLLM(budget=1.0))`` keeps every token. Like
    kvpress's press it frees no memory: the zeroed channels stay in the
    store (a store narrower per head along head_dim would, at the cost of
    gathering each query's channels in every decode step)."""

    key_channels: float = 0.5
    channel_window: int = 32
    # The tokens are the wrapped policy's to choose: no keep or fold of its own.
    keep_rule: Optional[Keep] = _inherited()
    fold_rule: Optional[Fold] = _inherited()

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.key_channels
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0 <= ratio < 1:
            fail("ThinK", "key_channels", ratio, "a fraction of the key channels in [0, 1)")
        check_int("ThinK", "channel_window", self.channel_window, 1)

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return True

    @property
    def cuts_key_channels(self) -> bool:  # type: ignore[override]
        return True

    def _score(self, q, k, valid, scale, v=None, layer=0, n_layers=1):
        # The wrapped policy may not read the queries; the graph lends them for the channels.
        return self.policy._score(q if self.policy.needs_queries else None, k, valid, scale, v, layer, n_layers)

    def cut_channels(self, q, valid, out: Compressed) -> Compressed:
        out = self.policy.cut_channels(q, valid, out)
        if not self.key_channels:
            return out
        score = channel_scores(q, out.k, valid, out.slot_bias != NEG_INF, self.channel_window)
        pruned = pruned_channels(score, self.key_channels)
        return dataclasses.replace(out, k=out.k.masked_fill(pruned[:, :, None, :], 0))
