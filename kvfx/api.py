"""The public surface: ``kvfx.backend`` and ``kvfx.compile``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import fx

from kvfx.cache_edits import follow_cache_edits
from kvfx.passes import Site, find_sites, rewrite
from kvfx.policies import Policy
from kvfx.runtime import StatefulGraph, state_of

log = logging.getLogger("kvfx")


def _register_log() -> None:
    """Make TORCH_LOGS="+kvfx" (or "kvfx") show kvfx's rewrites, like any torch log."""
    from torch._logging import _internal

    if "kvfx" not in _internal.log_registry.log_alias_to_log_qnames:
        _internal.register_log("kvfx", "kvfx")
        if os.environ.get("TORCH_LOGS"):
            _internal._init_logs()  # re-read TORCH_LOGS now that "kvfx" is a known name


def _one_handler_each() -> None:
    """torch can list "kvfx" twice when it (re)reads TORCH_LOGS and attach a
    handler each time: keep one of each kind so a rewrite is logged once."""
    kinds: set = set()
    for handler in list(log.handlers):
        if type(handler) in kinds:
            log.removeHandler(handler)
        kinds.add(type(handler))


def trace_structured_artifact(name: str, encoding: str, payload_fn) -> None:
    try:
        from torch._logging._internal import trace_structured_artifact as emit
    except ImportError:  # older torch: no structured-trace artifacts
        return
    emit(name, encoding, payload_fn)


_register_log()

INNER_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass
class GraphRecord:
    """What kvfx saw and did in one graph dynamo handed it."""

    index: int
    sites: list[Site]
    code_before: str
    code_after: str = ""
    graph_before: Optional[fx.Graph] = dataclasses.field(default=None, repr=False)
    graph_after: Optional[fx.Graph] = dataclasses.field(default=None, repr=False)

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.compressible]


@dataclasses.dataclass
class _Rewritable:
    """What rewriting one graph again for another policy needs (``Backend.set_policy``):
    the traced graph before any rewrite, fake inputs (never the real tensors of the
    first call: those would keep its cache alive) and dynamo's tracing context."""

    record: GraphRecord
    original: fx.GraphModule
    fake_inputs: list
    context: Any
    grad_enabled: bool  # aot_autograd builds an inference or a training graph from it
    runner: StatefulGraph


def compile_inner(inner: Union[str, Callable], gm: fx.GraphModule, example_inputs):
    """Compile ``gm`` with ``inner``: one of INNER_BACKENDS or a callable backend."""
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs)


