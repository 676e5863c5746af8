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
    cache: str                      # store | dynamic | buffer | sliding | static | latent | none | unknown
    phase: str = "-"                # "prefill" (cache starts empty) | "decode" (cache from an input)
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    gqa: str = "none"               # "native" (enable_gqa) | "repeat" (expand+reshape) | "tile" (k.repeat) | "none"
    fold: bool = False              # queries are [B*H, S, D] (heads folded into the batch for bmm)
    scale: Optional[float] = None
    softcap: float = 0.0
    causal: bool = False
    reason: str = ""                # why not compressible; empty when it is
    note: str = ""                  # what the rewrite decided beyond the default (e.g. index reuse)
    inline: str = ""                # the function the rewrite wrote in the graph instead of an op (CPU decode)
    bounded: Optional[int] = None   # slots a sliding-window layer keeps at most
    root: str = ""                  # dynamo's source of the module ``module`` is relative to, e.g. L['self']
    depth: Optional[int] = None     # layers in this site's stack, from the model (set by the backend)
    # FX nodes (not printed)
    node: Any = dataclasses.field(default=None, repr=False)        # attention output node
    q: Any = dataclasses.field(default=None, repr=False)
    k: Any = dataclasses.field(default=None, repr=False)           # the cache's keys [B, Hkv, S, D] (pre-GQA)
    v: Any = dataclasses.field(default=None, repr=False)
    mask: Any = dataclasses.field(default=None, repr=False)         # additive or bool (True = attend) mask
    fill: Any = dataclasses.field(default=None, repr=False)         # masked_fill(cond, -inf) condition (True = masked)
    fill_keeps: bool = False        # fill is torch.where(cond, scores, -inf)'s condition (True = attend)
    sinks: Any = dataclasses.field(default=None, repr=False)        # sink logits joined to the scores (gpt-oss)
    head_bias: Any = dataclasses.field(default=None, repr=False)    # the model's per-head score bias (ALiBi, Doge)
    bias_from: str = ""             # what head_bias is computed from: "positions" (ALiBi) | "cache" (Doge)
    k_new: Any = dataclasses.field(default=None, repr=False)
    v_new: Any = dataclasses.field(default=None, repr=False)       # (buffer caches) the values written this call
    writes: tuple = dataclasses.field(default=(), repr=False)      # (buffer caches) the in-place writes of k and v
    seq_dim: int = 2                # (buffer caches) the sequence dim: 2 of [B, H, S, D], 1 of [B, S, H, D]
    k_past: Any = dataclasses.field(default=None, repr=False)      # placeholder of the incoming cache (decode)
    v_past: Any = dataclasses.field(default=None, repr=False)
    k_out: Optional[int] = None     # index of the key write-back among the graph outputs
    v_out: Optional[int] = None
    store: Any = dataclasses.field(default=None, repr=False)       # the kvfx store op k/v are written with
    latent: bool = False            # k, v are a latent [B, 1, S, r] and a rotary key [B, 1, S, dr] (MLA)
    score_k: Any = dataclasses.field(default=None, repr=False)     # latent: the per-head keys attention reads
    v_attn: Any = dataclasses.field(default=None, repr=False)      # latent: the per-head values attention reads
    out_proj: Any = dataclasses.field(default=None, repr=False)    # (weight node, stored transposed) of o_proj
    rotary: Any = dataclasses.field(default=None, repr=False)      # rotary_of's dict, or "none" (unrotated q)

    @property
    def compressible(self) -> bool:
        return not self.reason

    @property
    def op(self) -> str:
        """The kvfx op the rewrite puts at this site (after the prefill's
        attention, in place of the decode's), or the plain function it
        wrote in the graph instead."""
        if self.inline:
            return self.inline
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
    if head_tiling(node) is not None:  # the site records it: its heads are tiled, not interleaved (gqa="tile")
        return True
    # x[:, :, None, :, :] -- the first half of HF's repeat_kv
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        return all(i is None or i is Ellipsis or i == slice(None) for i in node.args[1])
    return False


def head_tiling(node) -> Optional[int]:
    """r when ``node`` is ``x.repeat(1, r, 1, 1)`` of 4-D keys or values: KV
    heads tiled, so query head h reads KV head h % Hkv (JetMoE), where GQA's
    repeat_kv interleaves them (h // r)."""
    if not _method(node, {"repeat"}):
        return None
    reps = node.args[1:]
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
        reps = tuple(reps[0])
    if len(reps) == 4 and list(reps[:1]) + list(reps[2:]) == [1, 1, 1] and isinstance(reps[1], int):
        return reps[1]
    return None


def _tiled(node) -> bool:
    """Whether the layout chain above ``node`` tiles its heads (``head_tiling``)."""
    while _is_layout(node):
        if head_tiling(node) is not None:
            return True
        node = node.args[0]
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


def module_path(node: fx.Node) -> tuple[str, str]:
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
    return dict(attention="sdpa", node=node, q=q, k_attn=k, v_attn=v, masks=[mask] if mask is not None else [],
                fill=None, fill_keeps=False, sinks=None, scale=scale, softcap=0.0,
                causal=bool(_arg(node, 5, "is_causal", False)), native_gqa=bool(node.kwargs.get("enable_gqa", False)))


