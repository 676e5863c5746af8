"""Hand-written reference models, each written the way its upstream project
writes attention and its KV cache (not shaped to make kvfx's life easy).

    from kvfx.testing.gallery import GALLERY
    entry = GALLERY["nanogpt"]
    model = entry.build()
    run = entry.generate(model, ids, steps=8)   # the upstream project's own greedy loop

Every loop passes positions explicitly (as the upstream loops do: gpt-fast's
``input_pos``, the reference Llama's ``start_pos``, the position of the next
token elsewhere), counted from the tokens generated, never from a cache length.
``Run.cache_bytes`` is every byte the cache holds after the prompt: its tensors
and the kvfx state riding on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GALLERY", "GalleryEntry", "Run"]

VOCAB, DIM, HEADS, KV_HEADS, LAYERS, MAX_LEN = 128, 64, 4, 2, 2, 256
HEAD_DIM = DIM // HEADS


@dataclasses.dataclass
class Run:
    tokens: Tensor                # prompt + generated tokens
    logits: list[Tensor]          # last-position logits of every call
    cache_bytes: int              # bytes the cache holds right after the prompt


def _bytes(tensors) -> int:
    """Bytes of cache tensors (the memory each holds: a buffer kvfx emptied
    holds one position) and of any kvfx state riding on them."""
    from kvfx import buffers
    from kvfx.runtime import state_of

    total = 0
    for t in tensors:
        total += t.untyped_storage().nbytes() if buffers.is_phantom(t) else t.numel() * t.element_size()
        held = buffers.state_of(t)
        if held is not None:
            total += held.nbytes()
        state = state_of(t)
        if state is not None:
            total += sum(x.numel() * x.element_size() for x in (state.slot_bias, state.slot_score, state.seen))
    return total


def _rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding (half-split form); x: [B, H, S, D], pos: [S]."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos[None, None, :, None].float() * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _greedy(step: Callable[[Tensor, int], Tensor], ids: Tensor, steps: int, cache: Callable[[], list]) -> Run:
    """``step(tokens, start)`` runs the model on ``tokens`` placed at ``start``
    and returns logits [B, S, V]."""
    with torch.no_grad():
        logits = step(ids, 0)
        nbytes = _bytes(cache())
        out, seen, all_logits = [ids], ids.shape[1], [logits[:, -1]]
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = step(nxt, seen)
            seen += 1
            all_logits.append(logits[:, -1])
    return Run(torch.cat(out, dim=1), all_logits, nbytes)


class _MLPBlock(nn.Module):
    """Shared pre-norm residual block: ``attn`` then a GELU MLP."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: Tensor, *attn_args):
        """The block's output, and what its attention hands back beside its
        output (the layer's cache: ``present``), if anything."""
        out = self.attn(self.ln_1(x), *attn_args)
        a, present = out if isinstance(out, tuple) else (out, None)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


# -- nanoGPT / minGPT (with the common KV-cache patch) ---------------------------

