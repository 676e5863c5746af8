"""The public surface: ``kvfx.backend`` and ``kvfx.compile``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import re
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import fx

from kvfx import integrations
from kvfx.distributed import tensor_parallel
from kvfx.heads import needs_heads, with_retrieval_heads
from kvfx.integrations.transformers import TransformersForward, is_transformers_model, state_keys, store_seen
from kvfx.store import PAGE
from kvfx.passes import Site, assign_depths, find_sites, lend_policy_inputs, rewrite, stray_stores
from kvfx.passes.sites import module_path
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
    depths: list        # each site's stack depth, read from the model when it was traced


def compile_inner(inner: Union[str, Callable], gm: fx.GraphModule, example_inputs, mode: Optional[str] = None,
                  options: Optional[dict] = None):
    """Compile ``gm`` with ``inner``: one of INNER_BACKENDS or a callable
    backend. ``mode`` / ``options`` are torch.compile's, for Inductor (e.g.
    mode="reduce-overhead": CUDA graphs)."""
    if (mode or options) and inner != "inductor":
        raise ValueError(f"kvfx: torch.compile(mode={mode!r}, options={options!r}) applies to Inductor, but kvfx's "
                         f"inner compiler is {inner!r}: use kvfx.backend(policy, inner='inductor') (the default)")
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(mode) if mode else {}), **(options or {})}
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs)


class Backend:
    """A torch.compile backend: rewrite attention + KV cache for ``policy``,
    then hand the graph to ``inner``. ``records`` lists every graph compiled."""

    def __init__(self, policy: Policy, inner: Union[str, Callable] = "inductor",
                 model: Optional[torch.nn.Module] = None, forwards_prompts: bool = False) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"kvfx.backend: policy must be a kvfx policy (e.g. kvfx.SnapKV(budget=0.5)), got {policy!r}")
        if isinstance(inner, str) and inner not in INNER_BACKENDS:
            raise ValueError(f"kvfx.backend: inner={inner!r} is invalid: inner must be one of {INNER_BACKENDS} or a callable backend")
        if not isinstance(inner, str) and not callable(inner):
            raise TypeError(f"kvfx.backend: inner must be one of {INNER_BACKENDS} or a callable backend, got {inner!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"kvfx.backend: model must be the torch.nn.Module being compiled, got {type(model).__name__}")
        integrations.install_patches(lambda module: _kvfx_backend_of(module) is not None)
        # kvfx.compile's transformers forward runs each call: it can feed a prompt twice (KVzip)
        self.forwards_prompts = forwards_prompts
        self.inner = inner
        self.model = model
        self.policy = self._for_model(policy)
        self.records: list[GraphRecord] = []
        self._rewritable: list[_Rewritable] = []
        self._warned: set[str] = set()
        self._compile_options: dict = {}
        self._last_break = ""   # where dynamo broke the graph compiled last, if it broke

    def __repr__(self) -> str:
        return f"kvfx.backend(policy={self.policy!r}, inner={self.inner!r})"

    def _for_model(self, policy: Policy) -> Policy:
        """``policy`` completed for the model: RazorAttention's retrieval heads
        found where it names none; for a model split over ranks (transformers'
        tensor parallelism) this rank's heads and reductions across ranks."""
        if policy.reconstructs and not self.forwards_prompts:
            raise ValueError(f"kvfx: {type(policy).__name__} feeds the prompt a second time through the model's "
                             "forward, which only kvfx.compile's transformers forward does: use kvfx.compile(model, "
                             f"policy) on a transformers model (got {type(self.model).__name__ if self.model is not None else 'a bare backend'})")
        if self.model is None:
            if needs_heads(policy):
                raise ValueError("kvfx.backend: RazorAttention(retrieval_heads=None) finds its retrieval heads by "
                                 "probing the model: pass model= to kvfx.backend (or use kvfx.compile), or give "
                                 "retrieval_heads=... (() for none)")
            return policy
        placed = tensor_parallel(self.model, with_retrieval_heads(policy, self.model))
        if policy.reconstructs and placed is not policy:
            raise ValueError(f"kvfx: {type(policy).__name__} on a model split over ranks is not supported: each rank "
                             "would choose its slots from its own heads' scores alone")
        return placed

    def _inner(self, gm: fx.GraphModule, example_inputs):
        return compile_inner(self.inner, gm, example_inputs, **self._compile_options)

    def __call__(self, gm: fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None):
        # torch.compile(..., mode=, options=) hands these to a custom backend
        self._compile_options = {k: v for k, v in (("mode", mode), ("options", options)) if v}
        broke, self._last_break = self._last_break, _graph_break(gm)
        before = _private_copy(gm)
        gm = _private_copy(gm)
        sites = find_sites(gm)
        for site in sites:  # keys handed over from the graph before a break: say where it broke
            if broke and site.cache == "unknown" and site.reason.startswith("attention reads keys passed into"):
                site.reason = (f"a graph break split this attention block from its cache write ({broke}); "
                               "kvfx rewrites an attention block traced whole")
        lend_policy_inputs(sites, self.policy)
        record = GraphRecord(index=len(self.records), sites=sites, code_before=gm.code, graph_before=before.graph,
                             graph_after=gm.graph)
        self.records.append(record)
        stray = stray_stores(gm, sites)
        if stray:  # never compiled: kvfx.compile re-runs the call on transformers' own cache layers
            self._log(record)
            self.records.pop()
            from kvfx.integrations.transformers_store import StoreUnreadable

            raise StoreUnreadable("; ".join(stray))
        if not any(s.compressible for s in sites):
            self._log(record)
            self._warn_untouched(sites)
            record.code_after = record.code_before
            return self._inner(gm, example_inputs)
        self._warn_unknown_depth(assign_depths(sites, self._root_module))
        fake_inputs = _fake_inputs(before, example_inputs)
        plan, rewritten_inputs = rewrite(gm, example_inputs, sites, self.policy, inline_step=self.inner == "inductor")
        record.code_after = gm.code
        self._log(record)
        if not any(s.compressible for s in sites):  # the rewrite found each site a reason (a policy's limits)
            self._warn_untouched(sites)
        try:
            compiled, recompile = self._compiled_parts(gm, rewritten_inputs, plan)
        except Exception as err:  # never a crash deep in the inner compiler: leave the graph as the model wrote it
            return self._compile_unrewritten(record, before, example_inputs, sites, err)
        runner = StatefulGraph(compiled, plan, recompile)
        if fake_inputs is not None:
            self._rewritable.append(_Rewritable(record, before, fake_inputs, torch._guards.TracingContext.try_get(),
                                                torch.is_grad_enabled(), runner, [s.depth for s in sites]))
        return runner

    def _compiled_parts(self, gm: fx.GraphModule, inputs: list, plan) -> tuple:
        """The compiled graph, and for a graph that decodes over buffer stores
        (kvfx.buffers) a function compiling it for given store capacities
        (the graph compiled for the capacities of the first call instead)."""
        if not plan.buffer_decode:
            return self._inner(gm, inputs), None
        fake_mode = torch._guards.detect_fake_mode(inputs)
        context, grad = torch._guards.TracingContext.try_get(), torch.is_grad_enabled()
        first = len(inputs) - sum(3 if kind == "state" else 4 for kind in plan.input_kinds)
        positions, at = [], first
        for kind in plan.input_kinds:  # where each buffer store's k, v and bias sit among the inputs
            if kind == "buffer":
                positions.append(range(at, at + 3))
            at += 3 if kind == "state" else 4

        def recompile(capacities: tuple):
            sized = list(inputs)
            with fake_mode:
                for slots, where in zip(capacities, positions):
                    for i in where:
                        fake = inputs[i]
                        sized[i] = torch.empty(*fake.shape[:2], slots, *fake.shape[3:], dtype=fake.dtype,
                                               device=fake.device)
            with torch._guards.tracing(context), torch.set_grad_enabled(grad):
                return self._inner(gm, sized)

        recompile((1,) * len(positions))  # a graph the inner compiler cannot compile fails here, not at a call
        return None, recompile

    def _compile_unrewritten(self, record: GraphRecord, before: fx.GraphModule, example_inputs, sites, err):
        why = f"compiling kvfx's rewrite of it failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        for site in sites:
            if site.compressible:
                site.reason = why
        if any(s.cache == "store" for s in sites):  # the graph writes stores only the rewrite reads
            self.records.remove(record)
            from kvfx.integrations.transformers_store import StoreUnreadable

            raise StoreUnreadable(why) from err
        record.code_after, record.graph_after = record.code_before, before.graph
        self._log(record)
        self._warn_untouched(sites)
        return self._inner(before, example_inputs)

    def _root_module(self, source: str) -> Optional[torch.nn.Module]:
        """The module a site's path is relative to: the model given to the
        backend, else the object dynamo's source names in the compiled frame."""
        if self.model is not None:
            return self.model
        return _frame_object(source)

    def _warn_unknown_depth(self, sites: list[Site]) -> None:
        if not sites or not _depends_on_depth(self.policy):
            return
        why = (f"the layer count of {sorted({s.module or '?' for s in sites})} could not be read from the model, so "
               f"{self.policy!r} plans for the {sites[0].depth} layer(s) this graph holds; pass the model: "
               "kvfx.backend(policy, model=model), or use kvfx.compile(model, policy)")
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"kvfx: {why}", stacklevel=2)

    def set_policy(self, policy: Policy) -> None:
        """Rewrite every graph compiled so far for ``policy``, without tracing the
        model again (dynamo's guards do not depend on the policy), so sweeping
        policies or budgets costs one trace. Caches compressed before the switch
        should not be continued: start a new generation. Graphs compiled for a
        policy keeping equal rows decode in plain tensor code on the CPU (a
        view guarded on the store's page count); another policy's store can
        fail that guard and trace once more."""
        if not isinstance(policy, Policy):
            raise TypeError(f"kvfx.set_policy: policy must be a kvfx policy (e.g. kvfx.SnapKV(budget=0.5)), got {policy!r}")
        policy = self._for_model(policy)
        graphs = []
        for entry in self._rewritable:
            gm = _private_copy(entry.original)
            sites = find_sites(gm)
            for site, depth in zip(sites, entry.depths):
                site.depth = depth
            lend_policy_inputs(sites, policy)
            stray = stray_stores(gm, sites)
            if stray:  # before any graph changes: the model keeps running under the old policy
                raise ValueError(f"kvfx.set_policy: {policy!r} cannot run on a graph already compiled: "
                                 f"{'; '.join(stray)}; compile the model again for it")
            graphs.append((entry, gm, sites))
        self.policy = policy
        for entry, gm, sites in graphs:
            # the traced shapes are another policy's: no in-graph decode attention (its view needs them)
            plan, rewritten_inputs = rewrite(gm, entry.fake_inputs, sites, policy, inline_decode=False)
            with torch._guards.tracing(entry.context), torch.set_grad_enabled(entry.grad_enabled):
                compiled, recompile = self._compiled_parts(gm, rewritten_inputs, plan)
            entry.runner.__init__(compiled, plan, recompile)
            entry.record.sites, entry.record.code_after, entry.record.graph_after = sites, gm.code, gm.graph
            self._log(entry.record)

    def _log(self, record: GraphRecord) -> None:
        """One line per site for TORCH_LOGS="+kvfx"; both graphs for tlparse."""
        _one_handler_each()
        for site in record.sites:
            if site.compressible:
                action = f"rewritten to {site.op}" + (f" ({site.note})" if site.note else "")
            else:
                action = f"left alone: {site.reason}"
            log.info("kvfx graph %d layer %s %s [%s attention, %s cache, %s]: %s", record.index, site.layer,
                     site.module, site.attention, site.cache, site.phase, action)
        trace_structured_artifact(f"kvfx_graph{record.index}_before", "string", lambda: record.code_before)
        trace_structured_artifact(f"kvfx_graph{record.index}_after", "string", lambda: record.code_after)

    def _warn_untouched(self, sites: list[Site]) -> None:
        if not sites:
            why = "no attention call was found in the traced graph"
            if self._last_break:
                why += f" ({self._last_break})"
        else:
            reasons = sorted({s.reason for s in sites})
            why = f"none of its {len(sites)} attention call(s) reads a compressible KV cache: " + "; ".join(reasons)
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"kvfx: graph left untouched, {why}", stacklevel=2)