def _match_eager(softmax: fx.Node) -> Optional[dict]:
    """matmul(q, k^T) [* or / scale] [softcap] [+ mask] -> softmax -> [cast, dropout] -> matmul(., v)."""
    if not (_is_call(softmax, SOFTMAX) or _method(softmax, {"softmax"})):
        return None
    # forward: probabilities -> output
    probs, out, sinks_dropped = softmax, None, False
    for _ in range(4):
        users = [u for u in probs.users if u.op != "output"]
        nxt = next((u for u in users if _is_call(u, MATMUL) or _method(u, {"matmul", "bmm"})), None)
        if nxt is not None and nxt.args[0] is probs:
            out = nxt
            break
        drop = next((u for u in users if _is_call(u, {operator.getitem}) and _drops_last(u.args[1])), None)
        if drop is not None:  # gpt-oss: probs[..., :-1] drops the sink column
            probs, sinks_dropped = drop, True
            continue
        step = next((u for u in users if _method(u, CAST_METHODS) or _is_call(u, DROPOUT) or _is_layout(u)), None)
        if step is None:
            return None
        if _is_call(step, DROPOUT) and _number(_arg(step, 1, "p", 0.5)) not in (0.0, None) and _arg(step, 2, "training", True):
            return None
        probs = step
    if out is None:
        return None
    # backward: logits <- q @ k^T
    x = softmax.args[0]
    masks: list = []  # additive score modifiers: the attention mask, a position bias
    fill = sinks = None
    fill_keeps = False  # fill's True means keep (torch.where), not mask out (masked_fill)
    scale = 1.0
    softcap = 0.0
    for _ in range(12):
        if _method(x, CAST_METHODS) or _is_layout(x):
            x = x.args[0]
        elif (_is_call(x, {torch.max, torch.maximum}) and len(x.args) == 2 and _number(x.args[1]) is not None
              and _number(x.args[1]) < -1e4):
            x = x.args[0]  # XGLM: max(scores, lowest), a clamp that changes no finite score
        elif (_is_call(x, {operator.sub, torch.sub}) or _method(x, {"sub"})) and _reduces(x.args[1], x.args[0]):
            x = x.args[0]  # x - x.max(-1).values: the softmax is shift-invariant
        elif _is_call(x, CAT) and sinks_dropped and len(x.args[0]) == 2 and _arg(x, 1, "dim", 0) in (-1, 3):
            x, sinks = x.args[0]  # cat([scores, sink logits], -1)
        elif _is_call(x, {torch.where}) and len(x.args) == 3 and _number(x.args[2]) is not None:
            if fill is not None or _number(x.args[2]) > -1e4:  # GPT-Neo: where(causal, scores, lowest)
                return None
            fill, fill_keeps, x = x.args[0], True, x.args[1]
        elif _is_call(x, {torch.masked_fill}) or _method(x, {"masked_fill", "masked_fill_"}):
            value = _number(_arg(x, 2, "value"))
            if fill is not None or value is None or value > -1e4:  # -inf, or the dtype's lowest value
                return None
            fill, x = x.args[1], x.args[0]  # True = masked out
        elif _is_call(x, {operator.add, torch.add, operator.iadd}) or _method(x, {"add", "add_"}):
            a, b = x.args[:2]
            if not isinstance(b, fx.Node):
                return None
            masks.append(b)
            x = a
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
        elif _is_call(x, MATMUL) or _method(x, {"matmul", "bmm"}) or _is_call(x, {torch.baddbmm}) or \
                _method(x, {"baddbmm"}):
            if "baddbmm" in str(x.target):  # BLOOM: bias.baddbmm(q, k^T, beta=1, alpha=scale)
                q, kt = _arg(x, 1, "batch1"), _arg(x, 2, "batch2")
                factor, beta = _number(x.kwargs.get("alpha", 1.0)), _number(x.kwargs.get("beta", 1.0))
                if factor is None or beta not in (0.0, 1.0):
                    return None
                if beta and not _is_zeros(x.args[0]):  # GPT-NeoX-Japanese adds a zeros tensor: no bias
                    masks.append(x.args[0])
                scale *= factor
            else:
                q, kt = x.args[:2]
            if not (_method(kt, {"transpose", "mT"}) or _is_call(kt, {torch.transpose}) or _method(kt, {"permute"})):
                return None
            if sinks_dropped != (sinks is not None):
                return None
            v_attn = out.args[1]
            scaled = _sink_scaled(out, softmax.args[0]) if sinks is None else None
            if scaled is not None:  # Granite-SWA: out * sigmoid(logsumexp(logits) - sinks)
                out, sinks = scaled
            return dict(attention="eager", node=out, q=q, k_attn=kt.args[0], v_attn=v_attn, masks=masks,
                        fill=fill, fill_keeps=fill_keeps, sinks=sinks, scale=scale, softcap=softcap, causal=False,
                        native_gqa=False)
        else:
            return None
    return None


def _is_zeros(node) -> bool:
    """``node`` is a freshly made tensor of zeros."""
    return _is_call(node, {torch.zeros, torch.zeros_like}) or _method(node, {"new_zeros", "zero_"})


def _sink_scaled(out: fx.Node, logits: fx.Node) -> Optional[tuple]:
    """(the scaled output, the sink logits) when ``out`` is multiplied by
    sigmoid(logsumexp(logits) - sinks) (a sink applied after the softmax)."""
    users = list(out.users)
    if len(users) != 1 or not (_is_call(users[0], {operator.mul, torch.mul}) or _method(users[0], {"mul"})):
        return None
    scaled = users[0]
    factor = scaled.args[1] if scaled.args[0] is out else scaled.args[0]
    for _ in range(6):  # back through unsqueeze, casts and the sigmoid to the subtraction
        if not isinstance(factor, fx.Node):
            return None
        if _is_call(factor, {operator.sub, torch.sub}) or _method(factor, {"sub"}):
            lse = factor.args[0]
            if (_is_call(lse, {torch.logsumexp}) or _method(lse, {"logsumexp"})) and lse.args[0] is logits:
                return scaled, factor.args[1]
            return None
        if not (_method(factor, CAST_METHODS | {"unsqueeze", "sigmoid"}) or _is_call(factor, {torch.sigmoid})):
            return None
        factor = factor.args[0]
    return None


def _drops_last(index) -> bool:
    """``[..., :-1]``: every slot but the last along the last dim."""
    parts = index if isinstance(index, tuple) else (index,)
    last = parts[-1]
    return (isinstance(last, slice) and last.start is None and last.stop == -1 and last.step is None
            and all(p is Ellipsis or p == slice(None) for p in parts[:-1]))


def _reduces(node, source) -> bool:
    """``node`` is a max/amax/logsumexp of ``source`` (possibly ``.values``/detached)."""
    for _ in range(3):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "call_function" and node.target is operator.getitem or _method(node, {"detach"}):
            node = node.args[0]
        elif _is_call(node, {torch.max, torch.amax, torch.logsumexp}) or _method(node, {"max", "amax", "logsumexp"}):
            return node.args[0] is source
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
            node = node.args[0]  # x.max(-1).values
        else:
            return False
    return False


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


IN_PLACE_WRITES = {"index_copy_", "copy_", "index_put_", "scatter_", "__setitem__"}


