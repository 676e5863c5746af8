"""Find the attention calls of a dynamo FX graph and the KV cache each reads.

Each attention form and each cache form is a small recogniser returning what
it found or ``None``; ``find_sites`` combines them into one ``Site`` per
attention call, with ``reason`` saying why a site cannot be compressed. The
rewrite never re-discovers structure.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any, Optional

import torch
from torch import fx

import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx, whose store ops mark a kvfx cache)

SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax}
MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul}
CAT = {torch.cat, torch.concat, torch.concatenate}
DROPOUT = {torch.nn.functional.dropout, torch.dropout}
# Ops that only move data between heads/layouts (GQA repeats, K transposes, casts).
LAYOUT_METHODS = {"expand", "reshape", "view", "contiguous", "repeat_interleave", "transpose", "unsqueeze", "to", "type",
                  "float", "type_as", "permute", "clone"}
LAYOUT_FUNCS = {torch.reshape, torch.transpose, torch.repeat_interleave, torch.unsqueeze, torch.permute}
CAST_METHODS = {"to", "type", "float", "type_as", "half", "bfloat16"}


@dataclasses.dataclass
class Site:
    """One attention call and the KV cache it reads."""

    index: int                      # order of the attention call in the graph
    layer: Optional[int]            # from the module path (``...layers.3.self_attn`` -> 3)
    module: str                     # module path of the attention call, from the compiled frame's root module
    attention: str                  # "sdpa" | "eager"
    cache: str                      # "store" | "dynamic" | "sliding" | "static" | "none" | "unknown"
    phase: str = "-"                # "prefill" (cache starts empty) | "decode" (cache from an input)
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    gqa: str = "none"               # "native" (enable_gqa) | "repeat" (expand+reshape) | "none"
    scale: Optional[float] = None
    softcap: float = 0.0
    causal: bool = False
    reason: str = ""                # why not compressible; empty when it is
    note: str = ""                  # what the rewrite decided beyond the default (e.g. index reuse)
    bounded: Optional[int] = None   # slots a sliding-window layer keeps at most
    root: str = ""                  # dynamo's source of the module ``module`` is relative to, e.g. L['self']
    depth: Optional[int] = None     # layers in this site's stack, from the model (set by the backend)
    # FX nodes (not printed)
    node: Any = dataclasses.field(default=None, repr=False)        # attention output node
    q: Any = dataclasses.field(default=None, repr=False)
    k: Any = dataclasses.field(default=None, repr=False)           # the cache tensor attention reads (pre-GQA)
    v: Any = dataclasses.field(default=None, repr=False)
    mask: Any = dataclasses.field(default=None, repr=False)
    k_new: Any = dataclasses.field(default=None, repr=False)
    k_past: Any = dataclasses.field(default=None, repr=False)      # placeholder of the incoming cache (decode)
    v_past: Any = dataclasses.field(default=None, repr=False)
    k_out: Optional[int] = None     # index of the key write-back among the graph outputs
    v_out: Optional[int] = None
    store: Any = dataclasses.field(default=None, repr=False)       # the kvfx store op k/v are written with

    @property
    def compressible(self) -> bool:
        return not self.reason

    @property
    def op(self) -> str:
        """The kvfx op the rewrite puts at this site (after the prefill's
        attention, in place of the decode's)."""
        prefix = "kvfx.store_" if self.cache == "store" else "kvfx."
        return prefix + ("compress" if self.phase == "prefill" else "attend")


def _value(node) -> Any:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _method(node, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _is_layout(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in LAYOUT_METHODS:
        return True
    if node.op == "call_function" and node.target in LAYOUT_FUNCS:
        return True
    # x[:, :, None, :, :] -- the first half of HF's repeat_kv
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        return all(i is None or i is Ellipsis or i == slice(None) for i in node.args[1])
    return False


def strip_layout(node: fx.Node) -> fx.Node:
    """Walk up through GQA repeats, transposes and casts to the tensor itself."""
    while _is_layout(node):
        node = node.args[0]
    return node


def _number(node) -> Optional[float]:
    """A Python number, or a graph constant like ``torch.full([], c)``."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in {torch.full, torch.tensor}:
        fill = node.args[1] if node.target is torch.full else node.args[0]
        return float(fill) if isinstance(fill, (int, float)) else None
    return None


def layer_of(path: str) -> Optional[int]:
    found = re.findall(r"[.\[_](\d+)", path)
    return int(found[-1]) if found else None


ROOT_SOURCE = re.compile(r"^L\['\w+'\](\[\d+\])*")  # dynamo's L['self'], L['args'][0]


def _module_path(node: fx.Node) -> tuple[str, str]:
    """(root source, module path under it) of the module a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path = list(stack.values())[-1][0]
    root = ROOT_SOURCE.match(path)
    if root is None:
        return "", path
    return root.group(0), path[root.end():].lstrip(".")


# -- attention forms -------------------------------------------------------------

def _match_sdpa(node: fx.Node) -> Optional[dict]:
    if not _is_call(node, SDPA):
        return None
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    scale = node.kwargs.get("scale")
    qv = _value(q)
    if scale is None and qv is not None:
        scale = 1.0 / math.sqrt(qv.shape[-1])
    return dict(attention="sdpa", node=node, q=q, k_attn=k, v_attn=v, mask=mask, scale=scale, softcap=0.0,
                causal=bool(_arg(node, 5, "is_causal", False)), native_gqa=bool(node.kwargs.get("enable_gqa", False)))


def _match_eager(softmax: fx.Node) -> Optional[dict]:
    """matmul(q, k^T) [* or / scale] [softcap] [+ mask] -> softmax -> [cast, dropout] -> matmul(., v)."""
    if not (_is_call(softmax, SOFTMAX) or _method(softmax, {"softmax"})):
        return None
    # forward: probabilities -> output
    probs, out = softmax, None
    for _ in range(4):
        users = [u for u in probs.users if u.op != "output"]
        nxt = next((u for u in users if _is_call(u, MATMUL) or _method(u, {"matmul"})), None)
        if nxt is not None and nxt.args[0] is probs:
            out = nxt
            break
        step = next((u for u in users if _method(u, CAST_METHODS) or _is_call(u, DROPOUT)), None)
        if step is None:
            return None
        if _is_call(step, DROPOUT) and _number(_arg(step, 1, "p", 0.5)) not in (0.0, None) and _arg(step, 2, "training", True):
            return None
        probs = step
    if out is None:
        return None
    # backward: logits <- q @ k^T
    x = softmax.args[0]
    mask = None
    scale = 1.0
    softcap = 0.0
    for _ in range(8):
        if _method(x, CAST_METHODS):
            x = x.args[0]
        elif _is_call(x, {operator.add, torch.add, operator.iadd}) or _method(x, {"add", "add_"}):
            a, b = x.args[:2]
            if isinstance(b, fx.Node) and mask is None:
                mask, x = b, a
            else:
                return None
        elif _is_call(x, {operator.mul, torch.mul, operator.imul}) or _method(x, {"mul", "mul_"}):
            a, b = x.args[:2]
            inner = a if _number(b) is not None else b
            factor = _number(b) if _number(b) is not None else _number(a)
            if factor is None:
                return None
            if _is_call(inner, {torch.tanh}) or _method(inner, {"tanh"}):  # Gemma2 soft-capping: tanh(x / c) * c
                div = inner.args[0]
                if not (_is_call(div, {operator.truediv, torch.div}) or _method(div, {"div"})):
                    return None
                softcap, x = factor, div.args[0]
            else:
                scale, x = scale * factor, inner
        elif _is_call(x, {operator.truediv, torch.div, operator.itruediv}) or _method(x, {"div", "div_"}):
            factor = _number(x.args[1])
            if factor is None:
                return None
            scale, x = scale / factor, x.args[0]
        elif _is_call(x, MATMUL) or _method(x, {"matmul"}):
            q, kt = x.args[:2]
            if not (_method(kt, {"transpose", "mT"}) or _is_call(kt, {torch.transpose}) or _method(kt, {"permute"})):
                return None
            return dict(attention="eager", node=out, q=q, k_attn=kt.args[0], v_attn=out.args[1], mask=mask,
                        scale=scale, softcap=softcap, causal=False, native_gqa=False)
        else:
            return None
    return None


ATTENTION_FORMS = (_match_sdpa, _match_eager)


# -- cache forms -----------------------------------------------------------------

def _outputs(gm: fx.GraphModule) -> list:
    out = gm.graph.output_node().args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _is_empty(node) -> bool:
    val = _value(node)
    return val is not None and hasattr(val, "shape") and val.numel() == 0


def _slice_bound(index) -> Optional[int]:
    """``x[:, :, -7:]`` keeps at most 7 slots."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, slice) and isinstance(part.start, int) and part.start < 0 and part.stop is None:
            return -part.start
    return None


STORE_OPS = {"store_mark": "prefill", "store_read": "decode"}


def store_op(node) -> Optional[str]:
    """"store_mark" / "store_read" for the op a kvfx cache layer tags the k, v
    of a call with (kvfx.integrations.transformers_store), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    for name in STORE_OPS:
        packet = getattr(torch.ops.kvfx, name)
        if node.target is packet or node.target is packet.default:
            return name
    return None


def _store_of(node: fx.Node) -> Optional[fx.Node]:
    """The kvfx store op that tagged ``node`` (what attention reads as keys),
    or a tensor it is a layout view of: at prefill the keys were given to
    ``store_mark``; at decode they are ``store_read``'s first output."""
    while isinstance(node, fx.Node):
        if _is_call(node, {operator.getitem}) and node.args[1] == 0 and store_op(node.args[0]) == "store_read":
            return node.args[0]
        for user in node.users:
            if store_op(user) == "store_mark" and user.args[0] is node:
                return user
        if not _is_layout(node):
            return None
        node = node.args[0]
    return None


def _classify_cache(gm: fx.GraphModule, root: fx.Node) -> dict:
    """How the cache tensor ``root`` (what attention reads, before GQA) is kept."""
    outputs = _outputs(gm)
    if _is_call(root, CAT):
        parts, dim = root.args[0], _arg(root, 1, "dim", 0)
        val = _value(root)
        if len(parts) != 2 or val is None or val.dim() != 4 or dim not in (-2, 2):
            return dict(cache="unknown", reason="cache concatenation is not [B, H, S, D] along S")
        past, new = parts
        if _is_empty(past):
            phase, k_past = "prefill", None
        elif isinstance(past, fx.Node) and past.op == "placeholder":
            phase, k_past = "decode", past
        else:
            return dict(cache="unknown", reason="the cached part of the concatenation is computed in the graph")
        if root in outputs:
            return dict(cache="dynamic", phase=phase, k_past=k_past, k_new=new, out=outputs.index(root))
        for user in root.users:
            if user.op == "call_function" and user.target is operator.getitem and user in outputs:
                return dict(cache="sliding", phase=phase, bounded=_slice_bound(user.args[1]),
                            reason="sliding-window layer: its cache is already bounded, left as is")
        return dict(cache="unknown", phase=phase, reason="concatenated keys are not written back as a graph output")
    if root.op == "placeholder" or (_value(root) is not None and any(
            _method(u, {"index_copy_", "index_copy"}) or _is_call(u, {torch.index_copy, torch.ops.aten.index_copy_})
            for u in root.users)):
        mutated = any(_method(u, {"index_copy_", "copy_", "index_put_"}) or _is_call(u, {torch.index_copy})
                      for u in root.users)
        if mutated:
            return dict(cache="static", reason="static cache (written in place with index_copy_): cannot shrink")
        return dict(cache="unknown", reason="attention reads a graph input that is not concatenated with new tokens")
    return dict(cache="none", reason="no KV cache: keys are computed and dropped in this call")


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """One ``Site`` per attention call in ``gm``, in graph order."""
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        found = next((m for m in (f(node) for f in ATTENTION_FORMS) if m is not None), None)
        if found is None:
            continue
        k_root, v_root = strip_layout(found["k_attn"]), strip_layout(found["v_attn"])
        store = _store_of(found["k_attn"])
        if store is not None:  # the k, v [B, Hkv, S, D] a kvfx cache layer was given
            k_root, v_root = store.args[0], store.args[1]
        root, module = _module_path(found["node"])
        site = Site(index=len(sites), layer=layer_of(module), module=module, root=root, attention=found["attention"],
                    cache="unknown", node=found["node"], q=found["q"], k=k_root, v=v_root, mask=found["mask"],
                    scale=found["scale"], softcap=found["softcap"], causal=found["causal"])
        qv, kv = _value(site.q), _value(k_root)
        if qv is not None and kv is not None and qv.dim() == 4 and kv.dim() == 4:
            site.heads, site.kv_heads, site.head_dim = int(qv.shape[1]), int(kv.shape[1]), int(qv.shape[-1])
            if site.heads != site.kv_heads:
                site.gqa = "native" if found["native_gqa"] else "repeat"
        if store is not None:
            cache = dict(cache="store", phase=STORE_OPS[store_op(store)])
        else:
            cache = _classify_cache(gm, k_root)
        site.cache, site.phase, site.bounded = cache["cache"], cache.get("phase", "-"), cache.get("bounded")
        site.reason = cache.get("reason", "")
        if store is not None:
            site.store = store
            v_read = [u for u in store.users if _is_call(u, {operator.getitem}) and u.args[1] == 1]
            if strip_layout(found["v_attn"]) not in [strip_layout(v_root), *v_read]:
                site.reason = "values are not the ones written into the kvfx store with the keys"
        elif not site.reason:
            v_cache = _classify_cache(gm, v_root)
            if v_cache.get("cache") != "dynamic":
                site.reason = "values are not kept in the same kind of cache as keys"
            else:
                site.k_past, site.k_new, site.k_out = cache["k_past"], cache["k_new"], cache["out"]
                site.v_past, site.v_out = v_cache["k_past"], v_cache["out"]
        if not site.reason and not isinstance(site.scale, (int, float)):
            # torch.compile(dynamic=True) can trace a model's float attribute
            # (Gemma's query_pre_attn_scalar) as a graph value, not a constant.
            site.reason = "the softmax scale is a traced value, not a constant (compile without dynamic=True)"
        if not site.reason and site.heads is None:
            site.reason = "q/k are not 4-D [B, H, S, D]"
        if not site.reason and site.heads % site.kv_heads:
            site.reason = f"{site.heads} query heads do not divide into {site.kv_heads} KV heads"
        sites.append(site)
    return sites


def stray_stores(gm: fx.GraphModule, sites: list[Site]) -> list[str]:
    """The kvfx store ops of ``gm`` that no compressible site reads, each with
    what kvfx saw there: such a graph cannot run (a store is read only by
    kvfx's attention)."""
    claimed = {s.store for s in sites if s.compressible and s.store is not None}
    reasons = {s.store: s.reason for s in sites if s.store is not None and not s.compressible}
    stray = []
    for node in gm.graph.nodes:
        if store_op(node) and node not in claimed:
            module = _module_path(node)[1] or node.name
            stray.append(f"{module}: {reasons.get(node) or 'no attention call kvfx recognises reads its keys'}")
    return stray