class Backend:
    """A torch.compile backend: rewrite attention + KV cache for ``policy``,
    then hand the graph to ``inner``. ``records`` lists every graph compiled."""

    def __init__(self, policy: Policy, inner: Union[str, Callable] = "inductor") -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"kvfx.backend: policy must be a kvfx policy (e.g. kvfx.SnapKV(budget=0.5)), got {policy!r}")
        if isinstance(inner, str) and inner not in INNER_BACKENDS:
            raise ValueError(f"kvfx.backend: inner={inner!r} is invalid: inner must be one of {INNER_BACKENDS} or a callable backend")
        if not isinstance(inner, str) and not callable(inner):
            raise TypeError(f"kvfx.backend: inner must be one of {INNER_BACKENDS} or a callable backend, got {inner!r}")
        follow_cache_edits()
        self.policy = policy
        self.inner = inner
        self.records: list[GraphRecord] = []
        self._rewritable: list[_Rewritable] = []
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"kvfx.backend(policy={self.policy!r}, inner={self.inner!r})"

    def _inner(self, gm: fx.GraphModule, example_inputs):
        return compile_inner(self.inner, gm, example_inputs)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        before = _private_copy(gm)
        gm = _private_copy(gm)
        sites = find_sites(gm)
        record = GraphRecord(index=len(self.records), sites=sites, code_before=gm.code, graph_before=before.graph,
                             graph_after=gm.graph)
        self.records.append(record)
        if not any(s.compressible for s in sites):
            self._log(record)
            self._warn_untouched(sites)
            record.code_after = record.code_before
            return self._inner(gm, example_inputs)
        fake_inputs = _fake_inputs(before, example_inputs)
        plan = rewrite(gm, example_inputs, sites, self.policy)
        record.code_after = gm.code
        self._log(record)
        runner = StatefulGraph(self._inner(gm, plan.example_inputs), plan)
        if fake_inputs is not None:
            self._rewritable.append(_Rewritable(record, before, fake_inputs, torch._guards.TracingContext.try_get(),
                                                torch.is_grad_enabled(), runner))
        return runner

    def set_policy(self, policy: Policy) -> None:
        """Rewrite every graph compiled so far for ``policy``, without tracing the
        model again (dynamo's guards do not depend on the policy), so sweeping
        policies or budgets costs one trace. Caches compressed before the switch
        should not be continued: start a new generation."""
        if not isinstance(policy, Policy):
            raise TypeError(f"kvfx.set_policy: policy must be a kvfx policy (e.g. kvfx.SnapKV(budget=0.5)), got {policy!r}")
        self.policy = policy
        for entry in self._rewritable:
            gm = _private_copy(entry.original)
            sites = find_sites(gm)
            plan = rewrite(gm, entry.fake_inputs, sites, policy)
            with torch._guards.tracing(entry.context), torch.set_grad_enabled(entry.grad_enabled):
                compiled = self._inner(gm, plan.example_inputs)
            entry.runner.compiled, entry.runner.plan = compiled, plan
            entry.record.sites, entry.record.code_after, entry.record.graph_after = sites, gm.code, gm.graph
            self._log(entry.record)

    def _log(self, record: GraphRecord) -> None:
        """One line per site for TORCH_LOGS="+kvfx"; both graphs for tlparse."""
        _one_handler_each()
        for site in record.sites:
            if site.compressible:
                op = "kvfx.compress" if site.phase == "prefill" else "kvfx.attend"
                action = f"rewritten to {op}" + (f" ({site.note})" if site.note else "")
            else:
                action = f"left alone: {site.reason}"
            log.info("kvfx graph %d layer %s %s [%s attention, %s cache, %s]: %s", record.index, site.layer,
                     site.module, site.attention, site.cache, site.phase, action)
        trace_structured_artifact(f"kvfx_graph{record.index}_before", "string", lambda: record.code_before)
        trace_structured_artifact(f"kvfx_graph{record.index}_after", "string", lambda: record.code_after)

    def _warn_untouched(self, sites: list[Site]) -> None:
        if not sites:
            why = "no attention call was found in the traced graph"
        else:
            reasons = sorted({s.reason for s in sites})
            why = f"none of its {len(sites)} attention call(s) reads a compressible KV cache: " + "; ".join(reasons)
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"kvfx: graph left untouched, {why}", stacklevel=2)


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo keeps using the graph it hands over (its placeholders carry
    bookkeeping), so rewrite a copy."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out.args[0])
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def _fake_inputs(gm: fx.GraphModule, example_inputs) -> Optional[list]:
    """Dynamo's fake value of each graph input, or None when one is missing."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    if len(fakes) != len(example_inputs) or any(f is None for f in fakes):
        return None
    return fakes


def set_policy(model: Any, policy: Policy) -> None:
    """Switch a ``kvfx.compile``d model (or a ``kvfx.backend``) to ``policy`` without
    re-tracing: each compiled graph is rewritten again from its traced original."""
    be = model if isinstance(model, Backend) else getattr(model, "_kvfx_backend", None)
    if be is None:
        raise TypeError(f"kvfx.set_policy: model must be a model compiled with kvfx.compile or a kvfx.backend, got {type(model).__name__}")
    be.set_policy(policy)


def backend(policy: Policy, *, inner: Union[str, Callable] = "inductor") -> Backend:
    """A torch.compile backend that compresses the KV cache with ``policy``.

    Install it on the forward the model's generation loop calls::

        model.forward = torch.compile(model.forward, backend=kvfx.backend(policy))

    ``inner`` compiles the rewritten graph: "inductor" (default), "aot_eager",
    "eager", or any callable backend.
    """
    return Backend(policy, inner)


def compile(model: torch.nn.Module, policy: Policy, *, inner: Union[str, Callable] = "inductor", **compile_kwargs):
    """Install a kvfx-compiled forward on ``model`` (so ``model.generate`` uses
    it) and return the model. Positions follow tokens seen: when a caller
    passes a compressed cache but no ``position_ids``, they are filled in from
    the tokens the cache has absorbed, never from its (shorter) length."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"kvfx.compile: model must be a torch.nn.Module, got {type(model).__name__}")
    be = backend(policy, inner=inner)
    original = getattr(model, "_kvfx_original_forward", None) or model.forward
    compiled = torch.compile(original, backend=be, **compile_kwargs)
    accepts_positions = "position_ids" in inspect.signature(original).parameters

    @functools.wraps(original)
    def forward(*args, **kwargs):
        _check_padding(model, kwargs)
        _check_shared_mask(model, kwargs)
        _check_state_kept(kwargs)
        if _needs_single_tokens(args, kwargs):
            return _token_by_token(forward, model, args, kwargs)
        if accepts_positions and kwargs.get("position_ids") is None:
            positions = _positions_from_state(args, kwargs)
            if positions is not None:
                kwargs["position_ids"] = positions
        try:
            out = compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchRuntimeError as err:
            # Some models (Falcon; Llama under transformers 5.17 even for one new
            # token) materialise the shared mask even for SDPA.
            lengths = _layer_lengths(kwargs)
            if len(lengths) > 1 and any(word in str(err) for word in ("broadcast", "expand", "must match")):
                raise _uneven_layers_error(model, lengths, "this model materialises its attention mask") from err
            raise
        _mark_compressed(getattr(out, "past_key_values", None) or kwargs.get("past_key_values", kwargs.get("cache")))
        return out

    model.forward = forward
    model._kvfx_original_forward = original
    model._kvfx_backend = be
    return model