class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention plus the usual ``layer_past`` patch: at the
    prompt there is no past, so the cache returned is ``k`` itself (no cat)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        self.n_head = HEADS

    def forward(self, x, layer_past=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if layer_past is not None:
            past_key, past_value = layer_past
            k = torch.cat((past_key, k), dim=-2)
            v = torch.cat((past_value, v), dim=-2)
        present = (k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=layer_past is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), present


class NanoGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(MAX_LEN, DIM)
        self.h = nn.ModuleList(_MLPBlock(NanoGPTAttention()) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx, past_key_values=None, pos=None):
        if pos is None:
            past_length = 0 if past_key_values is None else past_key_values[0][0].size(-2)
            pos = torch.arange(past_length, past_length + idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.lm_head(self.ln_f(x)), presents


def _nanogpt_generate(model, ids, steps):
    past = [None]

    def step(tokens, start):
        pos = torch.arange(start, start + tokens.shape[1])
        logits, past[0] = model(tokens, past[0], pos)
        return logits

    return _greedy(step, ids, steps, lambda: [t for kv in past[0] for t in kv])


# -- fairseq-style batched-matmul attention over [B*H, S, D] ----------------------

class BmmAttention(nn.Module):
    """fairseq's MultiheadAttention habit: queries pre-scaled, heads folded into
    the batch, ``torch.bmm`` for scores and output; the cache is kept as
    ``[B, H, S, D]`` and folded for every call."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(DIM, DIM) for _ in range(3))
        self.out_proj = nn.Linear(DIM, DIM)
        self.num_heads, self.head_dim = HEADS, HEAD_DIM
        self.scaling = HEAD_DIM ** -0.5

    def forward(self, x, pos, prev: Optional[dict]):
        bsz, tgt_len, embed_dim = x.size()
        q = self.q_proj(x) * self.scaling
        q = q.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, pos), _rope(k, pos)
        if prev is not None:
            k = torch.cat([prev["prev_key"], k], dim=2)
            v = torch.cat([prev["prev_value"], v], dim=2)
        saved = {"prev_key": k, "prev_value": v}
        src_len = k.size(2)
        q = q.reshape(bsz * self.num_heads, tgt_len, self.head_dim)
        k = k.reshape(bsz * self.num_heads, src_len, self.head_dim)
        v = v.reshape(bsz * self.num_heads, src_len, self.head_dim)
        attn_weights = torch.bmm(q, k.transpose(1, 2))
        if tgt_len > 1:  # the prompt: causal (decode sees every slot)
            causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=x.device).triu(src_len - tgt_len + 1)
            attn_weights = attn_weights.masked_fill(causal, float("-inf"))
        attn_probs = F.softmax(attn_weights, dim=-1)
        attn = torch.bmm(attn_probs, v)
        attn = attn.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
        return self.out_proj(attn), saved


# -- reference-Llama style: preallocated buffers, slice assignment ------------------

class MetaLlamaAttention(nn.Module):
    """Meta's reference ``llama/model.py``: ``cache_k[:bsz, start:start+n] = xk``
    into a preallocated [B, max_seq, Hkv, D] buffer, then
    ``keys = cache_k[:bsz, :start+n]``, repeat_kv, matmul attention."""

    def __init__(self, max_batch: int = 4) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = HEADS, KV_HEADS, HEAD_DIM
        self.n_rep = HEADS // KV_HEADS
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.cache_k = torch.zeros(max_batch, MAX_LEN, KV_HEADS, HEAD_DIM)
        self.cache_v = torch.zeros(max_batch, MAX_LEN, KV_HEADS, HEAD_DIM)

    def forward(self, x, start_pos: int, pos, mask: Optional[Tensor]):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq = _rope(xq.transpose(1, 2), pos).transpose(1, 2)
        xk = _rope(xk.transpose(1, 2), pos).transpose(1, 2)
        self.cache_k[:bsz, start_pos: start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos: start_pos + seqlen] = xv
        keys = self.cache_k[:bsz, : start_pos + seqlen]
        values = self.cache_v[:bsz, : start_pos + seqlen]
        keys = keys[:, :, :, None, :].expand(bsz, keys.shape[1], self.n_kv_heads, self.n_rep, self.head_dim)
        keys = keys.reshape(bsz, -1, self.n_heads, self.head_dim)
        values = values[:, :, :, None, :].expand(bsz, values.shape[1], self.n_kv_heads, self.n_rep, self.head_dim)
        values = values.reshape(bsz, -1, self.n_heads, self.head_dim)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        return self.wo(output.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class MetaLlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(_MLPBlock(MetaLlamaAttention()) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, start_pos: int):
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        pos = torch.arange(start_pos, start_pos + seqlen)
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask])
        for layer in self.layers:
            h, _ = layer(h, start_pos, pos, mask)
        return self.output(self.norm(h)).float()


def _meta_generate(model, ids, steps):
    def step(tokens, start):
        return model(tokens, start)

    return _greedy(step, ids, steps, lambda: [t for b in model.layers for t in (b.attn.cache_k, b.attn.cache_v)])


# -- gpt-fast style: KVCache module, index_put at input_pos ------------------------

class KVCache(nn.Module):
    """gpt-fast's ``KVCache``: buffers [B, H, max_seq, D] written at ``input_pos``."""

    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype=torch.float32):
        super().__init__()
        cache_shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype))

    def update(self, input_pos, k_val, v_val):
        k_out = self.k_cache
        v_out = self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class GptFastAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = HEADS, KV_HEADS, HEAD_DIM
        self.wqkv = nn.Linear(DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([DIM, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = map(lambda t: t.transpose(1, 2), (q, k, v))
        q, k = _rope(q, input_pos), _rope(k, input_pos)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, DIM))


class GptFast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(_MLPBlock(GptFastAttention()) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.causal_mask: Optional[Tensor] = None

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        for b in self.layers:
            b.attn.kv_cache = KVCache(max_batch_size, max_seq_length, KV_HEADS, HEAD_DIM)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))

    def forward(self, idx, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x, _ = layer(x, mask, input_pos)
        return self.output(self.norm(x))


def _gptfast_generate(model, ids, steps):
    model.setup_caches(ids.shape[0], ids.shape[1] + steps + 1)
    return gpt_fast_loop(model, ids, steps)


def gpt_fast_loop(model, ids, steps):
    """gpt-fast's prefill + decode loop over caches already set up."""

    def step(tokens, start):
        return model(tokens, torch.arange(start, start + tokens.shape[1]))

    return _greedy(step, ids, steps, lambda: [t for b in model.layers for t in (b.attn.kv_cache.k_cache,
                                                                                  b.attn.kv_cache.v_cache)])


# -- tuple-cache blocks sharing one driver: bmm, latent, sinks, ALiBi --------------

class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, as transformers writes it):
    the cache holds a normed low-rank latent [B, 1, S, r] and one shared
    rotary key [B, 1, S, dr]; every call re-expands them into per-head keys
    and values."""

    RANK, NOPE, ROPE = 16, 8, 8

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.q_proj = nn.Linear(DIM, HEADS * (self.NOPE + self.ROPE), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(DIM, self.RANK + self.ROPE, bias=False)
        self.kv_a_layernorm = nn.LayerNorm(self.RANK)
        self.kv_b_proj = nn.Linear(self.RANK, HEADS * (self.NOPE + HEAD_DIM), bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.softmax_scale = (self.NOPE + self.ROPE) ** -0.5

    def forward(self, x, pos, past):
        bsz, q_len, _ = x.size()
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.NOPE + self.ROPE).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.NOPE, self.ROPE], dim=-1)
        compressed_kv = self.kv_a_proj_with_mqa(x)
        compressed_kv, k_pe = torch.split(compressed_kv, [self.RANK, self.ROPE], dim=-1)
        compressed_kv = self.kv_a_layernorm(compressed_kv).view(bsz, 1, q_len, self.RANK)
        k_pe = k_pe.view(bsz, q_len, 1, self.ROPE).transpose(1, 2)
        q_pe, k_pe = _rope(q_pe, pos), _rope(k_pe, pos)
        if past is not None:
            compressed_kv = torch.cat([past[0], compressed_kv], dim=2)
            k_pe = torch.cat([past[1], k_pe], dim=2)
        present = (compressed_kv, k_pe)
        kv_len = compressed_kv.size(2)
        kv = self.kv_b_proj(compressed_kv).view(bsz, kv_len, self.num_heads, self.NOPE + HEAD_DIM).transpose(1, 2)
        k_nope, value_states = torch.split(kv, [self.NOPE, HEAD_DIM], dim=-1)
        query_states = torch.cat([q_nope, q_pe], dim=-1)
        key_states = torch.cat([k_nope, k_pe.expand(bsz, self.num_heads, kv_len, self.ROPE)], dim=-1)
        out = F.scaled_dot_product_attention(query_states, key_states, value_states, is_causal=past is None,
                                             scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1)), present


class SinkAttention(nn.Module):
    """gpt-oss's eager attention: a learned per-head sink logit joins the
    scores before the softmax and is dropped after it."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(DIM, HEADS * HEAD_DIM)
        self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM)
        self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM)
        self.sinks = nn.Parameter(torch.randn(HEADS))
        self.scaling = HEAD_DIM ** -0.5

    def forward(self, x, pos, past):
        B, S, _ = x.shape
        q = _rope(self.q_proj(x).view(B, S, HEADS, HEAD_DIM).transpose(1, 2), pos)
        k = _rope(self.k_proj(x).view(B, S, KV_HEADS, HEAD_DIM).transpose(1, 2), pos)
        v = self.v_proj(x).view(B, S, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        key_states = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        value_states = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * self.scaling
        if S > 1:
            causal = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).triu(k.shape[2] - S + 1)
            attn_weights = attn_weights.masked_fill(causal, float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)
        combined_logits = torch.cat([attn_weights, sinks], dim=-1)
        combined_logits = combined_logits - combined_logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined_logits, dim=-1, dtype=combined_logits.dtype)
        scores = probs[..., :-1]
        out = torch.matmul(scores, value_states)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), present


