"""Attention over cache slots with a per-slot bias (reference)."""

from __future__ import annotations

from typing import Optional

import torch

from kvfx.kernels.common import repeat_kv, sink_share


def biased_logits(
    q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, scale: float, softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q k^T * scale [softcapped] + each slot's bias, new tokens causal among
    themselves: [B, H, Sq, S] float32 (shapes as in slot_attention_reference).
    ``head_bias`` (broadcasting to [B, H, Sq, S]): the model's own per-head
    score bias over every slot (ALiBi, Doge's dynamic mask), added as well."""
    b, h, sq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = h // hkv
    logits = q.float() @ repeat_kv(k.float(), groups).transpose(-1, -2) * scale  # [B, H, Sq, S]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    causal = torch.ones(sq, sq, dtype=torch.bool, device=q.device).tril()
    new = torch.zeros(sq, sq, device=q.device).masked_fill(~causal, float("-inf"))
    bias = torch.cat(
        [repeat_kv(slot_bias[:, :, None, :], groups).expand(b, h, sq, s - sq), new.expand(b, h, sq, sq)], dim=-1
    )
    logits = logits + bias
    return logits if head_bias is None else logits + head_bias.float()


def head_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_bias: torch.Tensor, head_bias: torch.Tensor,
    scale: float, softcap: float = 0.0,
) -> torch.Tensor:
    """slot_attention_reference with the model's per-head bias ``head_bias``
    (broadcasting to [B, H, Sq, S]) added to the logits. Plain torch on every
    device: a per-head bias is rare (ALiBi models, Doge) and the bias tensor
    is the model's own, already materialised."""
    probs = biased_logits(q, k, slot_bias, scale, softcap, head_bias).softmax(dim=-1)
    return (probs @ repeat_kv(v.float(), q.shape[1] // k.shape[1])).to(q.dtype)


def slot_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_bias: torch.Tensor, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T * scale [softcapped] + bias) v, computed in float32.

    q: [B, H, Sq, D]; k, v: [B, Hkv, S, D] whose last Sq slots are the queries'
    own tokens (causal among themselves); slot_bias: [B, Hkv, S - Sq] for the
    earlier slots. Returns [B, H, Sq, Dv] in q's dtype.
    """
    probs = biased_logits(q, k, slot_bias, scale, softcap).softmax(dim=-1)
    return (probs @ repeat_kv(v.float(), q.shape[1] // k.shape[1])).to(q.dtype)


def sink_weight(
    q: torch.Tensor, k: torch.Tensor, slot_bias: torch.Tensor, sinks: torch.Tensor, scale: float, softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The share of each query's softmax mass the slots keep when a learned sink
    logit (gpt-oss) joins the scores and is dropped after: Z / (Z + e^sink) =
    sigmoid(logsumexp(logits) - sink). sinks broadcasts to [B, H, Sq, 1];
    returns [B, H, Sq, 1] float32, to scale slot_attention's output by."""
    return sink_share(torch.logsumexp(biased_logits(q, k, slot_bias, scale, softcap, head_bias), dim=-1, keepdim=True),
                      sinks)