def _dynamic_layers(cache) -> list:
    return [(i, layer) for i, layer in enumerate(getattr(cache, "layers", None) or ())
            if type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)]


def _mark_compressed(cache) -> None:
    """Remember which layers of a transformers cache carry kvfx state."""
    layers = {i for i, layer in _dynamic_layers(cache) if state_of(layer.keys) is not None}
    if layers:
        cache._kvfx_layers = layers


def _check_state_kept(kwargs) -> None:
    """A cache kvfx compressed that comes back without its state was edited
    outside the graph: its slots no longer match the model's positions and
    mask, and merged slots lost their counts. Refuse rather than decode wrong."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    expected = getattr(cache, "_kvfx_layers", None)
    if not expected:
        return
    lost = [i for i, layer in _dynamic_layers(cache) if i in expected and state_of(layer.keys) is None]
    if lost:
        raise RuntimeError(
            f"kvfx: the compressed cache of layers {lost} was changed outside the compiled graph (a manual edit of "
            "its tensors): its per-slot state (slot bias, merge counts, tokens seen) is lost and attention would be "
            "wrong. kvfx follows transformers' reorder_cache, batch_select_indices and batch_repeat_interleave "
            "(beam search works); other edits are refused. (The same happens when dynamo reached its "
            "recompile_limit and ran the model's own forward: raise torch._dynamo.config.recompile_limit; "
            "TORCH_LOGS=recompiles shows why it recompiled.)")


def _layer_lengths(kwargs) -> set[int]:
    """Cache lengths of a transformers cache's full-attention layers."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return {layer.keys.shape[-2] for _, layer in _dynamic_layers(cache) if layer.keys.numel()}


def _uneven_layers_error(model, lengths: set[int], why: str) -> ValueError:
    return ValueError(
        f"kvfx: {model._kvfx_backend.policy!r} left the layers with different cache lengths {sorted(lengths)}, "
        f"and {why}: transformers builds one attention mask, sized for the first layer, for every layer. "
        "Use attn_implementation='sdpa' with an unpadded batch, or a policy with one budget for every layer "
        "(no per-layer plan, no exempt layers, no retrieval heads).")


def _needs_single_tokens(args, kwargs) -> bool:
    """Several new tokens on a cache whose layers differ in length: transformers
    materialises one [new, cached + new] mask for every layer, which fits only
    one of them; one token at a time it passes no mask at all."""
    if args or len(_layer_lengths(kwargs)) < 2:
        return False
    ids = kwargs.get("input_ids")
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1


