"""Rewrite compressible sites to kvfx ops and thread per-slot state.

For each compressible ``Site``:
  * prefill (the cache starts empty): attention is left as the model wrote it
    (it sees the whole prompt); ``kvfx::compress`` runs after it and the cache
    write-back outputs become the compressed K and V.
  * decode (the cache comes in as a graph input): attention becomes
    ``kvfx::attend``, which reads the slot state of the incoming cache
    (three new graph inputs: slot_bias, seen, slot_score; seen = -1 for a
    cache without kvfx state) and returns the state for the cache written back.

Every compressible site adds three graph outputs after the model's own:
slot_bias [B, Hkv, S], seen (tokens the cache has absorbed, a 0-d int64) and
slot_score [B, Hkv, S] (the running score of continuous policies). A
continuous policy (TOVA, ZeroMerge) also runs ``kvfx::step`` after each decode
attention and writes its output back instead of the grown cache.
The runtime (``kvfx.runtime``) feeds the extra inputs and strips the extra
outputs, so the caller sees the model's original signature.

Forms the recognisers report are handled here too: bmm attention's folded
``[B*H, S, D]`` queries are unfolded for kvfx's ops and the output folded
back; a masked_fill / where condition becomes kvfx's mask; learned sinks go to
kvfx's attention; a latent cache (MLA) is compressed as ``k, v`` = latent and
rotary key with slots scored on the expanded keys, and its decode attention
reads the expanded keys with the latent's state broadcast to every head.

A site whose cache is a kvfx slot store (``cache == "store"``, a kvfx cache
layer: ``kvfx.integrations.transformers_store``) needs none of that: its
store's tensors are graph inputs already and are written in place.
  * prefill: the layer's ``kvfx::store_mark`` becomes ``kvfx::store_compress``
    after the attention, whose outputs dynamo writes into the layer;
  * decode: the layer appended the new tokens and tagged them with its store
    (``kvfx::store_read``); the attention becomes ``kvfx::store_attend`` over
    the store, a continuous policy's ``kvfx::store_step`` follows it, and the
    tag, now unread, is dropped.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Sequence

import torch
from torch import fx

from kvfx.buffers import buffer_attend
from kvfx.decode_step import attention_and_step, steps_in_graph
from kvfx.kernels.dispatch import kernel_mode
from kvfx.kernels.paged_attention.reference import paged_attention_uniform
from kvfx.passes.sites import SDPA, Site, _arg
from kvfx.policies import key_of

import kvfx.ops  # registers torch.ops.kvfx; sums_supported

# position_ids, cache_position, input_pos, start_pos, pos (not post_attention_layernorm)
POSITION_INPUT = re.compile(r"(^|_)(pos|position|positions)(_|$)")


@dataclasses.dataclass
class StatePlan:
    """What the runtime needs to thread state through one rewritten graph."""

    n_outputs: int                      # the model's own outputs
    output_is_sequence: bool
    decode_args: list[int]              # arg index of each decode site's incoming key cache
    state_outputs: list[int]            # output index of each compressible site's key write-back
    positions_from_cache: bool          # the graph has no position input: it derives positions from cache length
    # Buffer caches (kvfx.buffers): each prefill site's (key, value) buffer arg indices and sequence dim,
    # its compressed k, v, bias and tokens seen following the other state outputs; each decode site's
    # buffer arg indices and tokens per call, its store's four inputs added in site order (input_kinds).
    input_kinds: list = dataclasses.field(default_factory=list)   # "state" | "buffer" per decode site, in order
    buffer_prefill: list = dataclasses.field(default_factory=list)
    buffer_decode: list = dataclasses.field(default_factory=list)


def rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any], sites: list[Site], policy,
            inline_decode: bool = True, inline_step: bool = False) -> tuple[StatePlan, list]:
    """Rewrite ``gm`` in place for ``policy``; returns the runtime's plan and
    the example inputs of the rewritten graph (the state inputs added). The
    plan holds no tensor: the first call's inputs must not outlive it.
    ``inline_decode=False`` keeps every store's decode attention in
    ``kvfx::store_attend`` (see ``_inline_decode``); ``inline_step=True``
    (the inner compiler is Inductor) puts a continuous policy's decode step
    beside an in-graph attention (``kvfx.decode_step``)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = graph.output_node()
    raw_out = out_node.args[0]
    is_sequence = isinstance(raw_out, (tuple, list))
    outputs = list(raw_out) if is_sequence else [raw_out]
    n_outputs = len(outputs)
    spec = key_of(policy)
    fake_mode = torch._guards.detect_fake_mode(list(example_inputs))
    example_inputs = list(example_inputs)
    extra_outputs: list[fx.Node] = []
    decode_args: list[int] = []
    state_outputs: list[int] = []
    kept_index: dict[int, fx.Node] = {}   # layer -> its kept indices (ChunkKV reuse)
    last_placeholder = placeholders[-1]
    continuous = policy.schedule == "continuous"
    buffer_outputs: list[fx.Node] = []
    plan_buffers_prefill: list = []
    plan_buffers_decode: list = []
    input_kinds: list[str] = []          # whose state each decode site's added inputs are, in graph order

    def call(target, args, after):
        with graph.inserting_after(after):
            node = graph.call_function(target, args)
        if len(target._schema.returns) == 1:
            return [node]
        items = []
        for i in range(len(target._schema.returns)):
            with graph.inserting_after(items[-1] if items else node):
                items.append(graph.call_function(operator.getitem, (node, i)))
        return items

    for site in sites:
        if not site.compressible:
            continue
        layer = site.layer if site.layer is not None else site.index
        n_layers = site.depth or max((s.layer for s in sites if s.layer is not None), default=0) + 1
        if site.latent and continuous:
            site.reason = (f"latent cache: {type(policy).__name__} {policy.while_decoding}, per head; kvfx runs "
                           "continuous policies on per-head caches only")
            continue
        if policy.ragged_rows and site.cache != "store":
            site.reason = (f"{type(policy).__name__} {policy.while_decoding} with a budget its KV heads share, so "
                           f"they hold different counts: kvfx runs that on its slot store only, not on a cache "
                           f"the model keeps itself ({site.cache})")
            continue
        if site.bias_from == "positions" and (continuous or site.latent):
            site.reason = (f"the per-head position bias (ALiBi) is corrected once, when {type(policy).__name__} "
                           "compresses the prompt; " + ("a latent cache is not per head" if site.latent else
                                                        f"{type(policy).__name__} {policy.while_decoding}"))
            continue
        lse = sums = None
        if site.phase == "prefill" and (policy.sums_attention or policy.needs_lse) and not (
                site.cache == "buffer" and continuous):
            old = site.node
            lse, sums = _prompt_lse(graph, site, policy)
            outputs = [site.node if node is old else node for node in outputs]
        if site.cache == "buffer":
            if continuous:
                site.reason = (f"{type(policy).__name__} {policy.while_decoding}; kvfx runs continuous policies on "
                               "returned caches and slot stores, not on module buffers yet")
                continue

            def placeholder(name):
                nonlocal last_placeholder
                with graph.inserting_after(last_placeholder):
                    last_placeholder = graph.placeholder(f"kvfx_buffer_{name}_{site.index}")
                return last_placeholder

            done = _rewrite_buffer(graph, site, policy, spec, layer, n_layers, kept_index, call, placeholder,
                                   fake_mode, lse, sums)
            if done is None:
                continue
            if site.phase == "prefill":
                buffer_outputs += done
                plan_buffers_prefill.append((placeholders.index(site.k), placeholders.index(site.v), site.seq_dim))
            else:
                out, fakes = done
                outputs = [out if node is site.node else node for node in outputs]
                plan_buffers_decode.append((placeholders.index(site.k), placeholders.index(site.v),
                                            site.k_new.meta["example_value"].shape[site.seq_dim]))
                example_inputs.extend(fakes)
                input_kinds.append("buffer")
            continue
        if site.cache == "store":
            replaced = _rewrite_store(graph, site, policy, spec, layer, n_layers, kept_index, call, inline_decode,
                                      lse, sums, inline_step)
            outputs = [replaced.get(node, node) for node in outputs]
            continue
        state_outputs.append(site.k_out)
        with graph.inserting_after(site.node):
            new_len = graph.call_method("size", (site.k_new, -2))
        q, mask, ready = _queries_and_mask(graph, site, new_len)
        if site.phase == "prefill":
            reuse = _reused_index(site, policy, layer, kept_index)
            out_proj, ready = _lent_out_projection(graph, site, ready)
            q, rotary, ready = _lent_rotary(graph, site, policy, q, ready)
            k_c, v_c, bias, score, index = call(
                torch.ops.kvfx.compress.default,
                (q if policy.needs_queries else None, site.k, site.v, mask, reuse, spec, layer, n_layers,
                 float(site.scale), site.score_k, lse, sums, out_proj, rotary), ready)
            kept_index[layer] = index
            with graph.inserting_after(index):
                seen = graph.call_function(torch.full, ([], new_len), {"dtype": torch.int64})
            if site.bias_from == "positions":  # ALiBi: each kept slot's bias follows its original position
                head_bias, anchor = _head_bias(graph, site, seen)
                with graph.inserting_after(anchor):
                    shift = graph.call_function(position_bias_shift, (head_bias, index, new_len))
                with graph.inserting_after(shift):
                    bias = graph.call_function(operator.add, (bias, shift))
            outputs[site.k_out], outputs[site.v_out] = k_c, v_c
        else:
            past = site.k_past.meta["example_value"]
            batch, kv_heads, past_len = past.shape[0], past.shape[1], past.shape[2]
            new_inputs = []
            for name in ("slot_bias", "seen", "slot_score"):
                with graph.inserting_after(last_placeholder):
                    last_placeholder = graph.placeholder(f"kvfx_{name}_{site.index}")
                new_inputs.append(last_placeholder)
            with fake_mode:
                fakes = [
                    torch.empty(batch, kv_heads, past_len, dtype=torch.float32, device=past.device),
                    torch.empty((), dtype=torch.int64, device=past.device),
                    torch.empty(batch, kv_heads, past_len, dtype=torch.float32, device=past.device),
                ]
            for node, fake in zip(new_inputs, fakes):
                node.meta["example_value"] = fake
            example_inputs.extend(fakes)
            input_kinds.append("state")
            decode_args.append(placeholders.index(site.k_past))
            bias_in, seen_in, score_in = new_inputs
            keys, values = site.k, site.v
            if site.latent:  # attend over the per-head keys and values expanded from the latent
                keys, values = site.score_k, site.v_attn
                with graph.inserting_after(ready):
                    bias_in = graph.call_method("expand", (bias_in, -1, site.heads, -1))
                with graph.inserting_after(bias_in):
                    score_in = ready = graph.call_method("expand", (score_in, -1, site.heads, -1))
            head_bias = None
            if site.head_bias is not None:
                head_bias, ready = _head_bias(graph, site, ready)
            attn_out, bias, score, seen = call(
                torch.ops.kvfx.attend.default,
                (q, keys, values, bias_in, score_in, seen_in, mask, float(site.scale), float(site.softcap),
                 site.sinks, head_bias), ready)
            if site.latent:  # one selection serves every head: the latent's state is any head's
                with graph.inserting_after(seen):
                    bias = graph.call_function(operator.getitem, (bias, (slice(None), slice(0, 1))))
                with graph.inserting_after(bias):
                    score = graph.call_function(operator.getitem, (score, (slice(None), slice(0, 1))))
            attn_out = _replace_output(graph, site, attn_out)
            outputs = [attn_out if node is site.node else node for node in outputs]
            if continuous:
                out_proj, after = _lent_out_projection(graph, site, seen)
                k_c, v_c, bias, score = call(
                    torch.ops.kvfx.step.default,
                    (q, site.k, site.v, bias, score, spec, layer, n_layers, float(site.scale), out_proj), after)
                outputs[site.k_out], outputs[site.v_out] = k_c, v_c
        extra_outputs += [bias, seen, score]

    out_node.args = (tuple(outputs + extra_outputs + buffer_outputs),)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    gm.recompile()
    names = [p.name.lower() for p in placeholders]
    plan = StatePlan(
        n_outputs=n_outputs,
        output_is_sequence=is_sequence,
        decode_args=decode_args,
        state_outputs=state_outputs,
        # ALiBi models take no positions: the bias kvfx corrects is their only use of the cache length
        positions_from_cache=bool(decode_args) and not any(POSITION_INPUT.search(n) for n in names)
        and not all(s.bias_from == "positions" for s in sites if s.compressible and s.phase == "decode"),
        input_kinds=input_kinds,
        buffer_prefill=plan_buffers_prefill,
        buffer_decode=plan_buffers_decode,
    )
    return plan, example_inputs


