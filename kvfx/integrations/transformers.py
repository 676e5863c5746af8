"""Everything kvfx knows about Hugging Face transformers, in one place.

The backend and the passes see only FX graphs and tensors. What depends on
transformers' classes, argument names, mask shapes and error messages lives
here:
  * ``kv_pairs`` / ``cache_bytes``: the one walker of a cache (a transformers
    ``Cache`` or a tuple of (k, v) pairs);
  * ``TransformersForward``: the checks and fallbacks ``kvfx.compile`` runs
    around each call of a transformers model (padding, uneven layers, state
    lost to an outside edit, several new tokens on layers of different lengths);
  * two process-wide patches, applied by ``install_patches`` (see
    ``kvfx.integrations``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch

from kvfx.runtime import STATE_ATTR, SlotState, state_of


# -- the cache walker ---------------------------------------------------------

def kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers ``Cache`` or of a tuple /
    list of (k, v) pairs (hand-written models); [] for anything else."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)):
        return [(layer.keys, layer.values) for layer in layers
                if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    if isinstance(cache, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cache):
        return [tuple(p) for p in cache if all(isinstance(t, torch.Tensor) for t in p)]
    return []


def state_tensors(keys: torch.Tensor) -> list[torch.Tensor]:
    state = state_of(keys)
    return [] if state is None else [state.slot_bias, state.slot_score, state.seen]


def cache_bytes(cache, state: bool = True) -> int:
    """Bytes the cache holds: every layer's keys and values and, with ``state``,
    the kvfx slot state riding on them."""
    total = 0
    for k, v in kv_pairs(cache):
        for t in [k, v] + (state_tensors(k) if state else []):
            total += t.numel() * t.element_size()
    return total


def cache_of(kwargs: dict):
    return kwargs.get("past_key_values", kwargs.get("cache"))


def state_keys(args, kwargs):
    """The first cached key tensor in a call's arguments that carries kvfx state."""
    for obj in (*args, *kwargs.values()):
        for keys in [obj] if isinstance(obj, torch.Tensor) else [k for k, _ in kv_pairs(obj)]:
            if state_of(keys) is not None:
                return keys
    return None


def is_transformers_model(model) -> bool:
    module = sys.modules.get("transformers")  # never imported: cannot be one of its models
    return module is not None and isinstance(model, module.PreTrainedModel)


# -- around each call -----------------------------------------------------------

def _dynamic_layers(cache) -> list:
    return [(i, layer) for i, layer in enumerate(getattr(cache, "layers", None) or ())
            if type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)]


def _layer_lengths(kwargs) -> set[int]:
    """Cache lengths of a transformers cache's full-attention layers."""
    return {layer.keys.shape[-2] for _, layer in _dynamic_layers(cache_of(kwargs)) if layer.keys.numel()}


# transformers builds one mask for every layer; with layers of different
# lengths, tracing fails with one of these (Falcon; Llama on transformers 5.17).
_MASK_ERRORS = ("broadcast", "expand", "must match")
_SLICED = ("input_ids", "position_ids", "cache_position")
_PASSED = ("past_key_values", "cache", "attention_mask", "use_cache", "logits_to_keep", "return_dict")


