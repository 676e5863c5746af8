"""Everything kvfx knows about Hugging Face transformers, in one place.

The backend and the passes see only FX graphs and tensors. What depends on
transformers' classes, argument names, mask shapes and error messages lives
here and in ``transformers_store`` (kvfx's own cache layer):
  * ``kv_pairs`` / ``cache_bytes``: the one walker of a cache (a transformers
    ``Cache``, with kvfx store layers or not, or a tuple of (k, v) pairs);
  * ``TransformersForward``: what ``kvfx.compile`` runs around each call of a
    transformers model (the store put in the call's cache, room made for the
    call's tokens, the padding check);
  * a process-wide patch, applied by ``install_patches`` (see
    ``kvfx.integrations``).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

from kvfx.runtime import state_of


# -- the cache walker ---------------------------------------------------------

def is_store(layer) -> bool:
    """Whether a cache layer is a kvfx slot store (``transformers_store.KvfxLayer``) that holds slots."""
    return type(layer).__name__ == "KvfxLayer" and layer.is_initialized


def cache_entries(cache) -> list:
    """Each filled layer of a transformers ``Cache`` (a kvfx store layer, or its
    (keys, values)) or of a tuple / list of (k, v) pairs (hand-written models)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)):
        return [e for e in map(layer_entry, layers) if e is not None]
    if isinstance(cache, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cache):
        return [tuple(p) for p in cache if all(isinstance(t, torch.Tensor) for t in p)]
    return []


def layer_entry(layer):
    """One transformers cache layer as ``cache_entries`` lists it, or None
    when it holds no keys (empty, linear attention, SSM state)."""
    if is_store(layer):
        return layer
    return (layer.keys, layer.values) if isinstance(getattr(layer, "keys", None), torch.Tensor) else None


def kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each filled layer; a kvfx store layer gives a copy of
    its rows as rectangles as long as its longest row (for inspection)."""
    return [(e.keys, e.values) if is_store(e) else e for e in cache_entries(cache)]


def state_tensors(keys: torch.Tensor) -> list[torch.Tensor]:
    state = state_of(keys)
    return [] if state is None else [state.slot_bias, state.slot_score, state.seen]


def entry_tensors(entry, state: bool = True) -> list[torch.Tensor]:
    """The tensors one layer holds: a store's pages and, with ``state``, its
    slot state and tables; (keys, values) and the state riding on them."""
    if is_store(entry):
        return [*entry.store.tensors(), entry.extent] if state else [entry.k_pages, entry.v_pages]
    k, v = entry
    return [k, v] + (state_tensors(k) if state else [])


def entry_bytes(entry, state: bool = True) -> int:
    """Bytes one layer holds (``entry_tensors``): a store's pages, used or not."""
    return sum(t.numel() * t.element_size() for t in entry_tensors(entry, state))


def cache_bytes(cache, state: bool = True) -> int:
    """Bytes the cache holds, summed over its layers (``entry_bytes``)."""
    return sum(entry_bytes(e, state) for e in cache_entries(cache))


def store_seen(kwargs):
    """The tokens-seen tensor of the first kvfx store layer in a call's cache, or None."""
    for layer in getattr(cache_of(kwargs), "layers", None) or ():
        if is_store(layer):
            return layer.seen
    return None


def cache_of(kwargs: dict):
    return kwargs.get("past_key_values", kwargs.get("cache"))


def output_cache(out):
    """The cache a model's output carries (``cache`` from transformers 5.2x, before that ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


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

def cache_argument(model) -> str:
    """The forward's name for the cache (``cache`` from transformers 5.2x, before that ``past_key_values``)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _new_tokens(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        x = kwargs.get(name)
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[1]
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return x.shape[1] if x is not None and x.dim() >= 2 else 1


def _store_unreadable(err: BaseException) -> Optional[str]:
    """What kvfx saw, when ``err`` (dynamo wraps a backend's error) is kvfx's
    StoreUnreadable."""
    from kvfx.integrations.transformers_store import StoreUnreadable

    from torch._dynamo.exc import TorchRuntimeError, Unsupported

    first = err
    for _ in range(8):
        if isinstance(err, StoreUnreadable):
            return str(err)
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
        if err is None:
            break
    if isinstance(first, (TorchRuntimeError, Unsupported)):  # dynamo could not trace the model's code around the store
        return f"dynamo could not trace the model with it ({type(first).__name__}: {str(first).splitlines()[0][:200]})"
    return None


def _all_full_attention(config) -> bool:
    types = getattr(config, "layer_types", None)
    return not types or all(t == "full_attention" for t in types)