def _queries_and_mask(graph: fx.Graph, site: Site, after: fx.Node) -> tuple[fx.Node, Any, fx.Node]:
    """The queries as [B, H, Sq, D] (unfolded from bmm's [B*H, Sq, D]) and the
    mask kvfx's ops read (a masked_fill condition turned into a 4-D keep
    mask), inserted after ``after``; returns them and the last node inserted."""
    mask = site.mask
    if isinstance(mask, fx.Node) and mask.meta["example_value"].dim() == 2:  # Meta's [Sq, S]: kvfx reads 4-D
        with graph.inserting_after(after):
            mask = after = graph.call_function(operator.getitem, (mask, (None, None, Ellipsis)))
    q, after = _as_query_heads(graph, site, site.q, after)
    if site.fill is not None:
        mask = site.fill
        if not site.fill_keeps:
            with graph.inserting_after(after):
                mask = after = graph.call_function(torch.logical_not, (site.fill,))
        dims = site.fill.meta["example_value"].dim()
        with graph.inserting_after(after):
            if dims == 3 and site.fold:
                mask = after = graph.call_method("unflatten", (mask, 0, (-1, site.heads)))
            elif dims < 4:
                mask = after = graph.call_function(operator.getitem, (mask, (None,) * (4 - dims) + (Ellipsis,)))
        if site.mask is not None:  # GPT-Neo: where(causal, scores, lowest) + the padding mask: one additive mask
            with graph.inserting_after(after):
                mask = after = graph.call_function(torch.where, (mask, site.mask, float("-inf")))
    return q, mask, after


