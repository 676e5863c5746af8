"""Plain-torch slot scores of the policies (the attention-based scores that
need kernels live in ``kvfx.kernels``: column sums, window scores)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

from kvfx.kernels.column_sums import column_sums

# (queries, their log-sum-exp, their column sums, the sums' (decay, queries))
# lent by the op compressing a layer's prompt.
_PROMPT_LSE: contextvars.ContextVar = contextvars.ContextVar("kvfx_prompt_lse", default=None)


def _given(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is not None and t.numel() else None


@contextlib.contextmanager
def prompt_lse(q: Optional[torch.Tensor], lse: Optional[torch.Tensor], sums: Optional[torch.Tensor] = None,
               terms: tuple = (1.0, 0)) -> Iterator[None]:
    """Lend what the prompt's attention computed for queries ``q`` to the
    scores computed inside (``attention_sums``): its log-sum-exp ``lse`` [B,
    H, Sq] (``kvfx::attention_lse``), or the column sums themselves ``sums``
    [B, Hkv, S] (``kvfx::attention_column_sums``) with the (decay, queries)
    they were summed with. Empty or missing tensors lend nothing."""
    lse, sums = _given(lse), _given(sums)
    token = _PROMPT_LSE.set((q, lse, sums, terms) if q is not None and (lse is not None or sums is not None)
                            else None)
    try:
        yield
    finally:
        _PROMPT_LSE.reset(token)


def attention_sums(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float,
                   decay: float = 1.0, queries: int = 0) -> torch.Tensor:
    """Causal attention each key receives over the whole prompt (H2O,
    KVMerger, ZeroMerge; ``column_sums``): no pass of its own when the
    prompt's attention lent the sums of these very queries with these very
    terms, one pass over q.k when it lent their log-sum-exp, else two.
    ``queries`` > 0: from the last ``queries`` queries only (the window
    approximation: its cost grows with ``queries``, not with the prompt).
    -> [B, Hkv, S] float32"""
    lent = _PROMPT_LSE.get()
    if lent is None or lent[0] is not q:
        lent = (None, None, None, None)
    if (lent[2] is not None and lent[3] == (decay, queries) and lent[2].shape == (k.shape[0], k.shape[1], k.shape[2])
            and bool(valid.all())):
        return lent[2]
    lse = lent[1]
    if 0 < queries < q.shape[2]:
        q = q[:, :, -queries:]
        lse = None if lse is None else lse[..., -queries:]
    return column_sums(q, k, valid, scale, decay, lse=lse)


def recency(k: torch.Tensor) -> torch.Tensor:
    """Later slots score higher (StreamingLLM keeps the most recent). -> [B, Hkv, S]"""
    b, hkv, s, _ = k.shape
    return torch.arange(s, device=k.device, dtype=torch.float32).expand(b, hkv, s)


def query_attention(q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query over all slots, averaged over each KV
    head's query heads (TOVA, ZeroMerge). q: [B, H, Sq, D], k: [B, Hkv, S, D],
    slot_bias: [B, Hkv, S] (the new tokens' slots included). -> [B, Hkv, S]"""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    groups = q[:, :, -1].float().view(b, hkv, h // hkv, d)      # a KV head's query heads, side by side
    logits = groups @ k.float().transpose(-1, -2) * scale + slot_bias[:, :, None, :]   # [B, Hkv, G, S]
    return logits.softmax(-1).mean(dim=2)
