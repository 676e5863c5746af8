"""KVzip's reconstruction call on a transformers model: the prefill of an
S-token prompt becomes one prefill of ``[prompt, repeat instruction, prompt]``
whose outputs are the first S positions'; after it, each layer's store keeps
the slots KVzip chose across all layers (``KVzip.kept_slots``)."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from kvfx.ops import valid_slots


def padding_mask(mask) -> torch.Tensor | None:
    """[B, S] bool: the real tokens of a prefill's ``attention_mask`` -- the
    2-D mask itself, or the last query's row of a 4-D one, or of the full
    attention layers' in a dict of masks per layer type (generate builds
    those for a compileable cache); None when there is none."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next((m for m in mask.values() if isinstance(m, torch.Tensor)), None))
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        return None
    return mask.bool() if mask.dim() == 2 else valid_slots(mask, mask.shape[0], mask.shape[-1], mask.device)


def reconstruction_call(policy, model, args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor, Callable]:
    """(args, kwargs) of the prefill of ``[prompt, policy.repeat, prompt]``,
    the prompt's real tokens [B, S], and a function that turns the call's
    output into the prompt's own (its logits at the prompt's positions)."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids, args = args[0], args[1:]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("kvfx: KVzip feeds the prompt's token ids a second time; this prefill brings "
                         f"{'inputs_embeds' if kwargs.get('inputs_embeds') is not None else 'no input_ids'}. "
                         "Pass input_ids.")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"kvfx: KVzip's prefill runs [prompt, repeat instruction, prompt] in one call; {flag}=True "
                             "would return that call's, not the prompt's. Ask for them without KVzip.")
    batch, length = ids.shape
    mask = padding_mask(kwargs.get("attention_mask"))
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -length:]
    repeat = torch.tensor(policy.repeat, dtype=ids.dtype, device=ids.device).expand(batch, -1)
    # The chat header is not repeated: the second copy starts ``prefix`` tokens in, and a padded row
    # masks what is left of its header there.
    again = (valid & (valid.long().cumsum(-1) > policy.prefix))[:, policy.prefix:]
    doubled = torch.cat([valid, torch.ones_like(repeat, dtype=torch.bool), again], dim=1).long()
    # Unpadded rows need no mask: the model's causal attention then takes its fused path.
    kwargs = dict(kwargs, input_ids=torch.cat([ids, repeat, ids[:, policy.prefix:]], dim=1),
                  attention_mask=None if bool(doubled.all()) else doubled)
    parameters = inspect.signature(model.forward).parameters
    if "position_ids" in parameters:
        kwargs["position_ids"] = (doubled.cumsum(-1) - 1).clamp(min=0)
    if "cache_position" in parameters or "cache_position" in kwargs:
        kwargs["cache_position"] = torch.arange(doubled.shape[1], device=ids.device)
    if "logits_to_keep" in parameters:
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, int):
            kwargs["logits_to_keep"] = torch.arange(length - keep if keep else 0, length, device=ids.device)
        elif keep.dtype == torch.bool:  # a mask over the prompt's positions
            kwargs["logits_to_keep"] = torch.nn.functional.pad(keep, (0, doubled.shape[1] - length))
        return args, kwargs, valid, lambda out: out      # positions index the prompt, which comes first

    def prompt_logits(out):
        out.logits = out.logits[:, :length]
        return out

    return args, kwargs, valid, prompt_logits


def check_every_layer_held(policy, cache, layers: list) -> None:
    """Refuse a cache with layers kvfx's store does not hold: they would keep
    the reconstruction's tokens (a sliding window keeps the last ones)."""
    held = {i for i, _ in layers}
    others = [f"{i} ({type(layer).__name__})" for i, layer in enumerate(getattr(cache, "layers", []))
              if i not in held]
    if others:
        raise ValueError(f"kvfx: {type(policy).__name__} feeds the prompt twice through every layer, and layers "
                         f"{', '.join(others)} keep transformers' own cache, which would hold the second copy's "
                         "tokens (kvfx leaves them alone: bounded, sliding or not recognised). Use another policy "
                         "for this model.")


def keep_chosen(policy, layers: list, scores: dict, valid: torch.Tensor) -> None:
    """Each kvfx cache layer of ``layers`` [(index, KvfxLayer)] keeps the slots
    ``policy`` chooses from every layer's reconstruction ``scores``."""
    from kvfx import store as slot_store

    indices = sorted(i for i, layer in layers if layer.is_initialized)
    if sorted(scores) != indices:
        raise RuntimeError(f"kvfx: KVzip scored layers {sorted(scores)} in the reconstruction call, but the cache's "
                           f"kvfx layers are {indices}: the sites and the cache's layers do not line up")
    kept = policy.kept_slots(scores, valid)
    for i, layer in layers:
        if layer.is_initialized:
            store = slot_store.keep_slots(layer.store, kept[i])
            store.seen.fill_(valid.shape[1])
            layer._set_store(store)