IN_PLACE_CALLS = {operator.setitem, torch.index_copy, torch.ops.aten.index_copy_, torch.ops.aten.index_put_}


def _in_place_writes(node: fx.Node) -> list:
    """The nodes that write into ``node`` in place (``node[i] = x``, ``index_copy_``, ...)."""
    return [u for u in node.users
            if u.args and u.args[0] is node and (_is_call(u, IN_PLACE_CALLS) or _method(u, IN_PLACE_WRITES))]


def _writes_in_place(node: fx.Node) -> Optional[str]:
    """How ``node`` (a buffer) is written in place in this graph, if it is."""
    for user in _in_place_writes(node):
        if _is_call(user, {operator.setitem}):
            index = user.args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, fx.Node) for p in parts):
                return "index assignment cache[..., input_pos] = k (gpt-fast's KVCache)"
            return "slice assignment cache[:b, start:start+n] = k (Meta's reference Llama)"
        name = user.target if isinstance(user.target, str) else user.target.__name__
        return f"{name} (as transformers' StaticCache does)" if "index_copy" in name else name
    return None


def _seq_cat(node) -> Optional[fx.Node]:
    """``node`` if it is a concatenation along a sequence dim (dim 1 of a 3-D or
    dim 2 of a 4-D tensor), else None."""
    if not _is_call(node, CAT):
        return None
    val, dim = _value(node), _arg(node, 1, "dim", 0)
    if val is None or val.dim() not in (3, 4):
        return None
    return node if dim % val.dim() == val.dim() - 2 else None


def _form_concatenated(gm, k_attn, root, outputs) -> Optional[dict]:
    """``torch.cat([past, new], dim=-2)``, written back as a graph output
    (transformers' DynamicCache, tuple caches at decode)."""
    if not _is_call(root, CAT):
        return None
    parts, dim = root.args[0], _arg(root, 1, "dim", 0)
    val = _value(root)
    if val is not None and val.dim() == 4 and dim in (-1, 3):
        return None  # keys assembled from parts along head_dim: see _form_latent
    if len(parts) != 2 or val is None or val.dim() != 4 or dim not in (-2, 2):
        shape = list(val.shape) if val is not None else "?"
        return dict(cache="unknown", reason=f"keys are concatenated along dim {dim} of a {shape} tensor, not along "
                                            "the sequence dim of [B, H, S, D]")
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


def _form_returned(gm, k_attn, root, outputs) -> Optional[dict]:
    """The prompt's keys returned as they are, to be concatenated onto next
    call (nanoGPT/minGPT's ``present = (k, v)``, a cache kept on a module
    attribute or in a list dynamo writes back)."""
    node = k_attn
    while isinstance(node, fx.Node):
        val = _value(node)
        if node in outputs and val is not None and val.dim() == 4:
            return dict(cache="dynamic", phase="prefill", k=node, k_past=None, k_new=node, out=outputs.index(node))
        if not _is_layout(node):
            return None
        node = node.args[0]
    return None


def _form_buffer(gm, k_attn, root, outputs) -> Optional[dict]:
    """A preallocated buffer written in place and read whole or by a slice
    (gpt-fast's KVCache, Meta's reference Llama, torchtune, HF StaticCache
    under the bare backend)."""
    buffer = root
    if _is_call(root, {operator.getitem}) and isinstance(root.args[0], fx.Node):
        buffer = root.args[0]
    how = _writes_in_place(buffer)
    if buffer.op not in ("placeholder", "get_attr") and how is None:
        return None
    if how is None:
        return dict(cache="unknown", reason="attention reads keys passed into this call (a graph input) that it "
                                            "neither extends nor writes back: kvfx cannot tell what owns them")
    val = _value(buffer)
    shape = list(val.shape) if val is not None else "?"
    write, seq_dim = _append_write(buffer)
    if write is not None and buffer.op == "placeholder" and (root is buffer or _reads_prefix(root, buffer, seq_dim)):
        # a buffer kvfx emptied after the prompt has no memory along the sequence (kvfx.buffers)
        phantom = val.shape[seq_dim] > 1 and val.stride(seq_dim) == 0
        return dict(cache="buffer", phase="decode" if phantom else "prefill", k=buffer, k_new=write.args[2],
                    write=write, seq_dim=seq_dim)
    if "index_copy" in how:
        why = ("kvfx.compile puts kvfx's slot store in place of transformers' cache layers; under the bare backend "
               "the buffer stays as it is")
    else:
        why = ("kvfx takes over a buffer written once per call at the sequence positions of [B, H, S, D] or "
               "[B, S, H, D], all heads and the whole head_dim, and read whole or up to the tokens written")
    return dict(cache="static", reason=f"preallocated cache buffer {shape} written in place by {how}: {why}")


def _append_write(buffer: fx.Node) -> tuple[Optional[fx.Node], int]:
    """The one write of a call into a 4-D cache buffer, and the buffer's
    sequence dim: ``buffer[:, :, positions] = k`` into [B, H, S, D]
    (gpt-fast, torchtune: positions a 1-D tensor) or ``buffer[:b, start:end]
    = k`` into [B, S, H, D] (Meta's reference Llama)."""
    writes = _in_place_writes(buffer)
    if len(writes) != 1 or not _is_call(writes[0], {operator.setitem}) or _value(buffer).dim() != 4:
        return None, -1
    index, new = writes[0].args[1], _value(writes[0].args[2])
    if not isinstance(index, tuple) or new is None or new.dim() != 4:
        return None, -1
    if len(index) == 3 and index[0] == slice(None) and index[1] == slice(None):
        positions = _value(index[2])
        if positions is not None and positions.dim() == 1 and not positions.dtype.is_floating_point:
            return writes[0], 2
    if len(index) == 2 and all(isinstance(part, slice) and part.step is None for part in index) and \
            index[0].start is None:
        return writes[0], 1
    return None, -1


def _reads_prefix(read: fx.Node, buffer: fx.Node, seq_dim: int) -> bool:
    """``read`` is ``buffer[:b, :end]`` (Meta: the slots written so far)."""
    index = read.args[1] if _is_call(read, {operator.getitem}) and read.args[0] is buffer else None
    return (seq_dim == 1 and isinstance(index, tuple) and len(index) == 2
            and all(isinstance(part, slice) and part.start is None and part.step is None for part in index))