def _graph_break(gm: fx.GraphModule) -> str:
    """Where and why dynamo ended ``gm`` at a graph break ("" when it did not):
    the module its last traced call belongs to, the source line, dynamo's reason."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return ""
    frame = reason.user_stack[-1] if getattr(reason, "user_stack", None) else None
    where = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" if frame is not None else "?"
    modules = [module_path(n)[1] for n in gm.graph.nodes if n.meta.get("nn_module_stack")]
    text = str(reason.reason).strip().splitlines()[0][:160] if reason.reason else "unknown reason"
    return f"dynamo broke the graph after {modules[-1] if modules and modules[-1] else 'the model'}, at {where}: {text}"


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


_SOURCE = re.compile(r"L\['(\w+)'\]|\[(\d+)\]")


def _frame_object(source: str) -> Optional[torch.nn.Module]:
    """The module dynamo's ``source`` (``L['self']``, ``L['args'][0]``) names in
    the frame being compiled: its locals are reachable while the backend runs."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        obj: Any = InstructionTranslator.current_tx().output.local_scope
    except Exception:  # not inside dynamo, or another torch's internals
        return None
    for name, index in _SOURCE.findall(source):
        try:
            obj = obj[name] if name else obj[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return obj if isinstance(obj, torch.nn.Module) else None


def _depends_on_depth(policy: Policy) -> bool:
    """Whether the policy plans its layers by the model's depth (PyramidKV, exempt layers)."""
    lengths = lambda n: [policy.kept_length(4096, layer, n) for layer in range(n)]  # noqa: E731
    return lengths(4) != lengths(8)[:4]


def set_policy(model: Any, policy: Policy) -> None:
    """Switch a ``kvfx.compile``d model (or a ``kvfx.backend``) to ``policy`` without
    re-tracing: each compiled graph is rewritten again from its traced original."""
    be = model if isinstance(model, Backend) else getattr(model, "_kvfx_backend", None)
    if be is None:
        raise TypeError(f"kvfx.set_policy: model must be a model compiled with kvfx.compile or a kvfx.backend, got {type(model).__name__}")
    be.set_policy(policy)


def backend(policy: Policy, *, inner: Union[str, Callable] = "inductor",
            model: Optional[torch.nn.Module] = None) -> Backend:
    """A torch.compile backend that compresses the KV cache with ``policy``.

    Install it on the forward the model's generation loop calls::

        model.forward = torch.compile(model.forward, backend=kvfx.backend(policy))

    ``inner`` compiles the rewritten graph: "inductor" (default), "aot_eager",
    "eager", or any callable backend. ``model``: the module being compiled, for
    its layer count (by default read from the compiled frame's module).
    """
    return Backend(policy, inner, model)


def compile(model: torch.nn.Module, policy: Policy, *, inner: Union[str, Callable] = "inductor", page_size: int = PAGE,
            max_cache_bytes: Optional[int] = None, **compile_kwargs):
    """Install a kvfx-compiled forward on ``model`` (so ``model.generate`` uses
    it) and return the model. A transformers model's cache holds kvfx's slot
    store (pages of ``page_size`` slots); ``max_cache_bytes`` caps it: a call
    that would make the cache hold more raises before allocating. Positions
    follow tokens seen: when a caller passes a compressed cache but no
    ``position_ids``, they are filled in from the tokens the cache has
    absorbed, never from its (shorter) length."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"kvfx.compile: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"kvfx.compile: page_size={page_size!r} is invalid: page_size must be an int >= 1 (slots per page)")
    if max_cache_bytes is not None and (isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int)
                                        or max_cache_bytes < 1):
        raise ValueError(f"kvfx.compile: max_cache_bytes={max_cache_bytes!r} is invalid: max_cache_bytes must be an "
                         "int >= 1 (bytes), or None for no cap")
    be = Backend(policy, inner, model, forwards_prompts=is_transformers_model(model))
    _room_for_layer_frames(model)
    original = getattr(model, "_kvfx_original_forward", None) or model.forward
    model.forward = compiled_forward(model, be, original, page_size=page_size, max_cache_bytes=max_cache_bytes,
                                     **compile_kwargs)
    around = getattr(model.forward, "_kvfx_around", None)
    if isinstance(around, TransformersForward) and hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = around.prepare_cache(
            type(model)._prepare_cache_for_generation.__get__(model))
    model._kvfx_original_forward = original
    model._kvfx_backend = be
    config = getattr(model, "generation_config", None)
    if config is not None and hasattr(config, "disable_compile") and not hasattr(model, "_kvfx_disable_compile"):
        # generate() would compile the forward itself for a static cache, bypassing kvfx's backend.
        model._kvfx_disable_compile = config.disable_compile
        config.disable_compile = True
    return model


def _room_for_layer_frames(model: torch.nn.Module) -> None:
    """A model whose layer loop dynamo cannot trace (MPT) compiles one frame
    per layer, each specialised on its layer index: past dynamo's
    recompile_limit (8) the remaining layers would run eagerly, their caches
    uncompressed beside compressed ones, and the model's mask (sized by layer
    0) would no longer fit them. Give every layer, and its decode graph,
    room (a process-wide dynamo setting: raised, never lowered)."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    layers = getattr(get_text() if callable(get_text) else config, "num_hidden_layers", None)
    if isinstance(layers, int) and 4 * layers > torch._dynamo.config.recompile_limit:
        log.info("kvfx: torch._dynamo.config.recompile_limit raised to %d (%d layers)", 4 * layers, layers)
        torch._dynamo.config.recompile_limit = 4 * layers