def _as_query_heads(graph: fx.Graph, site: Site, q: fx.Node, after: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Queries shaped as the site's attention reads them, as [B, H, Sq, D]
    in repeat_kv's head order (kvfx's ops read that), inserted after ``after``."""
    if site.fold:
        with graph.inserting_after(after):
            q = after = graph.call_method("unflatten", (q, 0, (-1, site.heads)))
    if site.gqa == "tile":  # KV heads tiled (h % Hkv): query heads in repeat_kv's order (h // r), as kvfx's ops read
        with graph.inserting_after(after):
            q = after = graph.call_method("unflatten", (q, 1, (-1, site.kv_heads)))
        with graph.inserting_after(after):
            q = after = graph.call_method("transpose", (q, 1, 2))
        with graph.inserting_after(after):
            q = after = graph.call_method("flatten", (q, 1, 2))
    return q, after


def _lent_rotary(graph: fx.Graph, site: Site, policy, q: fx.Node, ready: fx.Node) -> tuple:
    """(the queries the compress op scores, the rotary embedding it is lent,
    the last node inserted): for a policy that ``needs_rotary``, the queries
    before their rotary embedding, taken through the same layout ops as the
    rotated ones, and RoPE's cos and sin stacked as [2, B or 1, 1, S, r]
    (channel i pairs with i + r/2) or [2, B or 1, 1, S, r/2, 2] (2i with
    2i + 1); ``lend_policy_inputs`` found them. None for unrotated queries."""
    if not policy.needs_rotary or not isinstance(site.rotary, dict):
        return q, None, ready
    rope = site.rotary
    x, cos, sin = rope["x"], rope["cos"], rope["sin"]

    def insert(kind, target, args):
        nonlocal ready
        with graph.inserting_after(ready):
            ready = getattr(graph, kind)(target, args)
        return ready

    for op in rope["chain"]:  # the rotated queries' casts and layout ops, replayed on the unrotated ones
        with graph.inserting_after(ready):
            x = ready = graph.node_copy(op, lambda arg, op=op, x=x: x if arg is op.args[0] else arg)
    q, ready = _as_query_heads(graph, site, x, ready)
    if rope.get("complex"):  # cos + i sin
        parts = insert("call_function", torch.view_as_real, (cos,))
        cos = insert("call_function", operator.getitem, (parts, (Ellipsis, 0)))
        sin = insert("call_function", operator.getitem, (parts, (Ellipsis, 1)))
    if rope["widen"]:  # one entry per channel pair: both channels of a pair turn alike
        if rope["layout"] == "half":
            cos = insert("call_function", torch.cat, ((cos, cos), -1))
            sin = insert("call_function", torch.cat, ((sin, sin), -1))
        else:
            cos = insert("call_function", torch.repeat_interleave, (cos, 2, -1))
            sin = insert("call_function", torch.repeat_interleave, (sin, 2, -1))
    both = insert("call_function", torch.stack, ((cos, sin),))
    if rope["cos"].meta["example_value"].shape[1] != 1:
        both = insert("call_method", "transpose", (both, 2, 3))     # [B, S, 1, r]: RoPE before the heads' transpose
    if rope["layout"] == "pairs":
        both = insert("call_method", "unflatten", (both, -1, (-1, 2)))
    return q, both, ready


def _head_bias(graph: fx.Graph, site: Site, after: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The model's per-head score bias as [B or 1, H, Sq or 1, S] (BLOOM's
    [B*H, 1, S] unfolded, MPT's [H, 1, S] given a batch axis), and the last
    node inserted (``after`` when none was)."""
    bias = site.head_bias
    val = bias.meta["example_value"]
    if val.dim() == 4:
        return bias, after
    with graph.inserting_after(after):
        if isinstance(val.shape[0], int) and val.shape[0] == site.heads:
            bias = graph.call_function(operator.getitem, (bias, (None,)))
        else:
            bias = graph.call_method("unflatten", (bias, 0, (-1, site.heads)))
    return bias, bias