def _sources(node: fx.Node, limit: int = 160):
    """What ``node``'s value is computed from within one attention block: its
    ancestors and the values written in place into any of them (HF's DeepSeek
    fills ``key_states = new_empty(...)`` by slice assignment), never crossing
    an attention call (a previous layer's)."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        inputs = list(n.all_input_nodes)
        views = [n] + [u for u in n.users if u.args and u.args[0] is n and _is_call(u, {operator.getitem})]
        for view in views:  # in-place writes into n or a slice of it: their values flow into n
            for write in _in_place_writes(view):
                inputs += [a for a in write.all_input_nodes if a is not view]
        for a in inputs:
            if a not in seen and not _is_attention_call(a):
                seen.add(a)
                todo.append(a)
                yield a


def _is_attention_call(node) -> bool:
    """An attention call or one of its matmuls: where an attention block's
    inputs end (keys are projected with linear layers, not matmuls)."""
    return _is_call(node, SDPA | SOFTMAX | MATMUL) or _method(node, {"softmax", "matmul", "bmm", "baddbmm"})


def _form_latent(gm, k_attn, root, outputs) -> Optional[dict]:
    """Multi-head latent attention: per-head keys computed every call from a
    cache that holds something else: a low-rank latent [B, (1,) S, r] and a
    shared rotary key (DeepSeek-V2/V3, Kimi, MiniCPM3 in transformers)."""
    cached, store = [], None
    for a in _sources(root):
        for user in a.users:
            if store_op(user) == "store_mark" and a in user.args[:2]:
                cached.append(a)
                store = user
        if _is_call(a, {operator.getitem}) and store_op(a.args[0]) == "store_read":
            cached.append(a)
            store = a.args[0]
        elif a in outputs and _value(a) is not None and _value(a).dim() in (3, 4):
            cached.append(a)
    if not cached:
        return None  # a rotary embedding's halves, say: no cache behind them
    shapes = " + ".join(dict.fromkeys(str(list(_value(a).shape)) for a in cached))
    if store is not None:
        return dict(cache="latent", store=store,
                    reason=f"the keys attention reads are computed every call from the cache {shapes} (multi-head "
                           "latent attention or another expansion): kvfx's slot store holds the keys attention "
                           "reads only")
    parts = [p for p in (_latent_part(a, outputs) for a in cached) if p is not None]
    if len(parts) != 2 or any(_static(_value(p["k"]).shape[1]) != 1 for p in parts) or \
            parts[0]["phase"] != parts[1]["phase"]:
        return dict(cache="latent", reason=f"the keys attention reads are computed every call from the cache "
                                           f"{shapes} (not the cache itself or a GQA repeat of it); kvfx compresses "
                                           "such a cache when it is a latent and a rotary key, each [B, 1, S, r]")
    k, v = sorted(parts, key=lambda p: p["out"])
    return dict(cache="dynamic", latent=True, phase=k["phase"], k=k["k"], k_past=k["past"], k_new=k["new"],
                out=k["out"], v=v["k"], v_past=v["past"], v_out=v["out"])


def _latent_part(node: fx.Node, outputs: list) -> Optional[dict]:
    """One tensor of a latent cache: [B, 1, S, r] concatenated along S (or
    returned as it is at the prompt) and written back."""
    val = _value(node)
    if node not in outputs or val is None or val.dim() != 4:
        return None
    if _seq_cat(node) is not None and len(node.args[0]) == 2:
        past, new = node.args[0]
        if _is_empty(past):
            past = None
        elif not (isinstance(past, fx.Node) and past.op == "placeholder"):
            return None
        return dict(k=node, past=past, new=new, phase="decode" if past is not None else "prefill",
                    out=outputs.index(node))
    return dict(k=node, past=None, new=node, phase="prefill", out=outputs.index(node))


CACHE_FORMS = (_form_concatenated, _form_returned, _form_buffer, _form_latent)


def _classify_cache(gm: fx.GraphModule, k_attn: fx.Node) -> dict:
    """How the keys attention reads (``k_attn``, before stripping GQA repeats and
    transposes) are kept: the first cache form that recognises them."""
    outputs = _outputs(gm)
    root = strip_layout(k_attn)
    for form in CACHE_FORMS:
        found = form(gm, k_attn, root, outputs)
        if found is not None:
            return found
    return dict(cache="none", reason="no KV cache: the keys attention reads are neither returned from this call nor "
                                     "written into a buffer (use_cache off?)")


def _static(x) -> Optional[int]:
    """``x`` as an int when it is one (never specialise a symbolic size)."""
    return int(x) if isinstance(x, int) else None


def _shape_reason(q, k, masks: list) -> tuple[dict, str]:
    """Heads, KV heads, head_dim, whether heads are folded into the batch
    (``[B*H, S, D]`` for bmm), the attention mask and the per-head score bias
    among ``masks``; or why not."""
    qv, kv = _value(q), _value(k)
    if qv is None or kv is None or kv.dim() != 4:
        return {}, "keys are not 4-D [B, H, S, D]"
    batch, kv_heads, head_dim = _static(kv.shape[0]), _static(kv.shape[1]), _static(qv.shape[-1])
    if qv.dim() == 4:
        heads, fold = _static(qv.shape[1]), False
    elif qv.dim() == 3 and batch and _static(qv.shape[0]) and _static(qv.shape[0]) % batch == 0:
        heads, fold = _static(qv.shape[0]) // batch, True  # heads folded into the batch, b-major (fairseq, bmm)
    else:
        return {}, f"queries {list(qv.shape)} are neither [B, H, S, D] nor [B*H, S, D] over keys {list(kv.shape)}"
    if heads is None or kv_heads is None or head_dim is None:
        return {}, "the head counts are symbolic (compile without dynamic=True)"
    per_head = []
    for mask in masks:
        mv = _value(mask)
        if mv is None or mv.dtype == torch.bool or mv.dim() < 3:
            continue
        head_axis = 1 if mv.dim() == 4 else 0  # [B, H, Sq, S], or [H or B*H, Sq, S]
        if _static(mv.shape[head_axis]) not in (1, None) and (head_axis == 1 or qv.dim() == 4 or fold):
            per_head.append(mask)
    plain = [m for m in masks if m not in per_head]
    if len(per_head) > 1 or len(plain) > 1:
        return {}, (f"{len(masks)} additive score modifiers (kvfx reads one attention mask and one per-head "
                    "score bias)")
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, fold=fold, mask=plain[0] if plain else None,
                head_bias=per_head[0] if per_head else None), ""


def _bias_reason(site: "Site", bias: fx.Node) -> tuple[str, str]:
    """What a per-head score bias is computed from ("cache": the cached keys or
    values, recomputed from the kept slots after compression, as Doge's
    dynamic mask is; "positions": ALiBi's slope x key position, which kvfx
    corrects slot by slot), or why kvfx cannot keep it right."""
    cached = {n for n in (site.k, site.v, site.k_past, site.v_past) if n is not None}
    seen, todo = set(), [bias]
    while todo:  # the bias's tensor inputs (a size read, ALiBi's kv_len, is no data of the cache)
        for a in todo.pop().all_input_nodes:
            if a in cached:
                return "cache", ""
            if a not in seen and isinstance(_value(a), torch.Tensor) and not _is_attention_call(a) and len(seen) < 160:
                seen.add(a)
                todo.append(a)
    shape = list(_value(bias).shape)
    if _value(bias).dim() == 4 and _static(_value(bias).shape[2]) not in (1, None):
        return "", (f"the additive score bias {shape} differs per head and per query (a relative position bias): "
                    "after compression it would need each slot's original position")
    if site.heads != site.kv_heads:
        return "", (f"the additive score bias {shape} differs per head over grouped KV heads: kvfx corrects a bias "
                    "built from positions per KV head, and here one KV head serves query heads with different biases")
    return "positions", ""


LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
SIZE_METHODS = {"size", "dim"}
# What may stand between an attention output [B, H, S, Dv] and the linear
# layer reading it: merging the heads into [B, S, H x Dv], casts, dropout.
HEAD_MERGE_METHODS = {"transpose", "permute", "reshape", "view", "contiguous", "flatten"} | CAST_METHODS
HEAD_MERGE_FUNCS = {torch.transpose, torch.permute, torch.reshape, torch.flatten} | DROPOUT


def _untransposed(weight: fx.Node) -> tuple[fx.Node, bool]:
    """(W, False) for W.T / W.t() / W.transpose(0, 1), else (weight, True): a
    matmul by the result multiplies by W [hidden, H x Dv] transposed."""
    if _method(weight, {"t"}) or (_is_call(weight, {getattr}) and weight.args[1] in ("T", "mT")):
        return weight.args[0], False
    if _method(weight, {"transpose"}) and set(weight.args[1:]) in ({0, 1}, {-1, -2}):
        return weight.args[0], False
    return weight, True


def _reader_weight(user: fx.Node, node: fx.Node) -> Optional[tuple[fx.Node, bool, str]]:
    """(weight, stored [H x Dv, hidden], what) when ``user`` multiplies
    ``node`` by a weight: a linear layer, GPT-2's Conv1D ``addmm``, or a
    matmul (x @ W.T as FalconLinear, x @ W); else None."""
    if _is_call(user, LINEAR) and user.args[0] is node:
        return _arg(user, 1, "weight"), False, "linear layer"
    if _is_call(user, {torch.addmm}) and user.args[1] is node:
        return user.args[2], True, "addmm"
    if _is_call(user, MATMUL) and user.args[0] is node:
        return (*_untransposed(user.args[1]), "matmul")
    return None


def out_projection(site: "Site") -> tuple[Optional[fx.Node], bool, str]:
    """The weight of the linear layer that reads ``site``'s attention output
    once its heads are merged (``o_proj``, ``c_proj``, ``wo``): (weight node,
    whether it is stored [H x Dv, hidden] as GPT-2's Conv1D's ``addmm``
    weight, ""), or (None, False, what kvfx saw instead)."""
    node, out = site.node, _value(site.node)
    if out is None or out.dim() != 4:
        return None, False, "the attention output is not [B, H, S, Dv]"
    batch, heads, length, dv = out.shape
    merged = False  # seen as [B, S, H, Dv]: heads beside their channels, in head order
    for _ in range(16):
        users = [u for u in node.users if not _method(u, SIZE_METHODS)]
        if len(users) != 1:
            return None, False, f"the attention output is read by {len(users)} nodes, not one linear layer"
        user = users[0]
        found = _reader_weight(user, node) if merged else None
        if found is not None:
            weight, transposed, what = found
            shape = tuple(getattr(_value(weight), "shape", ()))
            # A matmul's operand is a weight only when it is a parameter, not another activation.
            parameter = what != "matmul" or weight.op in ("placeholder", "get_attr")
            if len(shape) == 2 and shape[0 if transposed else 1] == heads * dv and parameter:
                return weight, transposed, ""
            return None, False, (f"the {what} reading the attention output multiplies by {shape}, not a parameter "
                                 f"[hidden, {heads * dv}] (or its transpose)")
        if not (_method(user, HEAD_MERGE_METHODS) or _is_call(user, HEAD_MERGE_FUNCS)):
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", str(user.target))
            return None, False, f"the attention output is read by {name}, not a linear layer over merged heads"
        value = _value(user)
        if (not merged and value is not None and value.dim() == 4 and tuple(value.shape) == (batch, length, heads, dv)
                and (_method(user, {"transpose", "permute"}) or _is_call(user, {torch.transpose, torch.permute}))):
            merged = True
        node = user
    return None, False, "no linear layer within 16 layout ops of the attention output"


MUL = {operator.mul, torch.mul}
ADD = {operator.add, torch.add}
NEG = {operator.neg, torch.neg}
# A fused projection's split, between it and the queries of a model without RoPE.
SPLITS = {"split", "chunk", "unbind"}


def _last_slice(node) -> Optional[slice]:
    """s when ``node`` is ``x[..., s]`` (or x[:, :, :, s] of a 4-D x)."""
    if not _is_call(node, {operator.getitem}) or not isinstance(node.args[1], tuple):
        return None
    *lead, last = node.args[1]
    if not isinstance(last, slice) or not all(i is Ellipsis or i == slice(None) for i in lead):
        return None
    if Ellipsis not in lead and len(lead) != _value(node.args[0]).dim() - 1:
        return None
    return last


def _halves(node) -> Optional[tuple]:
    """(x, first) when ``node`` is a half of x's last dim: x[..., :h] (first)
    or x[..., h:], h = half of x's last dim, or a part of x.chunk(2, -1) (gpt-oss)."""
    if _is_call(node, {operator.getitem}) and node.args[1] in (0, 1):
        parts = node.args[0]
        chunked = _is_call(parts, {torch.chunk}) or _method(parts, {"chunk"})
        if chunked and _arg(parts, 1, "chunks") == 2 and _arg(parts, 2, "dim", 0) in (-1, _value(parts.args[0]).dim() - 1):
            return parts.args[0], node.args[1] == 0
        return None
    last = _last_slice(node)
    if last is None or last.step not in (None, 1):
        return None
    x = node.args[0]
    half = _value(x).shape[-1] // 2
    if last == slice(None, half):
        return x, True
    return (x, False) if last == slice(half, None) else None