def compiled_forward(model: torch.nn.Module, be: Backend, original: Callable, page_size: int = PAGE,
                     max_cache_bytes: Optional[int] = None, **compile_kwargs) -> Callable:
    """``original`` compiled with ``be``, wrapped as ``kvfx.compile`` installs it."""
    compiled = torch.compile(original, backend=be, **compile_kwargs)
    parameters = inspect.signature(original).parameters
    accepts_positions = "position_ids" in parameters
    accepts_cache_position = "cache_position" in parameters
    if is_transformers_model(model):
        around = TransformersForward(model, be, page_size, max_cache_bytes)
    else:
        around = _plain_call

    def run(*args, **kwargs):
        if accepts_positions and kwargs.get("position_ids") is None:
            positions = _positions_from_state(args, kwargs)
            if positions is not None:
                kwargs["position_ids"] = positions
                if accepts_cache_position and kwargs.get("cache_position") is None:
                    kwargs["cache_position"] = positions[0]
        return compiled(*args, **kwargs)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return around(run, args, kwargs)

    forward._kvfx_around = around
    return forward


def _plain_call(run: Callable, args: tuple, kwargs: dict):
    try:
        return run(*args, **kwargs)
    except Exception as err:
        if "refers to a single memory location" not in str(err):
            raise
        raise RuntimeError(
            "kvfx: this call writes several tokens into a cache buffer kvfx took over after the prompt (its module "
            "buffer is now an empty placeholder, stride 0, and kvfx holds the slots); dynamo cannot trace a "
            "multi-token write into it. After the prompt, write one token per call (gpt-fast's decode loop), or "
            "compile without kvfx for multi-token verification steps.") from err