class AlibiAttention(nn.Module):
    """MPT/BLOOM-style ALiBi: no rotary; a per-head linear bias over key
    positions, built from the cache length on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.Wqkv = nn.Linear(DIM, 3 * DIM)
        self.out_proj = nn.Linear(DIM, DIM)
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, HEADS + 1) / HEADS), persistent=False)

    def forward(self, x, pos, past):
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, S, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        kv_len = k.size(2)
        alibi = self.slopes.view(1, HEADS, 1, 1) * torch.arange(1 - kv_len, 1, device=x.device).view(1, 1, 1, kv_len)
        attn_weight = q.matmul(k.transpose(-1, -2)) * HEAD_DIM ** -0.5
        attn_weight = attn_weight + alibi
        if S > 1:
            causal = torch.ones(S, kv_len, dtype=torch.bool, device=x.device).triu(kv_len - S + 1)
            attn_weight = attn_weight.masked_fill(causal, float("-inf"))
        attn_weight = torch.softmax(attn_weight, dim=-1)
        out = attn_weight.matmul(v)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, DIM)), present


class TupleCacheLM(nn.Module):
    """A plain LM around one of the attention blocks above; ``forward(ids, pos,
    past)`` returns ``(logits, presents)`` (a list of whatever each block keeps)."""

    def __init__(self, attention: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(_MLPBlock(attention()) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids, pos, past=None):
        x = self.embed(ids)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, pos, None if past is None else past[i])
            presents.append(present)
        return self.lm_head(self.norm(x)), presents


def _tuple_generate(model, ids, steps):
    past = [None]

    def step(tokens, start):
        logits, past[0] = model(tokens, torch.arange(start, start + tokens.shape[1]), past[0])
        return logits

    def tensors():
        return [t for layer in past[0] for t in (layer.values() if isinstance(layer, dict) else layer)]

    return _greedy(step, ids, steps, tensors)


@dataclasses.dataclass(frozen=True)
class GalleryEntry:
    name: str
    upstream: str                 # whose code the model is written like
    form: str                     # the cache / attention form it exercises
    build: Callable[[], nn.Module]
    generate: Callable[[nn.Module, Tensor, int], Run]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def run(self, ids: Tensor, steps: int, policy=None, how: str = "compile", inner: str = "aot_eager"):
        """The entry's own greedy loop on a fresh model: eager when ``policy``
        is None, else through kvfx (``how``: ``"compile"`` for kvfx.compile,
        ``"backend"`` for torch.compile with the bare backend). Returns the run
        and the kvfx backend (None when eager)."""
        import kvfx
        from kvfx.api import restore

        model = self.model()
        backend = None
        if policy is not None:
            torch._dynamo.reset()
            if how == "compile":
                backend = kvfx.compile(model, policy, inner=inner)._kvfx_backend
            elif how == "backend":
                backend = kvfx.backend(policy, inner=inner, model=model)
                model.forward = torch.compile(model.forward, backend=backend)
            else:
                raise ValueError(f"how={how!r} is invalid: allowed 'compile' or 'backend'")
        try:
            return self.generate(model, ids, steps), backend
        finally:
            restore(model)


GALLERY: dict[str, GalleryEntry] = {e.name: e for e in [
    GalleryEntry("nanogpt", "nanoGPT/minGPT + layer_past patch", "tuple cache, no concatenation at the prompt",
                 NanoGPT, _nanogpt_generate),
    GalleryEntry("gpt-fast", "pytorch-labs/gpt-fast", "KVCache buffers written with index_put at input_pos",
                 GptFast, _gptfast_generate),
    GalleryEntry("meta-llama", "meta-llama/llama model.py", "preallocated buffers, slice assignment and slice read",
                 MetaLlama, _meta_generate),
    GalleryEntry("latent", "DeepSeek-V2/V3 attention as transformers writes it",
                 "latent cache [B, 1, S, r] + shared rotary key",
                 lambda: TupleCacheLM(LatentAttention), _tuple_generate),
    GalleryEntry("sinks", "gpt-oss eager attention", "learned per-head sink logits",
                 lambda: TupleCacheLM(SinkAttention), _tuple_generate),
    GalleryEntry("bmm", "fairseq MultiheadAttention", "torch.bmm over [B*H, S, D], dict cache",
                 lambda: TupleCacheLM(BmmAttention), _tuple_generate),
    GalleryEntry("alibi", "MPT / BLOOM", "ALiBi bias built from the cache length",
                 lambda: TupleCacheLM(AlibiAttention), _tuple_generate),
]}