def position_bias_shift(head_bias: torch.Tensor, index: torch.Tensor, length) -> torch.Tensor:
    """What a kept slot's bias must gain so that a linear per-head position
    bias (ALiBi: slope x key position), which the model computes from slot
    numbers, reads the slot's original position instead: slope x (position -
    slot - (length - kept)). The last term is the shift the model's own bias
    gives every token after the prompt (a token at position p lands in slot
    p - (length - kept)): with it, new tokens need no correction and the
    softmax is unchanged by the constant. head_bias: [B|1, H, Sq|1, S] over
    the prompt; index: [B, H, kept] the original position of each slot."""
    row = torch.nn.functional.pad(head_bias[:, :, -1, :].float(), (1, 0), mode="replicate")  # 1 token: slope 0
    slope = row[..., -1] - row[..., -2]
    kept = index.shape[-1]
    slots = torch.arange(kept, device=index.device)
    return slope[..., None] * (index - slots - (length - kept)).float()


def _replace_output(graph: fx.Graph, site: Site, out: fx.Node) -> fx.Node:
    """kvfx's attention output [B, H, Sq, Dv] in place of the model's (folded
    back to [B*H, Sq, Dv] where the model's was: GPT-NeoX-Japanese folds the
    queries for its scores but reads [B, H, S, D] values; tiled heads put back
    in the model's order)."""
    if site.gqa == "tile":
        with graph.inserting_after(out):
            out = graph.call_method("unflatten", (out, 1, (site.kv_heads, -1)))
        with graph.inserting_after(out):
            out = graph.call_method("transpose", (out, 1, 2))
        with graph.inserting_after(out):
            out = graph.call_method("flatten", (out, 1, 2))
    if site.fold and site.node.meta["example_value"].dim() == 3:
        with graph.inserting_after(out):
            out = graph.call_method("flatten", (out, 0, 1))
    site.node.replace_all_uses_with(out)
    return out