def _turned(node) -> Optional[tuple]:
    """(x, layout) when ``node`` is x with each channel pair turned a quarter,
    (a, b) -> (-b, a): HF's ``rotate_half(x)`` = cat((-x[..., h:], x[..., :h]))
    ("half": channel i pairs with i + h) or GPT-J's ``rotate_every_two(x)`` =
    stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) ("pairs": 2i with 2i + 1)."""
    if _method(node, {"flatten"}) and node.args[1:] in ((-2,), (3,)):
        inner = node.args[0]
        if not _is_call(inner, {torch.stack}) or _arg(inner, 1, "dim", 0) not in (-1, 4):
            return None
        layout, odd_step, even_step = "pairs", slice(1, None, 2), slice(None, None, 2)
        parts = inner.args[0]
        if len(parts) != 2 or not _is_call(parts[0], NEG):
            return None
        odd, even = parts[0].args[0], parts[1]
        if _last_slice(odd) == odd_step and _last_slice(even) == even_step and odd.args[0] is even.args[0]:
            return odd.args[0], layout
        return None
    if not _is_call(node, CAT) or _arg(node, 1, "dim", 0) not in (-1, 3):
        return None
    parts = node.args[0]
    if len(parts) != 2 or not _is_call(parts[0], NEG):
        return None
    high, low = _halves(parts[0].args[0]), _halves(parts[1])
    if high and low and high[0] is low[0] and not high[1] and low[1]:
        return high[0], "half"
    return None