class TransformersForward:
    """Runs one call of a ``kvfx.compile``d transformers model."""

    def __init__(self, model, backend) -> None:
        self.model = model
        self.backend = backend

    def __call__(self, run: Callable, args: tuple, kwargs: dict):
        self._check_padding(kwargs)
        self._check_shared_mask(kwargs)
        self._check_state_kept(kwargs)
        if self._needs_single_tokens(args, kwargs):
            return self._token_by_token(run, kwargs)
        try:
            out = run(*args, **kwargs)
        except torch._dynamo.exc.TorchRuntimeError as err:
            lengths = _layer_lengths(kwargs)
            if len(lengths) > 1 and any(word in str(err) for word in _MASK_ERRORS):
                raise self._uneven_layers_error(lengths, "this model materialises its attention mask") from err
            raise
        self._mark_compressed(getattr(out, "past_key_values", None) or cache_of(kwargs))
        return out

    def _uneven_layers_error(self, lengths: set[int], why: str) -> ValueError:
        return ValueError(
            f"kvfx: {self.backend.policy!r} left the layers with different cache lengths {sorted(lengths)}, "
            f"and {why}: transformers builds one attention mask, sized for the first layer, for every layer. "
            "Use attn_implementation='sdpa' with an unpadded batch, or a policy with one budget for every layer "
            "(no per-layer plan, no exempt layers, no retrieval heads).")

    def _check_padding(self, kwargs) -> None:
        policy = self.backend.policy
        mask = kwargs.get("attention_mask")
        if not policy.supports_padding and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                f"kvfx: {policy!r} cannot compress a left-padded batch so that each row matches running it alone "
                "(its chunks start at each row's first token). Generate the rows one at a time, or pad none of them.")

    def _check_shared_mask(self, kwargs) -> None:
        """Eager attention (and SDPA with padding) adds the shared mask as is, so
        layers of different lengths cannot trace: say so before dynamo fails."""
        lengths = _layer_lengths(kwargs)
        if len(lengths) < 2:
            return
        mask = kwargs.get("attention_mask")
        if getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "eager":
            raise self._uneven_layers_error(lengths, "attention is 'eager'")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise self._uneven_layers_error(lengths, "the batch is padded")

    @staticmethod
    def _mark_compressed(cache) -> None:
        """Remember which layers of a transformers cache carry kvfx state."""
        layers = {i for i, layer in _dynamic_layers(cache) if state_of(layer.keys) is not None}
        if layers:
            cache._kvfx_layers = layers

    @staticmethod
    def _check_state_kept(kwargs) -> None:
        """A cache kvfx compressed that comes back without its state was edited
        outside the graph: its slots no longer match the model's positions and
        mask, and merged slots lost their counts. Refuse rather than decode wrong."""
        cache = cache_of(kwargs)
        expected = getattr(cache, "_kvfx_layers", None)
        if not expected:
            return
        lost = [i for i, layer in _dynamic_layers(cache) if i in expected and state_of(layer.keys) is None]
        if lost:
            raise RuntimeError(
                f"kvfx: the compressed cache of layers {lost} was changed outside the compiled graph (a manual edit "
                "of its tensors): its per-slot state (slot bias, merge counts, tokens seen) is lost and attention "
                "would be wrong. kvfx follows transformers' reorder_cache, batch_select_indices and "
                "batch_repeat_interleave (beam search works); other edits are refused. (The same happens when "
                "dynamo reached its recompile_limit and ran the model's own forward: raise "
                "torch._dynamo.config.recompile_limit; TORCH_LOGS=recompiles shows why it recompiled.)")

    @staticmethod
    def _needs_single_tokens(args, kwargs) -> bool:
        """Several new tokens on a cache whose layers differ in length: transformers
        materialises one [new, cached + new] mask for every layer, which fits only
        one of them; one token at a time it passes no mask at all."""
        if args or len(_layer_lengths(kwargs)) < 2:
            return False
        ids = kwargs.get("input_ids")
        return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1

    def _token_by_token(self, run, kwargs):
        """Feed a multi-token step one token at a time (same attention: each token
        sees the cache and the tokens before it) and join the logits."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _SLICED + _PASSED)
        if unknown or kwargs.get("return_dict") is False:
            raise ValueError(
                f"kvfx: {self.backend.policy!r} left the layers with different cache lengths "
                f"{sorted(_layer_lengths(kwargs))}, so kvfx feeds several new tokens one at a time, which it cannot "
                f"do with {unknown or ['return_dict=False']}: pass input_ids (and position_ids, cache_position, "
                "attention_mask) only, or use a policy with one budget for every layer.")
        n = kwargs["input_ids"].shape[1]
        keep = kwargs.get("logits_to_keep") or 0
        mask = kwargs.get("attention_mask")
        logits, out = [], None
        for t in range(n):
            step = dict(kwargs, logits_to_keep=1) if "logits_to_keep" in kwargs else dict(kwargs)
            for name in _SLICED:
                if isinstance(kwargs.get(name), torch.Tensor):
                    step[name] = kwargs[name][..., t:t + 1]
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                step["attention_mask"] = mask[:, :mask.shape[1] - (n - 1 - t)]
            out = self(run, (), step)
            logits.append(out.logits[:, -1:])
        joined = torch.cat(logits, dim=1)
        out.logits = joined[:, -keep:] if isinstance(keep, int) and keep > 0 else joined
        return out


# -- process-wide patches ---------------------------------------------------------

_ROW_EDITS: dict[str, Callable] = {
    "reorder_cache": lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)),
    "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
    "batch_select_indices": lambda t, indices: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices],
}


def _carrying(method: Callable, edit: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, arg):
        keys = getattr(self, "keys", None)
        state = state_of(keys)
        method(self, arg)
        if state is not None and self.keys is not keys:
            setattr(self.keys, STATE_ATTR, SlotState(edit(state.slot_bias, arg), state.seen, edit(state.slot_score, arg)))
    wrapper._kvfx_wrapped = True
    return wrapper


def _refusing_crop(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if state_of(getattr(self, "keys", None)) is not None:
            raise ValueError(
                "kvfx: crop() on a compressed cache is not supported: its slots are no longer one per token, so "
                "removing the last N tokens (assisted or speculative decoding, DoLa) has no defined meaning. "
                "Generate without assistant_model / prompt lookup, or without kvfx.")
        return method(self, *args, **kwargs)
    wrapper._kvfx_wrapped = True
    return wrapper


def follow_cache_edits() -> None:
    """Patch 1. Beam search reorders cache rows (``reorder_cache``), generation
    utilities repeat or select rows (``batch_repeat_interleave``,
    ``batch_select_indices``): each replaces the key tensor and would drop the
    state riding on it, so the same row edit is applied to the state. ``crop``
    removes *tokens*, which a compressed cache no longer holds one slot each:
    it is refused. Caches kvfx never compressed behave as before."""
    try:
        from transformers import cache_utils
    except ImportError:
        return
    for cls in (cache_utils.CacheLayerMixin, cache_utils.DynamicLayer):
        for name, edit in _ROW_EDITS.items():
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_kvfx_wrapped", False):
                setattr(cls, name, _carrying(method, edit))
        crop = cls.__dict__.get("crop")
        if crop is not None and not getattr(crop, "_kvfx_wrapped", False):
            setattr(cls, "crop", _refusing_crop(crop))


def guard_generate_trap(is_kvfx_backend: Callable[[Any], bool]) -> None:
    """Patch 2. ``torch.compile(model, backend=kvfx.backend(...)).generate(...)``
    runs the original module, so the backend is never reached: make reading
    ``generate`` on such a compiled module an error that says what to do."""
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(OptimizedModule, "_kvfx_guarded", False):
        return
    original_getattr = OptimizedModule.__getattr__

    def __getattr__(self, name: str):
        if name == "generate" and is_kvfx_backend(self):
            raise AttributeError(
                "kvfx: torch.compile(model, backend=kvfx.backend(...)) compiles model.__call__ only; "
                "model.generate() calls the original module, so the KV cache would not be compressed. "
                "Use kvfx.compile(model, policy), or model.forward = torch.compile(model.forward, backend=...)."
            )
        return original_getattr(self, name)

    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule._kvfx_guarded = True
