"""An eager reference for every policy on transformers models: no FX, no
custom ops, no runtime threading. The policy's algorithm is applied by hand
to the cache tensors from inside an attention function registered with
transformers, so compiled kvfx can be compared against it step by step.

    with eager_reference(model, kvfx.ZeroMerge(budget=0.25)):
        out = model.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import functools

import torch

from kvfx.integrations.transformers import cache_argument, cache_of
from kvfx.kernels.attention import slot_attention_reference
from kvfx.ops import valid_slots
from kvfx.policies import Policy
from kvfx.policies.expected import rotary_embedding
from kvfx.policies.scores import out_projection

# The attribute holding the linear layer after the attention, per model family.
OUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo")


def module_out_projection(module) -> torch.Tensor | None:
    """The weight [hidden, H x Dv] of an attention module's output
    projection (GPT-2's Conv1D stores it transposed), or None."""
    for name in OUT_PROJECTIONS:
        layer = getattr(module, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.weight
        if type(layer).__name__ == "Conv1D":
            return layer.weight.t()
    return None



def unrotated(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The queries [B, H, S, D] before HF's half-split rotary embedding with
    cos, sin [B, S, r] (the first r channels rotated, the rest left)."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(query.dtype), sin[:, None].to(query.dtype)
    part, rest = query[..., :r], query[..., r:]
    turned = torch.cat((-part[..., r // 2:], part[..., : r // 2]), -1)
    return torch.cat(((part * cos - turned * sin) / (cos * cos + sin * sin), rest), -1)


NAME = "kvfx_reference"


class _Reference:
    def __init__(self, policy: Policy, n_layers: int) -> None:
        self.policy = policy
        self.n_layers = n_layers
        self.cache = None
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # layer -> (slot_bias, slot_score)
        self.kept_index: dict[int, torch.Tensor] = {}                  # layer -> kept indices (ChunkKV reuse)
        self.rotary: dict[int, tuple] = {}                             # layer -> the prompt's (cos, sin)
        self.width: dict[int, int] = {}                                # layer -> schedule length (ragged rows)

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        cache_layer = self.cache.layers[layer]
        if layer not in self.state:  # prefill: the model's own attention, then compress the cache
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale)
            valid = valid_slots(attention_mask, key.shape[0], key.shape[2], key.device)
            reuse = self.kept_index.get(self.policy.reuse_source(layer))
            lent, scored = None, query
            if self.policy.needs_rotary:  # ExpectedAttention: the queries before RoPE, and RoPE's cos and sin
                cos, sin = self.rotary.get(layer, (None, None))
                if cos is not None:
                    scored, lent = unrotated(query, cos, sin), torch.stack((cos, sin))[:, :, None]
            with out_projection(module_out_projection(module)), rotary_embedding(lent):
                kept = self.policy.compress(scored, key, value, valid, scale, layer, self.n_layers, reuse)
            self.kept_index[layer] = kept.index
            cache_layer.keys, cache_layer.values = kept.k.contiguous(), kept.v.contiguous()
            self.state[layer] = (kept.slot_bias, kept.slot_score)
            self.width[layer] = self.policy.budget_length(key.shape[2], layer, self.n_layers)
            return out, None
        with out_projection(module_out_projection(module)):   # (a recompression of CriticalKV reads it)
            return self._decode(module, query, key, value, scale)

    def _decode(self, module, query, key, value, scale):
        layer = module.layer_idx
        cache_layer = self.cache.layers[layer]
        bias, score = self.state[layer]
        out = slot_attention_reference(query, key, value, bias, scale)
        grow = (0, query.shape[2])
        bias, score = torch.nn.functional.pad(bias, grow), torch.nn.functional.pad(score, grow)
        if self.policy.ragged_rows:  # heads holding their own counts: the schedule follows their mean
            width = self.width[layer] + query.shape[2]
            k, v, bias, score = self.policy.step_rows(query, key, value, bias, score, scale, width, layer,
                                                      self.n_layers)
            self.width[layer] = self.policy.decode_length(width, query.shape[2])
            # Each row's slots first, in order, as wide as the longest row: the store's layout (``dense``).
            real = bias != float("-inf")
            order = torch.sort((~real).to(torch.uint8), dim=-1, stable=True).indices[..., :int(real.sum(-1).max())]
            k, v = (x.gather(2, order[..., None].expand(*order.shape, x.shape[-1])) for x in (k, v))
            bias, score = bias.gather(2, order), score.gather(2, order)
            cache_layer.keys, cache_layer.values = k.contiguous(), v.contiguous()
        elif self.policy.schedule == "continuous":
            k, v, bias, score = self.policy.step(query, key, value, bias, score, scale, layer, self.n_layers)
            cache_layer.keys, cache_layer.values = k.contiguous(), v.contiguous()
        self.state[layer] = (bias, score)
        return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def eager_reference(model, policy: Policy):
    """Run ``model`` (a transformers causal LM with a DynamicCache) with the
    policy applied by hand; restores the model's attention afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    reference = _Reference(policy, model.config.num_hidden_layers)
    AttentionInterface.register(NAME, reference.attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous = model.config._attn_implementation

    name = cache_argument(model)

    def pre(module, args, kwargs):
        cache = cache_of(kwargs)
        if cache is not None:
            reference.cache = cache
        elif reference.cache is None:
            from transformers import DynamicCache

            kwargs[name] = reference.cache = DynamicCache(config=model.config)
        return args, kwargs

    def keep_rotary(module, args, kwargs):
        if "position_embeddings" in kwargs and kwargs["position_embeddings"] is not None:
            reference.rotary[module.layer_idx] = kwargs["position_embeddings"]
        return args, kwargs

    if policy.reconstructs:
        model.forward = _reconstructing(model, reference)
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(keep_rotary, with_kwargs=True) for m in model.modules()
                if hasattr(m, "layer_idx") and policy.needs_rotary]
    model.set_attn_implementation(NAME)
    try:
        yield reference
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
        if policy.reconstructs:
            del model.forward


def _reconstructing(model, reference: _Reference):
    """The model's forward, its prefill fed as [prompt, repeat instruction,
    prompt] (KVzip); after it, each head's slots the policy does not keep
    are masked (bias -inf) in the reference's rectangular cache."""
    from kvfx.integrations.reconstruct import reconstruction_call
    from kvfx.policies.kvzip import collecting

    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if reference.state:
            return original(*args, **kwargs)
        args, kwargs, valid, finish = reconstruction_call(reference.policy, model, args, kwargs)
        with collecting() as scores:
            out = original(*args, **kwargs)
        for layer, keep in reference.policy.kept_slots(scores, valid).items():
            bias, score = reference.state[layer]
            reference.state[layer] = (bias.masked_fill(~keep, float("-inf")), score)
        return finish(out)

    return forward