_SLICED = ("input_ids", "position_ids", "cache_position")
_PASSED = ("past_key_values", "cache", "attention_mask", "use_cache", "logits_to_keep", "return_dict")


def _token_by_token(forward, model, args, kwargs):
    """Feed a multi-token step one token at a time (same attention: each token
    sees the cache and the tokens before it) and join the logits."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _SLICED + _PASSED)
    if unknown or kwargs.get("return_dict") is False:
        raise ValueError(
            f"kvfx: {model._kvfx_backend.policy!r} left the layers with different cache lengths "
            f"{sorted(_layer_lengths(kwargs))}, so kvfx feeds several new tokens one at a time, which it cannot do "
            f"with {unknown or ['return_dict=False']}: pass input_ids (and position_ids, cache_position, "
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
        out = forward(**step)
        logits.append(out.logits[:, -1:])
    joined = torch.cat(logits, dim=1)
    out.logits = joined[:, -keep:] if isinstance(keep, int) and keep > 0 else joined
    return out


def _check_padding(model, kwargs) -> None:
    policy = model._kvfx_backend.policy
    mask = kwargs.get("attention_mask")
    if not policy.supports_padding and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            f"kvfx: {policy!r} cannot compress a left-padded batch so that each row matches running it alone "
            "(its chunks start at each row's first token). Generate the rows one at a time, or pad none of them.")


def _check_shared_mask(model, kwargs) -> None:
    """Eager attention (and SDPA with padding) adds the shared mask as is, so
    layers of different lengths cannot trace: say so before dynamo fails."""
    lengths = _layer_lengths(kwargs)
    if len(lengths) < 2:
        return
    mask = kwargs.get("attention_mask")
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager":
        raise _uneven_layers_error(model, lengths, "attention is 'eager'")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        raise _uneven_layers_error(model, lengths, "the batch is padded")


def _positions_from_state(args, kwargs):
    """position_ids = tokens seen + arange(new tokens), from the first cache
    tensor that carries kvfx state; None when there is none."""
    keys = next((t for t in _walk_tensors((args, kwargs)) if state_of(t) is not None), None)
    if keys is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return None
    seen = state_of(keys).seen
    return (seen + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0).expand(ids.shape[0], -1)


def _walk_tensors(obj, depth: int = 0):
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _walk_tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _walk_tensors(item, depth + 1)
    elif hasattr(obj, "layers") and isinstance(getattr(obj, "layers"), (list, tuple)):  # transformers Cache
        for layer in obj.layers:
            yield from _walk_tensors(getattr(layer, "keys", None), depth + 1)


def _kvfx_backend_of(compiled_module) -> Any:
    fn = getattr(getattr(compiled_module, "dynamo_ctx", None), "callback", None)
    for _ in range(16):
        if isinstance(fn, Backend) or fn is None:
            return fn
        # dynamo's wrappers, then torch.compile's own wrapper (compiler_fn)
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    return None


def _guard_generate_trap() -> None:
    """``torch.compile(model, backend=kvfx.backend(...)).generate(...)`` runs the
    original module: the backend is never reached. Make that an error."""
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(OptimizedModule, "_kvfx_guarded", False):
        return
    original_getattr = OptimizedModule.__getattr__

    def __getattr__(self, name: str):
        if name == "generate" and _kvfx_backend_of(self) is not None:
            raise AttributeError(
                "kvfx: torch.compile(model, backend=kvfx.backend(...)) compiles model.__call__ only; "
                "model.generate() calls the original module, so the KV cache would not be compressed. "
                "Use kvfx.compile(model, policy), or model.forward = torch.compile(model.forward, backend=...)."
            )
        return original_getattr(self, name)

    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule._kvfx_guarded = True


_guard_generate_trap()


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``kvfx.compile``: the model's own forward again."""
    original = model.__dict__.pop("_kvfx_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
            model.__dict__.pop("forward", None)  # back to the class's own method
        else:
            model.forward = original
    model.__dict__.pop("_kvfx_backend", None)
    return model