def _products(node) -> list:
    """Both orders of a product's operands."""
    return [tuple(node.args), tuple(node.args[::-1])] if _is_call(node, MUL) and len(node.args) == 2 else []


def _rope_turned(node) -> Optional[dict]:
    """``x * cos + turn(x) * sin`` (HF, GPT-J; either order in each product
    and in the sum), turn a quarter turn of each channel pair (``_turned``)."""
    if not _is_call(node, ADD) or len(node.args) != 2:
        return None
    for plain, turned in (node.args, node.args[::-1]):
        for x, cos in _products(plain):
            for r, sin in _products(turned):
                found = _turned(r)
                if found and found[0] is x and isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                    return dict(x=x, cos=cos, sin=sin, layout=found[1], widen=False)
    return None


def _rope_split(node) -> Optional[dict]:
    """cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1), x1, x2 the halves
    of x: the half-split rotation written out (cos and sin half as wide)."""
    if not _is_call(node, CAT) or _arg(node, 1, "dim", 0) not in (-1, 3) or len(node.args[0]) != 2:
        return None
    first, second = node.args[0]
    if not (_is_call(first, {operator.sub, torch.sub}) and _is_call(second, ADD)):
        return None
    for x1, cos in _products(first.args[0]):
        for x2, sin in _products(first.args[1]):
            a, b = _halves(x1), _halves(x2)
            if not (a and b and a[0] is b[0] and a[1] and not b[1]):
                continue
            terms = {frozenset(map(id, pair)) for side in second.args for pair in _products(side)[:1]}
            if terms == {frozenset((id(x1), id(sin))), frozenset((id(x2), id(cos)))}:
                return dict(x=a[0], cos=cos, sin=sin, layout="half", widen=True)
    return None


def _rope_complex(node) -> Optional[dict]:
    """view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * freqs).flatten(3):
    Meta's reference form, channel 2i turning with 2i + 1 by the complex
    ``freqs`` (cos and sin its real and imaginary parts, one per pair)."""
    if not (_method(node, {"flatten"}) and node.args[1:] in ((3,), (-2,))):
        return None
    real = node.args[0]
    if not _is_call(real, {torch.view_as_real}):
        return None
    for turned, freqs in _products(real.args[0]):
        if _is_call(turned, {torch.view_as_complex}) and isinstance(freqs, fx.Node):
            pairs = turned.args[0]
            if not (_method(pairs, {"reshape", "view"}) or _is_call(pairs, {torch.reshape})):
                return None
            x = pairs.args[0]
            while _method(x, CAST_METHODS):
                x = x.args[0]
            return dict(x=x, cos=freqs, sin=freqs, layout="pairs", widen=True, complex=True)
    return None


def _rope(node) -> Optional[dict]:
    """The rotary embedding that produced ``node``: x (the input), its cos and
    sin, the channel pairing; also when it rotates only x's first r channels
    and passes the rest (Phi, GPT-NeoX, GPT-J): cat((rope(x[..., :r]), x[..., r:]), -1)."""
    found = _rope_turned(node) or _rope_split(node) or _rope_complex(node)
    if found is not None or not _is_call(node, CAT) or _arg(node, 1, "dim", 0) not in (-1, 3):
        return found
    if len(node.args[0]) != 2:
        return None
    rotated, passed = node.args[0]
    found = _rope_turned(rotated) or _rope_split(rotated) or _rope_complex(rotated)
    if found is None or not isinstance(passed, fx.Node):
        return None
    part = found["x"]
    r = _value(part).shape[-1]
    if _last_slice(part) != slice(None, r) or _last_slice(passed) != slice(r, None) or passed.args[0] is not part.args[0]:
        return None
    return {**found, "x": part.args[0]}