def _reused_index(site: Site, policy, layer: int, kept_index: dict):
    """The kept-indices node of the layer this one reuses (ChunkKV), if it is in this graph; notes the choice."""
    source = policy.reuse_source(layer)
    reuse = kept_index.get(source) if source is not None else None
    text = ""
    if source is not None and reuse is None:
        text = f"indices of layer {source} are not in this graph: computed here"
    elif reuse is not None:
        text = f"reuses the indices of layer {source}"
    site.note = "; ".join(filter(None, (site.note, text)))
    return reuse


def _rewrite_store(graph: fx.Graph, site: Site, policy, spec: str, layer: int, n_layers: int,
                   kept_index: dict, call, inline_decode: bool = True, lse=None, sums=None,
                   inline_step: bool = False) -> dict:
    """Rewrite one store site; returns the graph-output nodes it replaced.
    ``inline_step``: a continuous policy's decode step may be tensor code in
    the graph with its attention (``kvfx.decode_step``) where the attention
    is; only Inductor performs its slot writes in place."""
    store = site.store
    replaced = {}
    q, mask, ready = _queries_and_mask(graph, site, site.node)
    if site.phase == "prefill":
        reuse = _reused_index(site, policy, layer, kept_index)
        page = store.args[2]
        out_proj, ready = _lent_out_projection(graph, site, ready)
        q, rotary, ready = _lent_rotary(graph, site, policy, q, ready)
        items = call(torch.ops.kvfx.store_compress.default,
                     (q if policy.needs_queries else None, site.k, site.v, mask, reuse, spec, layer,
                      n_layers, float(site.scale), page, lse, sums, out_proj, rotary), ready)
        kept_index[layer] = items[-1]
        # The mark's outputs are what dynamo writes into the layer: take the
        # compressed store's instead (getitem nodes moved after them).
        for user in list(store.users):
            replaced[user] = items[user.args[1]]
            user.replace_all_uses_with(replaced[user])
            graph.erase_node(user)
        graph.erase_node(store)
        return replaced
    k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, extent = store.args[2:11]
    inline = inline_decode and _inline_decode(site, policy, layer, k_pages)
    if inline and inline_step and policy.schedule == "continuous" and steps_in_graph(policy):
        with graph.inserting_after(ready):
            out = graph.call_function(attention_and_step, (q, *store.args[2:11], site.kv_heads, float(site.scale),
                                                           spec, layer, n_layers))
        site.inline = attention_and_step.__name__
        site.note = "decode attention and the policy's step in the graph (equal rows, CPU)"
        replaced[site.node] = _replace_output(graph, site, out)
        return replaced
    if inline:
        with graph.inserting_after(ready):
            out = graph.call_function(paged_attention_uniform,
                                      (q, k_pages, v_pages, slot_bias, site.kv_heads, float(site.scale)))
        site.inline, site.note = paged_attention_uniform.__name__, "decode attention in the graph (equal rows, CPU)"
    else:
        (out,) = call(torch.ops.kvfx.store_attend.default,
                      (q, k_pages, v_pages, slot_bias, page_table, lengths, float(site.scale), float(site.softcap),
                       site.sinks), ready)
    replaced[site.node] = _replace_output(graph, site, out)  # (an attention output the graph returns)
    if policy.schedule == "continuous":
        out_proj, after = _lent_out_projection(graph, site, out)
        with graph.inserting_after(after):
            graph.call_function(torch.ops.kvfx.store_step.default,
                                (q, *store.args[2:11], spec, layer, n_layers, float(site.scale), out_proj))
    return replaced