class TransformersForward:
    """Runs one call of a ``kvfx.compile``d transformers model: puts kvfx's
    slot store in the call's cache (``transformers_store``), makes room in it
    for the call's tokens before the call and accounts for them after."""

    def __init__(self, model, backend, page: int, max_cache_bytes=None) -> None:
        self.model = model
        self.backend = backend
        self.page = page
        self.max_cache_bytes = max_cache_bytes
        self.cache_argument = cache_argument(model)
        self.disabled = ""   # why the store cannot serve this model, once a trace showed it
        self.n_layers = getattr(model.config, "num_hidden_layers", None)
        self._installed: tuple = (None, 0, [])   # (weakref to a cache, its layer count, its kvfx layers' indices)

    def prepare_cache(self, original: Callable) -> Callable:
        """``generate``'s cache set-up, then kvfx's store put in the cache it made
        (before ``generate`` sizes its first mask by that cache), sized to grow
        at once to the ``max_cache_length`` tokens generate will feed: one
        growth, one decode graph."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def prepare(*args, **kwargs):
            out = original(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:  # another transformers' signature: the forward installs the store
                return out
            planned = bound.get("max_cache_length")
            if isinstance(bound.get("model_kwargs"), dict):
                self._install(cache_of(bound["model_kwargs"]), planned if isinstance(planned, int) else -1)
            return out

        prepare._kvfx_planning = True
        return prepare

    def __call__(self, run: Callable, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "kvfx: a kvfx.compile'd forward is being traced by another torch.compile (generate() compiles the "
                "forward itself for a static cache unless generation_config.disable_compile is set, which "
                "kvfx.compile sets): the outer compile would bypass kvfx. Call the model without another compile.")
        layers = self._store_layers(args, kwargs)
        fresh = [i for i, layer in layers if not layer.is_initialized]
        if fresh or not layers:  # a prefill: the only call that reads the mask on the host
            self._check_padding(kwargs)
        policy = self.backend.policy
        if not layers:
            if policy.reconstructs and cache_of(kwargs) is not None:
                raise RuntimeError(f"kvfx: {type(policy).__name__} keeps each layer's slots in kvfx's slot store, which "
                                   f"this call's cache ({type(cache_of(kwargs)).__name__}) does not hold"
                                   + (f": {self.disabled}" if self.disabled else ""))
            return run(*args, **kwargs)
        reconstruction = None
        if fresh and policy.reconstructs:   # KVzip: [prompt, repeat instruction, prompt] in one prefill
            from kvfx.integrations.reconstruct import check_every_layer_held, reconstruction_call

            check_every_layer_held(policy, cache_of(kwargs), layers)
            args, kwargs, valid, finish = reconstruction_call(policy, self.model, args, kwargs)
            reconstruction = (valid, finish)
        new = _new_tokens(args, kwargs)
        if fresh and self.max_cache_bytes is not None:
            self._check_prefill_bytes(args, kwargs, fresh, new)
        if self.max_cache_bytes is not None:
            used = sum(layer.nbytes() for _, layer in layers)
            for _, layer in layers:
                used -= layer.nbytes()
                layer.reserve(new, policy, self.max_cache_bytes, used)
                used += layer.nbytes()
        else:  # most steps: every layer has room already (a check on host integers)
            for _, layer in layers:
                layer.reserve(new, policy)
        if policy.schedule == "continuous":
            for _, layer in layers:
                layer.prepare_step(new, policy)
        try:
            if reconstruction is None:
                out = run(*args, **kwargs)
            else:
                from kvfx.policies.kvzip import collecting

                with collecting() as scores:
                    out = run(*args, **kwargs)
        except Exception as err:
            why = _store_unreadable(err)
            if why is None or len(fresh) != len(layers):
                raise
            if reconstruction is not None:
                raise RuntimeError(f"kvfx: {type(policy).__name__} keeps each layer's slots in kvfx's slot store, "
                                   f"which cannot serve this model: {why}") from err
            return self._without_store(run, args, kwargs, why, fresh)
        if reconstruction is not None:
            from kvfx.integrations.reconstruct import keep_chosen

            valid, finish = reconstruction
            keep_chosen(policy, layers, scores, valid)
            out, new = finish(out), valid.shape[1]
        n_layers = self.n_layers or len(layers)
        for i, layer in layers:
            if not layer.is_initialized:
                continue  # a layer this call did not reach
            first = i in fresh
            slots = policy.budget_length(new, i, n_layers) if first and policy.schedule == "continuous" else None
            layer.advance(new, policy, first, slots)
        return out

    def _without_store(self, run: Callable, args: tuple, kwargs: dict, why: str, fresh: list[int]):
        """The model's attention cannot read kvfx's store (kvfx saw ``why``): put
        the cache's own layers back, stop installing the store for this model,
        and run the call on the cache transformers made."""
        from kvfx.integrations.transformers_store import uninstall

        uninstall(cache_of(kwargs), fresh)
        self.disabled = why
        mask, cache = kwargs.get("attention_mask"), cache_of(kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and not getattr(cache, "is_compileable", True):
            # generate built this 4-D mask only because kvfx's layers are compileable (a model that builds its
            # own masks, ProphetNet, fails on it): give the call the 2-D padding mask generate would have given
            from kvfx.ops import valid_slots

            kwargs = dict(kwargs, attention_mask=valid_slots(mask, mask.shape[0], mask.shape[-1], mask.device).long())
        warnings.warn(f"kvfx: this model keeps transformers' own cache layers, where kvfx rewrites what it "
                      f"recognises (its slot store cannot serve the model: {why})", stacklevel=3)
        return run(*args, **kwargs)

    def _check_prefill_bytes(self, args, kwargs, fresh: list, length: int) -> None:
        """Refuse, before the prefill allocates it, stores that would exceed
        max_cache_bytes, sized by the policy from the model's config (KV heads,
        head dim, dtype) and the held bytes of the cache's other layers."""
        from kvfx.integrations.transformers_store import CapacityError
        from kvfx.store import prefill_bytes

        config = self.model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads if hasattr(config, "hidden_size") else None)
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int) and isinstance(ids, torch.Tensor)):
            return  # the growth checks still apply
        policy, n_layers = self.backend.policy, config.num_hidden_layers
        element = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 4
        held = cache_bytes(cache_of(kwargs))
        needed = sum(prefill_bytes(policy, length, i, n_layers, ids.shape[0], kv_heads, 2 * head_dim * element,
                                   self.page) for i in fresh)
        if held + needed > self.max_cache_bytes:
            raise CapacityError(
                f"kvfx: max_cache_bytes={self.max_cache_bytes:,} would be exceeded: {policy!r} keeps {needed:,} bytes "
                f"of a {length}-token prompt in {len(fresh)} layer(s) (batch {ids.shape[0]}, {kv_heads} KV heads of "
                f"{head_dim}), beside {held:,} held already. Raise max_cache_bytes, shorten the prompt or lower the "
                "budget.")

    def _store_layers(self, args, kwargs) -> list:
        """The call's kvfx cache layers, installed in its cache (one is made when
        the call asks for a cache and brings none)."""
        cache = cache_of(kwargs)
        supports_dynamic = getattr(type(self.model), "_supports_default_dynamic_cache", lambda: True)()
        if cache is None and not args[1:] and kwargs.get("use_cache", getattr(self.model.config, "use_cache", False)) \
                and self._recognised() and supports_dynamic:  # (not for a model with a cache class of its own)
            from transformers import DynamicCache

            cache = kwargs[self.cache_argument] = DynamicCache(config=self.model.config)
        return self._install(cache)

    def _recognised(self) -> bool:
        # kvfx recognises these two forms of attention; any other leaves the model as it is
        return getattr(self.model.config, "_attn_implementation", None) in ("sdpa", "eager") and not self.disabled

    def _install(self, cache, planned: int = -1) -> list:
        from kvfx.integrations import transformers_store

        if not self._recognised():
            return []
        known, count, indices = self._installed
        layers = getattr(cache, "layers", None)
        if known is not None and cache is known() and isinstance(layers, list) and len(layers) == count and indices:
            found = [(i, layers[i]) for i in indices]
            if all(type(layer) is transformers_store.KvfxLayer and layer.is_initialized for _, layer in found):
                return found   # a decode step on the cache of the call before: its layers are kvfx's already
        if isinstance(layers, list) and not layers and getattr(cache, "layer_class_to_replicate", None) is not None \
                and _all_full_attention(self.model.config):
            # A cache made without a config adds layers as they are first written: add them now.
            layers.extend(transformers_store.KvfxLayer(self.page, planned)
                          for _ in range(self.model.config.num_hidden_layers))
        found = transformers_store.install(cache, self.page, planned)
        try:  # (weakly: a finished generation's cache must not stay alive here)
            self._installed = (weakref.ref(cache), len(layers) if isinstance(layers, list) else 0, [i for i, _ in found])
        except TypeError:
            self._installed = (None, 0, [])
        return found

    def _check_padding(self, kwargs) -> None:
        from kvfx.integrations.reconstruct import padding_mask

        policy = self.backend.policy
        valid = None if policy.supports_padding else padding_mask(kwargs.get("attention_mask"))
        if valid is not None and not bool(valid.all()):
            raise ValueError(
                f"kvfx: {policy!r} cannot compress a left-padded batch so that each row matches running it alone "
                "(its chunks start at each row's first token). Generate the rows one at a time, or pad none of them.")


# -- process-wide patches ---------------------------------------------------------

def guard_generate_trap(is_kvfx_backend: Callable[[Any], bool]) -> None:
    """The patch. ``torch.compile(model, backend=kvfx.backend(...)).generate(...)``
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