def _projected(node: fx.Node) -> tuple[bool, fx.Node]:
    """(True, the projection) when ``node`` comes straight from a linear
    projection (through layout ops, casts, a fused projection's split, a
    scale by a number), else (False, the first node that is none of these)."""
    for _ in range(24):
        if _is_call(node, LINEAR | {torch.addmm}):
            return True, node
        if _is_call(node, MATMUL) and len(node.args) == 2:  # x @ W, W a parameter (not a per-position matrix)
            weight = _untransposed(node.args[1])[0]
            return (True, node) if isinstance(weight, fx.Node) and weight.op in ("placeholder", "get_attr") else (
                False, node)
        if _is_layout(node) or _method(node, CAST_METHODS | SPLITS) or _is_call(node, {torch.split, torch.chunk}):
            node = node.args[0]
        elif _is_call(node, {operator.getitem}) and isinstance(node.args[1], (int, slice, tuple)):
            node = node.args[0]
        elif _is_call(node, MUL | {operator.truediv}) and any(isinstance(a, (int, float)) for a in node.args):
            node = next(a for a in node.args if isinstance(a, fx.Node))
        else:
            return False, node
    return False, node


def rotary_of(site: "Site") -> tuple[Any, str]:
    """What ``site``'s queries are before their rotary embedding: (dict(x=
    the queries before RoPE, chain= the layout ops from RoPE's output to
    attention's q, cos, sin as the model multiplies by them (complex= True:
    one complex tensor, cos + i sin), layout= "half" or "pairs", widen=
    whether cos and sin hold one entry per channel pair),
    "") for the forms ``_rope`` reads; ("none", "") for queries with no
    rotary embedding (straight from a projection); (None, what kvfx saw)."""
    node, chain = site.q, []
    while _is_layout(node) or _method(node, CAST_METHODS):
        chain.append(node)
        node = node.args[0]
    found = _rope(node)
    if found is not None:
        shapes = [tuple(getattr(_value(found[n]), "shape", ())) for n in ("x", "cos", "sin")]
        if len(shapes[1]) != 4 or shapes[1] != shapes[2] or 1 not in shapes[1][1:3]:
            return None, f"its rotary embedding's cos {shapes[1]} is not [B, 1, S, r] or [B, S, 1, r] beside q {shapes[0]}"
        return {**found, "chain": tuple(reversed(chain))}, ""
    straight, seen = _projected(site.q)
    if straight:
        return "none", ""
    name = seen.target if seen.op == "call_method" else getattr(seen.target, "__name__", str(seen.target))
    return None, (f"its queries reach attention through {name} (at {seen.name}), neither a rotary embedding kvfx "
                  "reads (q * cos + rotate_half(q) * sin, its interleaved, written-out and complex forms) nor "
                  "straight from a projection")


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """One ``Site`` per attention call in ``gm``, in graph order."""
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        found = next((m for m in (f(node) for f in ATTENTION_FORMS) if m is not None), None)
        if found is None:
            continue
        store = _store_of(found["k_attn"])
        root, module = module_path(found["node"])
        site = Site(index=len(sites), layer=layer_of(module), module=module, root=root, attention=found["attention"],
                    cache="unknown", node=found["node"], q=found["q"], fill=found["fill"], fill_keeps=found["fill_keeps"],
                    sinks=found["sinks"], scale=found["scale"], softcap=found["softcap"], causal=found["causal"])
        if store is not None:  # the k, v [B, Hkv, S, D] a kvfx cache layer was given
            site.k, site.v = store.args[0], store.args[1]
            cache = dict(cache="store", phase=STORE_OPS[store_op(store)])
        else:
            cache = _classify_cache(gm, found["k_attn"])
            site.k = cache.get("k", strip_layout(found["k_attn"]))
            site.store = cache.get("store")  # a kvfx store whose contents the keys are computed from
            site.v = strip_layout(found["v_attn"])
        site.cache, site.phase, site.bounded = cache["cache"], cache.get("phase", "-"), cache.get("bounded")
        site.reason = cache.get("reason", "")
        shape, why = _shape_reason(site.q, site.k, found["masks"])
        if shape:
            site.heads, site.kv_heads, site.head_dim, site.fold, site.mask, site.head_bias = (
                shape[k] for k in ("heads", "kv_heads", "head_dim", "fold", "mask", "head_bias"))
            if site.heads != site.kv_heads:
                site.gqa = "native" if found["native_gqa"] else "repeat"
        tiled = _tiled(found["k_attn"])
        if tiled and site.heads != site.kv_heads:
            # kvfx's ops group query heads as repeat_kv does: the rewrite reorders them (rewrite._queries_and_mask)
            site.gqa = "tile"
            if _tiled(found["v_attn"]) != tiled:
                site.reason = site.reason or "keys are tiled over the query heads (repeat) and values are not"
            elif site.sinks is not None or site.head_bias is not None:
                site.reason = site.reason or "tiled KV heads (repeat) with per-head sinks or a per-head score bias"
        if store is not None:
            site.store = store
            v_read = [u for u in store.users if _is_call(u, {operator.getitem}) and u.args[1] == 1]
            if strip_layout(found["v_attn"]) not in [strip_layout(site.v), *v_read]:
                site.reason = "values are not the ones written into the kvfx store with the keys"
        elif cache.get("latent"):  # keys and values expanded from the latent and rotary key every call
            site.latent, site.v = True, cache["v"]
            site.score_k, site.v_attn = strip_layout(found["k_attn"]), strip_layout(found["v_attn"])
            site.k_past, site.k_new, site.k_out = cache["k_past"], cache["k_new"], cache["out"]
            site.v_past, site.v_out = cache["v_past"], cache["v_out"]
        elif cache["cache"] == "buffer":
            v_cache = _classify_cache(gm, found["v_attn"])
            if v_cache.get("cache") != "buffer" or v_cache["phase"] != cache["phase"]:
                site.reason = "the values attention reads are not kept in a buffer as the keys are"
            else:
                site.v, site.k_new, site.v_new = v_cache["k"], cache["k_new"], v_cache["k_new"]
                site.writes, site.seq_dim = (cache["write"], v_cache["write"]), cache["seq_dim"]
                if site.seq_dim == 1 and site.heads:  # [B, S, Hkv, D]: the KV heads are dim 2
                    site.kv_heads = _static(_value(site.k).shape[2])
                    site.gqa = "repeat" if site.kv_heads != site.heads else "none"
        elif not site.reason:
            v_cache = _classify_cache(gm, found["v_attn"])
            if v_cache.get("cache") != "dynamic" or (v_cache["k_past"] is None) != (cache["k_past"] is None):
                site.reason = "the values attention reads are not kept as the keys are" + (
                    f" ({v_cache['reason'].replace('keys', 'values')})" if v_cache.get("reason") else "")
            else:
                site.v = v_cache.get("k", strip_layout(found["v_attn"]))
                site.k_past, site.k_new, site.k_out = cache["k_past"], cache["k_new"], cache["out"]
                site.v_past, site.v_out = v_cache["k_past"], v_cache["out"]
        if not site.reason and not isinstance(site.scale, (int, float)):
            # torch.compile(dynamic=True) can trace a model's float attribute
            # (Gemma's query_pre_attn_scalar) as a graph value, not a constant.
            site.reason = "the softmax scale is a traced value, not a constant (compile without dynamic=True)"
        if not site.reason and why:
            site.reason = why
        if not site.reason and site.head_bias is not None:
            site.bias_from, site.reason = _bias_reason(site, site.head_bias)
            if site.cache == "store" and not site.reason:
                site.reason = (f"the additive score bias {list(_value(site.head_bias).shape)} differs per head: "
                               "kvfx's slot store attention takes no per-head bias")
        if not site.reason and site.heads % site.kv_heads:
            site.reason = f"{site.heads} query heads do not divide into {site.kv_heads} KV heads"
        sites.append(site)
    _masks_from_other_caches(sites)
    _masks_shared_with_full_caches(sites)
    return sites


