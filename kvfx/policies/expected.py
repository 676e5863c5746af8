"""ExpectedAttention: each slot scored by the attention that the *next*
queries are expected to pay it, from the prompt queries' mean and covariance
carried to the future positions by RoPE (kvpress's
``ExpectedAttentionPress``).

The score reads the queries before their rotary embedding and the rotary
embedding's cos and sin at the prompt's positions; the rewrite lends both
(``lent_rotary``). From the cos and sin it fits each channel pair's angle
per position, so it needs neither the model's RoPE base nor its scaling:
the next positions continue the same angles."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import ClassVar, Iterator, Optional

import torch

from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, check_int, fail
from kvfx.policies.registry import preset

# RoPE's cos and sin at the prompt's positions (``future_rotation`` reads
# them), None (unrotated queries) or "unset", lent by the op compressing a layer.
_ROTARY: contextvars.ContextVar = contextvars.ContextVar("kvfx_rotary", default="unset")


@contextlib.contextmanager
def rotary_embedding(cos_sin: Optional[torch.Tensor]) -> Iterator[None]:
    """Lend the rotary embedding the layer's queries get (its cos and sin as
    ``future_rotation`` reads them; None: the queries are not rotated) to the
    scores computed inside (``ExpectedAttention``); the rewrite finds it in
    the graph."""
    token = _ROTARY.set(cos_sin)
    try:
        yield
    finally:
        _ROTARY.reset(token)


def lent_rotary():
    """What ``rotary_embedding`` lent: a tensor, None (no rotation), or the
    string "unset" when nothing was lent."""
    return _ROTARY.get()


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def future_rotation(cos_sin: Optional[torch.Tensor], valid: torch.Tensor, dim: int, future: int) -> torch.Tensor:
    """The rotary embedding averaged over the ``future`` positions after each
    row's last real token, as a [B, dim, dim] float32 matrix acting on the
    queries before rotation (kvpress's mean rotation matrix R).

    ``cos_sin``: RoPE's cos and sin at the prompt's positions, [2, B or 1, 1,
    S, r] when channel i turns with i + r/2 (HF's rotate_half), [2, B or 1, 1,
    S, r/2, 2] when channel 2i turns with 2i + 1 (GPT-J); None: the identity.
    Each channel pair's angle advances by a fixed step per position: the step
    is the mean of the row's steps between consecutive real tokens (exact to
    the cos and sin's precision over the whole prompt), the last angle is the
    line fitted through them, the amplitude (a scaled RoPE's attention
    factor) the mean. Channels past the first r (partial RoPE) stay as they are."""
    batch = valid.shape[0]
    out = torch.eye(dim, dtype=torch.float32, device=valid.device).repeat(batch, 1, 1)
    if cos_sin is None:
        return out
    if cos_sin.dim() == 6:  # pairs (2i, 2i + 1)
        half = cos_sin.shape[-2]
        first, second = 2 * torch.arange(half, device=valid.device), 2 * torch.arange(half, device=valid.device) + 1
        cos, sin = (x[:, 0, :, :, 0].double().expand(batch, -1, -1) for x in cos_sin)   # [B, S, r/2]
    else:                   # halves (i, i + r/2)
        half = cos_sin.shape[-1] // 2
        first = torch.arange(half, device=valid.device)
        second = first + half
        cos, sin = (x[:, 0, :, :half].double().expand(batch, -1, -1) for x in cos_sin)
    steps = torch.arange(1, future + 1, dtype=torch.float64, device=valid.device)[:, None]
    for row in range(batch):
        real = valid[row].nonzero().squeeze(-1)
        if real.numel() == 0:
            continue
        angle = torch.atan2(sin[row, real], cos[row, real])                              # [n, r/2]
        amplitude = torch.hypot(sin[row, real], cos[row, real]).mean(0)
        n = angle.shape[0]
        step = _wrap(angle[1:] - angle[:-1])
        per_token = step.mean(0) if n > 1 else torch.zeros_like(angle[0])
        unwrapped = torch.cat([angle[:1], angle[:1] + step.cumsum(0)])
        offsets = torch.arange(n, dtype=torch.float64, device=valid.device)[:, None] - (n - 1)
        last = (unwrapped - offsets * per_token).mean(0)
        ahead = last + steps * per_token                                                  # [future, r/2]
        c = (amplitude * ahead.cos().mean(0)).float()
        s = (amplitude * ahead.sin().mean(0)).float()
        out[row, first, first] = c
        out[row, second, second] = c
        out[row, first, second] = -s
        out[row, second, first] = s
    return out


def expected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                       rotation: torch.Tensor, sinks: int, covariance: bool = True, value_norm: bool = True,
                       epsilon: float = 0.0) -> torch.Tensor:
    """ExpectedAttention's score. q: the prompt's queries before their rotary
    embedding [B, H, S, D]; rotation [B, D, D] (``future_rotation``). The
    queries of each row's real tokens after its first ``sinks`` give a mean
    mu and covariance Sigma per query head, carried to the future positions
    (R mu, R Sigma R^T); a key's expected logit under such a Gaussian query is
    scale mu.k + scale^2 k^T Sigma k / 2, softmaxed over the row's real keys
    after its sinks and averaged over each KV head's query heads, then
    ``value_norm``: (score + ``epsilon``) x ||v||. The sinks and padding score
    0 (the keep rule keeps the sinks first). -> [B, Hkv, S] float32"""
    b, h, s, d = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    rank = valid.long().cumsum(-1)
    scored = valid & (rank > sinks)                                          # [B, S]
    weight = scored[:, None, :, None].float()
    count = weight.sum(2, keepdim=True).clamp_min(1)                         # [B, 1, 1, 1]
    qf = q.float()
    mean = (qf * weight).sum(2, keepdim=True) / count                        # [B, H, 1, D]
    ahead = (mean @ rotation[:, None].transpose(-1, -2)).view(b, kv_heads, group, d)
    kf = k.float()
    logits = torch.einsum("bkgd,bksd->bkgs", ahead, kf) * scale               # [B, Hkv, G, S]
    if covariance:
        centered = (qf - mean) * weight
        cov = centered.transpose(-1, -2) @ centered / count                  # [B, H, D, D]
        cov = rotation[:, None] @ cov @ rotation[:, None].transpose(-1, -2)
        cov = cov.view(b, kv_heads, group, d, d)
        quad = torch.stack([((kf @ cov[:, :, g]) * kf).sum(-1) for g in range(group)], 2)
        logits = logits + quad * (scale * scale / 2)
    logits = logits.masked_fill(~scored[:, None, None, :], float("-inf"))
    score = logits.softmax(-1).nan_to_num(0.0).mean(2)                      # [B, Hkv, S]
    if value_norm:
        score = (score + epsilon) * v.float().norm(dim=-1) * scored[:, None, :]
    return score


@preset
@dataclasses.dataclass(frozen=True)
class ExpectedAttention(Policy):
    """ExpectedAttention (Devoto et al., 2025, "Expected Attention: KV Cache
    Compression by Estimating Attention from Future Queries Distribution"):
    keep the slots the next ``n_future_positions`` queries are expected to
    attend, modelling those queries as a Gaussian with the prompt queries'
    mean and (``use_covariance``) covariance, rotated by RoPE's average
    rotation over those positions; ``use_vnorm`` weighs each slot by its
    value's norm ((score + ``epsilon``) x ||v||). The first ``sinks`` tokens
    are kept and left out of the statistics (kvpress's ``n_sink``). Defaults
    are kvpress's. One-shot after the prompt; its cost is O(S x H x D^2) at
    prefill (the covariance and each key's quadratic form), no pass over q.k.

    The rewrite lends the queries before their rotary embedding and the
    embedding's cos and sin (HF's ``q * cos + rotate_half(q) * sin``, partial
    rotary included); a model whose queries reach attention through another
    rotation (GPT-J's interleaved pairs, gpt-fast's complex form) is left
    uncompressed, said by ``kvfx.explain``. Queries with no rotary embedding
    (GPT-2, OPT) use the identity."""

    budget: Budget = 0.5
    sinks: int = 4
    n_future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    needs_values: ClassVar[bool] = True
    needs_rotary: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("ExpectedAttention", "n_future_positions", self.n_future_positions, 1)
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                fail("ExpectedAttention", name, getattr(self, name), "True or False")
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            fail("ExpectedAttention", "epsilon", eps, "a finite number >= 0")

    def score(self, q, k, valid, scale, v):
        lent = lent_rotary()
        if isinstance(lent, str):
            raise ValueError("ExpectedAttention reads the queries before their rotary embedding and the "
                             "embedding's cos and sin, and got none: the rewrite lends them; by hand, score inside "
                             "kvfx.policies.expected.rotary_embedding(cos_sin) (None for unrotated queries)")
        rotation = future_rotation(lent, valid, q.shape[-1], self.n_future_positions)
        return expected_attention(q, k, v, valid, scale, rotation, self.sinks, self.use_covariance, self.use_vnorm,
                                  self.epsilon)