def _lent_out_projection(graph: fx.Graph, site: Site, ready: fx.Node) -> tuple:
    """(the output projection's weight [hidden, H x Dv] for the compress op,
    the node the op goes after): ``lend_policy_inputs`` found it; a
    Conv1D's [H x Dv, hidden] weight is transposed in the graph (a view)."""
    if site.out_proj is None:
        return None, ready
    weight, transposed = site.out_proj
    if not transposed:
        return weight, ready
    with graph.inserting_after(ready):
        weight = graph.call_method("t", (weight,))
    return weight, weight


def _prompt_lse(graph: fx.Graph, site: Site, policy) -> tuple:
    """What the prompt's attention lends a column-sum scorer: when the site's
    attention is a plain causal ``scaled_dot_product_attention`` (no mask, no
    dropout, the queries kvfx scores), it becomes an op that computes the same
    attention and also returns, on the CPU in float32, the policy's column
    sums themselves (``kvfx::attention_column_sums``: one pass over q.k in
    all), elsewhere each query's log-sum-exp (``kvfx::attention_lse``: the
    scorer then takes one more pass). ``site.node`` becomes its attention
    output. Returns (lse node, sums node), either or both None (the scorer
    then takes two passes over q.k). ``KVFX_KERNELS`` set keeps the
    log-sum-exp path, whose column sums are the kernels'."""
    node = site.node
    if site.attention != "sdpa" or site.fold or site.gqa == "tile" or not (node.op == "call_function"
                                                                          and node.target in SDPA):
        return None, None
    q, k, v = node.args[:3]
    q_val, k_val, v_val = (x.meta.get("example_value") for x in (q, k, v))
    if (q is not site.q or q_val is None or k_val is None or v_val is None or _arg(node, 3, "attn_mask") is not None
            or _arg(node, 4, "dropout_p", 0.0) != 0.0 or not _arg(node, 5, "is_causal", False)
            or q_val.shape[-2] != k_val.shape[-2]):
        return None, None
    # The sums are per cache KV head: over keys repeated per query head
    # (repeat_kv), the same attention reads the cache's own k, v grouped.
    kv = (k, v) if k_val.shape[1] == site.kv_heads else _cache_kv(site, k_val)
    fused = kv is not None and kernel_mode() is None and policy.sums_attention and kvfx.ops.sums_supported(
        q_val, *(x.meta["example_value"] for x in kv))
    with graph.inserting_after(node):
        if fused:
            decay, queries = policy.sum_terms()
            both = graph.call_function(torch.ops.kvfx.attention_column_sums.default,
                                       (q, *kv, _arg(node, 6, "scale"), float(decay), int(queries)))
        else:
            both = graph.call_function(torch.ops.kvfx.attention_lse.default, (q, k, v, _arg(node, 6, "scale")))
    # The lent tensor first: what the rewrite inserts after site.node may read it.
    with graph.inserting_after(both):
        lent = graph.call_function(operator.getitem, (both, 1))
    with graph.inserting_after(lent):
        out = graph.call_function(operator.getitem, (both, 0))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    site.node = out
    if fused:
        site.note = "the prompt's attention also sums each key's attention: no pass of the scorer's own over q.k"
        return None, lent
    site.note = "the prompt's attention also returns its log-sum-exp: one pass for the column sums"
    return lent, None