def _mask_inputs(mask: fx.Node) -> set:
    """The graph inputs a mask is computed from."""
    seen, todo, inputs = set(), [mask], set()
    while todo and len(seen) < 400:
        node = todo.pop()
        if node.op == "placeholder":
            inputs.add(node)
        for a in node.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return inputs


def _masks_shared_with_full_caches(sites: list[Site]) -> None:
    """A layer kvfx leaves alone keeps its whole cache; when its attention mask
    comes from the same inputs as a compressed layer's (transformers builds
    one mask from one layer's cache length), compressing that layer would
    size the shared mask for fewer slots than the whole cache holds (HY-V4:
    a latent layer left alone beside a compressed one). Leave such layers
    alone too, naming the layer that keeps its cache."""
    whole = [s for s in sites if not s.compressible and s.mask is not None and s.cache != "sliding"]
    for keeper in whole:
        shared = _mask_inputs(keeper.mask)
        for site in sites:
            if site.compressible and site.mask is not None and _mask_inputs(site.mask) & shared:
                site.reason = (f"its attention mask is shared with {keeper.module or f'attention {keeper.index}'}, "
                               f"which keeps its whole cache ({keeper.reason}): a compressed cache here would "
                               "make that mask too short for it")


def _masks_from_other_caches(sites: list[Site]) -> None:
    """Leave alone a site whose attention mask is computed from a cache no
    site reads (HY-V4's sparse-attention indexer keeps its own keys and masks
    attention with its top-k): compressing the site would shorten the mask
    the model builds from the cache length, and the indexer's cache would no
    longer fit it."""
    caches = {n for s in sites for n in (s.k, s.v) if n is not None}
    for site in sites:
        if not site.compressible or site.mask is None:
            continue
        seen, todo = set(), [site.mask]
        while todo and len(seen) < 400:
            for a in todo.pop().all_input_nodes:
                if a in seen or not isinstance(_value(a), torch.Tensor):
                    continue  # (a size read is no data of a cache)
                seen.add(a)
                cat = _seq_cat(a)
                if cat is not None and cat not in caches:
                    site.reason = (f"the attention mask is computed from another cache {list(_value(cat).shape)} "
                                   f"(at {cat.name}; a sparse-attention indexer's keys, say) that kvfx does not "
                                   "compress: a shorter mask would no longer fit it")
                    todo = []
                    break
                todo.append(a)


def lend_policy_inputs(sites: list[Site], policy) -> None:
    """What ``policy``'s score reads beyond q and k, per compressible site,
    or the reason the site is left alone: values per KV head (a latent, MLA,
    cache has one shared latent instead) and, for a policy that weighs values
    by the output projection (CriticalKV), ``out_proj`` (or what kvfx saw
    after the attention output)."""
    for site in sites:  # a latent's values are one shared latent, not per KV head (MLA)
        if site.compressible and site.latent and policy.needs_values:
            site.reason = (f"{type(policy).__name__} scores the values per KV head; this cache holds one latent "
                           "shared by every head (MLA)")
    for site in sites:  # a latent's key channels are shared by every head and are not the queries' (MLA)
        if site.compressible and site.latent and policy.cuts_key_channels:
            site.reason = (f"{type(policy).__name__} zeroes key channels per KV head against the queries' channels; "
                           "this cache holds one latent shared by every head (MLA)")
    if policy.needs_rotary:
        for site in sites:
            if site.compressible and site.latent:
                site.reason = (f"{type(policy).__name__} reads the queries before their rotary embedding; this "
                               "cache's queries read a latent (MLA)")
            elif site.compressible and site.rotary is None:
                site.rotary, seen = rotary_of(site)
                if site.rotary is None:
                    site.reason = f"{type(policy).__name__} reads the queries before their rotary embedding: {seen}"
    if not policy.needs_out_projection:
        return
    for site in sites:
        if site.compressible and site.out_proj is None:
            weight, transposed, seen = out_projection(site)
            if weight is None:
                site.reason = f"{type(policy).__name__} weighs values by the attention's output projection: {seen}"
            else:
                site.out_proj = (weight, transposed)


def stray_stores(gm: fx.GraphModule, sites: list[Site]) -> list[str]:
    """The kvfx store ops of ``gm`` that no compressible site reads, each with
    what kvfx saw there: such a graph cannot run (a store is read only by
    kvfx's attention)."""
    claimed = {s.store for s in sites if s.compressible and s.store is not None}
    reasons = {s.store: s.reason for s in sites if s.store is not None and not s.compressible}
    stray = []
    for node in gm.graph.nodes:
        if store_op(node) and node not in claimed:
            module = module_path(node)[1] or node.name
            stray.append(f"{module}: {reasons.get(node) or 'no attention call kvfx recognises reads its keys'}")
    return stray
