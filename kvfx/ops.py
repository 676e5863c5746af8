"""kvfx custom ops: what the FX rewrite puts in place of attention and of the
cache write-back.

Both are ``torch.library`` custom ops so Inductor treats them as opaque calls
with known output shapes (the fake implementations), whatever they launch
inside: the plain-torch references on CPU, Triton kernels on CUDA.

State carried per cache slot (DESIGN.md §4): ``slot_bias`` [B, Hkv, S] float32,
added to the attention logit of every query for that slot: 0 for a plain
token, ``-inf`` for an invalid (padding) slot, ``log(count)`` for a slot that
stands for several tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvfx.kernels import attention as attention_kernels
from kvfx.policies import bias_of, policy_of


def valid_slots(mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
    """Which key slots are real tokens, read off the model's attention mask.

    mask: [B or 1, 1 or H, Sq, >= S], bool (True = attend) or additive float.
    The last query sees every real token before it, so its row is the padding
    mask. Returns [B, S] bool.
    """
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, :length]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, length)


@torch.library.custom_op("kvfx::compress", mutates_args=())
def compress(
    q: Optional[Tensor], k: Tensor, v: Tensor, mask: Optional[Tensor], reuse_index: Optional[Tensor],
    policy: str, layer: int, n_layers: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Compress one layer's prompt cache with the policy whose registry key is
    ``policy`` (``kvfx.policies.key_of``). q: [B, H, Sq, D] (None for a policy
    that reads no queries), k/v: [B, Hkv, S, D]. ``reuse_index`` (ChunkKV) are
    kept indices computed by an earlier layer. Returns fresh contiguous (k, v,
    slot_bias, slot_score, index) with n = policy.kept_length(S) slots."""
    pol = policy_of(policy)
    valid = valid_slots(mask, k.shape[0], k.shape[2], k.device)
    out = pol.compress(q, k, v, valid, scale, layer, n_layers, reuse_index)
    # A custom op's outputs may not alias its inputs (the reused index would).
    index = out.index.clone() if out.index is reuse_index else out.index.contiguous()
    return out.k.contiguous(), out.v.contiguous(), out.slot_bias.contiguous(), out.slot_score.contiguous(), index


@compress.register_fake
def _compress_fake(q, k, v, mask, reuse_index, policy, layer, n_layers, scale):
    batch, kv_heads, length, _ = k.shape
    n = policy_of(policy).kept_length(length, layer, n_layers)
    return (
        k.new_empty(batch, kv_heads, n, k.shape[-1]),
        v.new_empty(batch, kv_heads, n, v.shape[-1]),
        k.new_empty(batch, kv_heads, n, dtype=torch.float32),
        k.new_empty(batch, kv_heads, n, dtype=torch.float32),
        k.new_empty(batch, kv_heads, n, dtype=torch.int64),
    )


@torch.library.custom_op("kvfx::attend", mutates_args=())
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slot_bias: Tensor,
    slot_score: Tensor,
    seen: Tensor,
    mask: Optional[Tensor],
    scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention of new queries over cached slots + the new tokens.

    q: [B, H, Sq, D]; k, v: [B, Hkv, S, D] where the last Sq slots are the new
    tokens; slot_bias, slot_score: [B, Hkv, S - Sq] for the cached slots;
    seen: 0-d int64, the tokens the cache has absorbed, or -1 for a cache that
    carries no kvfx state.

    With state, the cached slots get ``slot_bias`` and the new tokens are
    causal among themselves: the model's own mask is ignored because it was
    computed for the uncompressed positions. Without state (a cache kvfx never
    compressed) the model's mask is right and is used as is.

    Returns (out [B, H, Sq, Dv], slot_bias and slot_score for all S slots, the
    new ones 0, and the tokens seen after this call).
    """
    batch, kv_heads, length, _ = k.shape
    past = length - q.shape[-2]
    has_state = bool(seen >= 0)
    if not has_state:
        slot_bias = _bias_from_mask(mask, batch, kv_heads, past, k.device)
    out = attention_kernels.slot_attention(q, k, v, slot_bias, scale, softcap)
    grow = (0, length - past)
    seen_after = (seen if has_state else torch.full_like(seen, past)) + q.shape[-2]
    return out, torch.nn.functional.pad(slot_bias, grow), torch.nn.functional.pad(slot_score, grow), seen_after


@attend.register_fake
def _attend_fake(q, k, v, slot_bias, slot_score, seen, mask, scale, softcap):
    batch, kv_heads, length, _ = k.shape
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    state = k.new_empty(batch, kv_heads, length, dtype=torch.float32)
    return out, state, torch.empty_like(state), torch.empty_like(seen)


@torch.library.custom_op("kvfx::step", mutates_args=())
def step(
    q: Tensor, k: Tensor, v: Tensor, slot_bias: Tensor, slot_score: Tensor,
    policy: str, layer: int, n_layers: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decode step of a continuous policy (TOVA, ZeroMerge) over the cache
    including the new tokens; returns (k, v, slot_bias, slot_score) with
    policy.decode_length(S, Sq) slots."""
    out = policy_of(policy).step(q, k, v, slot_bias, slot_score, scale, layer, n_layers)
    # A step with nothing to evict (a budget not reached yet) may hand back its
    # inputs; a custom op's outputs must not alias them.
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, slot_bias, slot_score)}
    return tuple(t.clone(memory_format=torch.contiguous_format) if t.untyped_storage().data_ptr() in inputs
                 else t.contiguous() for t in out)


@step.register_fake
def _step_fake(q, k, v, slot_bias, slot_score, policy, layer, n_layers, scale):
    batch, kv_heads, length, _ = k.shape
    n = policy_of(policy).decode_length(length, q.shape[-2])
    return (k.new_empty(batch, kv_heads, n, k.shape[-1]), v.new_empty(batch, kv_heads, n, v.shape[-1]),
            k.new_empty(batch, kv_heads, n, dtype=torch.float32), k.new_empty(batch, kv_heads, n, dtype=torch.float32))


def _bias_from_mask(mask: Optional[Tensor], batch: int, kv_heads: int, past: int, device) -> Tensor:
    return bias_of(valid_slots(mask, batch, past, device)[:, None, :].expand(batch, kv_heads, past))


# kvfx compresses caches for inference: no gradient flows through its ops.
# Registering that keeps a forward run with grad enabled from failing inside
# AOTAutograd.
compress.register_autograd(lambda ctx, *grads: (None,) * 9)
attend.register_autograd(lambda ctx, *grads: (None,) * 9)
step.register_autograd(lambda ctx, *grads: (None,) * 9)