def _cache_kv(site: Site, k_val) -> Any:
    """The cache's k, v nodes [B, Hkv, S, D] that a repeat_kv'd attention
    (``k_val``: [B, H, S, D]) reads, or None where they are not plainly that
    (a module buffer, a tiled repeat, other shapes)."""
    if site.gqa != "repeat" or site.cache not in ("dynamic", "store") or site.k is None or site.v is None:
        return None
    kc, vc = site.k.meta.get("example_value"), site.v.meta.get("example_value")
    if kc is None or vc is None or kc.dim() != 4 or vc.dim() != 4:
        return None
    if tuple(kc.shape) != (k_val.shape[0], site.kv_heads, *k_val.shape[2:]) or vc.shape[:3] != kc.shape[:3]:
        return None
    return site.k, site.v


def _inline_decode(site: Site, policy, layer: int, k_pages: fx.Node) -> bool:
    """Whether a store's decode attention can be plain tensor code in the
    graph (``paged_attention_uniform``) rather than ``kvfx::store_attend``:
    one new token, on the CPU (where the op would run the same torch code
    behind a Python dispatch), without soft-capping or sinks, over rows that
    all own the same pages -- which a policy keeping as many slots in every
    head of the layer guarantees. ``KVFX_KERNELS`` set when the graph is
    rewritten keeps the op. Viewing the pages per row adds a shape guard (the
    page count divides by batch x KV heads), so ``kvfx.set_policy``, which
    rewrites graphs traced under another policy's store, keeps the op."""
    value = site.node.meta.get("example_value")
    pages = k_pages.meta.get("example_value")
    if value is None or pages is None or value.shape[-2] != 1 or pages.device.type != "cpu" or kernel_mode():
        return False
    if site.softcap or site.sinks is not None or site.kv_heads is None:
        return False
    return not policy.keep().shared_across_heads and not policy.full_heads(layer)


