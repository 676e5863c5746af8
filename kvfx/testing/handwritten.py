"""A hand-written GPT (no transformers) with a plain tuple KV cache.

Used to check that kvfx works on users' own modules, not only on transformers
models: the cache is a tuple of ``(k, v)`` per layer, grown with ``torch.cat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyGPT", "greedy_generate"]

Past = tuple[tuple[Tensor, Tensor], ...]


def _rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding (half-split form); x: [B, H, S, D], pos: [B, S]."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos[:, None, :, None].float() * inv  # [B, 1, S, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm block: GQA attention with rotary positions, then a GELU MLP."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.h, self.hkv, self.d = n_heads, n_kv_heads, dim // n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, n_heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_heads * self.d, bias=False)
        self.o = nn.Linear(n_heads * self.d, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, pos: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, S, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, S, self.h, self.d).transpose(1, 2)
        k, v = self.kv(h).view(B, S, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, pos), _rope(k, pos)
        # Always cat, even in prefill (onto an empty cache), so the cache
        # tensors are cat outputs on every step.
        prefill = past is None
        if prefill:
            past = (k.new_empty(B, self.hkv, 0, self.d), v.new_empty(B, self.hkv, 0, self.d))
        pk, pv = past
        k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        # GQA: each KV head serves n_heads // n_kv_heads query heads.
        rep = self.h // self.hkv
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Causal only matters in prefill (where one query sees its one key either
        # way); a single decode query sees everything. `S > 1` here would be a
        # SymBool under dynamic shapes, which SDPA refuses (a graph break).
        # (Chunked prefill onto a non-empty past is not supported.)
        a = F.scaled_dot_product_attention(q, kk, vv, is_causal=prefill)
        x = x + self.o(a.transpose(1, 2).reshape(B, S, self.h * self.d))
        return x + self.mlp(self.ln2(x)), (k, v)


class TinyGPT(nn.Module):
    """Decoder-only LM; ``forward`` returns ``(logits, new_past)``.
    ``break_after``: a graph break after that block, so dynamo splits the
    layers over two graphs (as Python control flow in a model does)."""

    def __init__(self, vocab: int = 128, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                 n_kv_heads: int = 2, max_len: int = 512, break_after: int | None = None) -> None:
        super().__init__()
        assert dim % n_heads == 0 and n_heads % n_kv_heads == 0
        self.max_len = max_len
        self.break_after = break_after
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor, past: Past | None = None,
                position_ids: Tensor | None = None) -> tuple[Tensor, Past]:
        B, S = ids.shape
        if position_ids is None:  # continue numbering after what is already cached
            start = 0 if past is None else past[0][0].shape[-2]
            position_ids = torch.arange(start, start + S, device=ids.device).expand(B, S)
        x = self.emb(ids)
        new_past: list = []
        # A graph break inside the loop would make dynamo compile each block on its
        # own; between two loops it splits the layers over two graphs.
        split = len(self.blocks) if self.break_after is None else self.break_after + 1
        x = self._blocks(x, position_ids, past, new_past, 0, split)
        if split < len(self.blocks):
            torch._dynamo.graph_break()
            x = self._blocks(x, position_ids, past, new_past, split, len(self.blocks))
        return self.head(self.ln_f(x)), tuple(new_past)

    def _blocks(self, x: Tensor, pos: Tensor, past: Past | None, new_past: list, lo: int, hi: int) -> Tensor:
        for i in range(lo, hi):
            x, kv = self.blocks[i](x, pos, None if past is None else past[i])
            new_past.append(kv)
        return x


@torch.no_grad()
def greedy_generate(model: nn.Module, ids: Tensor, steps: int) -> Tensor:
    """Prefill on ``ids``, then ``steps`` greedy decode steps reusing the cache.

    Each decode step feeds back the token picked from the previous logits, so
    the model runs ``1 + steps`` times and ``steps`` tokens are appended.
    """
    logits, past = model(ids)
    out = [ids]
    for _ in range(steps):
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
        logits, past = model(nxt, past)
    return torch.cat(out, dim=1)