def _positions_from_state(args, kwargs):
    """position_ids = tokens seen + arange(new tokens), from the first kvfx store
    layer or cache tensor that carries kvfx state; None when there is none."""
    seen = store_seen(kwargs)
    if seen is None:
        keys = state_keys(args, kwargs)
        if keys is None:
            return None
        seen = state_of(keys).seen
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return None
    return (seen + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0).expand(ids.shape[0], -1)


def _kvfx_backend_of(compiled_module) -> Any:
    fn = getattr(getattr(compiled_module, "dynamo_ctx", None), "callback", None)
    for _ in range(16):
        if isinstance(fn, Backend) or fn is None:
            return fn
        # dynamo's wrappers, then torch.compile's own wrapper (compiler_fn)
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    return None


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``kvfx.compile``: the model's own forward again."""
    original = model.__dict__.pop("_kvfx_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
            model.__dict__.pop("forward", None)  # back to the class's own method
        else:
            model.forward = original
    model.__dict__.pop("_kvfx_backend", None)
    if getattr(model.__dict__.get("_prepare_cache_for_generation"), "_kvfx_planning", False):
        del model.__dict__["_prepare_cache_for_generation"]
    if "_kvfx_disable_compile" in model.__dict__:
        model.generation_config.disable_compile = model.__dict__.pop("_kvfx_disable_compile")
    return model