def _rewrite_buffer(graph: fx.Graph, site: Site, policy, spec: str, layer: int, n_layers: int, kept_index: dict,
                    call, placeholder, fake_mode, lse=None, sums=None):
    """Rewrite one site over a module buffer kvfx takes over (kvfx.buffers).
    Prefill: compress the prompt's k, v after the model's attention; returns
    the outputs the runtime adopts (k, v, bias, tokens seen). Decode (the
    buffers are phantoms): drop the model's writes, attend over the store's
    four new inputs (``placeholder(name)`` makes each); returns the output
    node and the inputs' fakes. None when the site is left alone."""
    k_new, v_new, ready = site.k_new, site.v_new, site.node
    if site.seq_dim == 1:  # [B, S, Hkv, D] (Meta): kvfx's ops read [B, Hkv, S, D]
        with graph.inserting_after(ready):
            k_new = graph.call_method("transpose", (k_new, 1, 2))
        with graph.inserting_after(k_new):
            v_new = ready = graph.call_method("transpose", (v_new, 1, 2))
    if site.phase == "prefill":
        reuse = _reused_index(site, policy, layer, kept_index)
        with graph.inserting_after(ready):
            new_len = graph.call_method("size", (k_new, -2))
        q, mask, ready = _queries_and_mask(graph, site, new_len)
        out_proj, ready = _lent_out_projection(graph, site, ready)
        q, rotary, ready = _lent_rotary(graph, site, policy, q, ready)
        k_c, v_c, bias, _score, kept = call(
            torch.ops.kvfx.compress.default,
            (q if policy.needs_queries else None, k_new, v_new, mask, reuse, spec, layer, n_layers,
             float(site.scale), None, lse, sums, out_proj, rotary), ready)
        kept_index[layer] = kept
        with graph.inserting_after(kept):
            seen = graph.call_function(torch.full, ([], new_len), {"dtype": torch.int64})
        return [k_c, v_c, bias, seen]
    if not isinstance(site.k_new.meta["example_value"].shape[site.seq_dim], int):
        site.reason = ("the tokens each decode call writes into the buffer are a symbolic count: kvfx sizes the "
                       "buffer's store on the host from a fixed count")
        return None
    store_inputs = [placeholder(name) for name in ("k", "v", "slot_bias", "fill")]
    for write in site.writes:  # the phantom is never written: the store takes the tokens
        graph.erase_node(write)
    q, _mask, ready = _queries_and_mask(graph, site, ready)
    with graph.inserting_after(ready):
        out = graph.call_function(buffer_attend, (q, k_new, v_new, *store_inputs, float(site.scale),
                                                  float(site.softcap)))
    out = _replace_output(graph, site, out)
    with fake_mode:  # one slot here: the runtime compiles the graph for its stores' capacities
        k_val, v_val = site.k_new.meta["example_value"], site.v_new.meta["example_value"]
        b, h, device = k_val.shape[0], k_val.shape[3 - site.seq_dim], k_val.device
        fakes = [torch.empty(b, h, 1, k_val.shape[3], dtype=k_val.dtype, device=device),
                 torch.empty(b, h, 1, v_val.shape[3], dtype=v_val.dtype, device=device),
                 torch.empty(b, h, 1, dtype=torch.float32, device=device),
                 torch.empty((), dtype=torch.int64, device=device)]
    for node, fake in zip(store_inputs, fakes):
        node.meta["example_value"] = fake
    return out, fakes


def _is_impure(node: fx.Node) -> bool:
    # Keep in-place methods (StaticCache's index_copy_, user mutations): FX
    # treats call_method nodes as pure. Keep kvfx's in-place store ops.
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    schema = getattr(getattr(node.target, "default", node.target), "_schema", None)
    if node.op == "call_function" and schema is not None and schema.is_mutable:
        return True
    if node.op == "call_function" and "functorch" in (getattr(node.target, "__module__", None) or ""):
        return True  # vmap's nesting calls (transformers' mask functions): unused results, needed effects
    return node.is_impure()
