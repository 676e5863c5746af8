"""Rewrite compressible sites to kvfx ops and thread per-slot state.

For each compressible ``Site``:
  * prefill (the cache starts empty): attention is left as the model wrote it
    (it sees the whole prompt); ``kvfx::compress`` runs after it and the cache
    write-back outputs become the compressed K and V.
  * decode (the cache comes in as a graph input): attention becomes
    ``kvfx::attend``, which reads the slot state of the incoming cache
    (three new graph inputs: slot_bias, has_state, seen) and returns the state
    for the cache written back.

Every compressible site adds two graph outputs after the model's own:
slot_bias [B, Hkv, S] and seen (tokens the cache has absorbed, a 0-d int64).
The runtime (``kvfx.runtime``) feeds the extra inputs and strips the extra
outputs, so the caller sees the model's original signature.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch
from torch import fx

from kvfx.passes.sites import Site

import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx)

POSITION_INPUT_HINTS = ("position", "cache_position")


@dataclasses.dataclass
class StatePlan:
    """What the runtime needs to thread state through one rewritten graph."""

    n_outputs: int                      # the model's own outputs
    output_is_sequence: bool
    decode_args: list[int]              # arg index of each decode site's incoming key cache
    state_outputs: list[int]            # output index of each compressible site's key write-back
    positions_from_cache: bool          # the graph has no position input: it derives positions from cache length
    example_inputs: list = dataclasses.field(default_factory=list)


def rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any], sites: list[Site], policy) -> StatePlan:
    """Rewrite ``gm`` in place for ``policy``; returns the runtime's plan."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = graph.output_node()
    raw_out = out_node.args[0]
    is_sequence = isinstance(raw_out, (tuple, list))
    outputs = list(raw_out) if is_sequence else [raw_out]
    n_outputs = len(outputs)
    spec = policy.spec()
    fake_mode = torch._guards.detect_fake_mode(list(example_inputs))
    example_inputs = list(example_inputs)
    extra_outputs: list[fx.Node] = []
    decode_args: list[int] = []
    state_outputs: list[int] = []
    last_placeholder = placeholders[-1]

    for site in sites:
        if not site.compressible:
            continue
        state_outputs.append(site.k_out)
        with graph.inserting_after(site.node):
            new_len = graph.call_method("size", (site.k_new, -2))
        if site.phase == "prefill":
            with graph.inserting_after(new_len):
                packed = graph.call_function(
                    torch.ops.kvfx.compress.default,
                    (site.q, site.k, site.v, site.mask, spec, site.layer or 0, float(site.scale)),
                )
            with graph.inserting_after(packed):
                k_c = graph.call_function(operator.getitem, (packed, 0))
                v_c = graph.call_function(operator.getitem, (packed, 1))
                bias = graph.call_function(operator.getitem, (packed, 2))
                seen = graph.call_function(torch.full, ([], new_len), {"dtype": torch.int64})
            outputs[site.k_out], outputs[site.v_out] = k_c, v_c
        else:
            past = site.k_past.meta["example_value"]
            batch, kv_heads, past_len = past.shape[0], past.shape[1], past.shape[2]
            with graph.inserting_after(last_placeholder):
                bias_in = graph.placeholder(f"kvfx_slot_bias_{site.index}")
            with graph.inserting_after(bias_in):
                flag_in = graph.placeholder(f"kvfx_has_state_{site.index}")
            with graph.inserting_after(flag_in):
                seen_in = graph.placeholder(f"kvfx_seen_{site.index}")
            last_placeholder = seen_in
            with fake_mode:
                fakes = [
                    torch.empty(batch, kv_heads, past_len, dtype=torch.float32, device=past.device),
                    torch.empty((), dtype=torch.bool, device=past.device),
                    torch.empty((), dtype=torch.int64, device=past.device),
                ]
            for node, fake in zip((bias_in, flag_in, seen_in), fakes):
                node.meta["example_value"] = fake
            example_inputs.extend(fakes)
            decode_args.append(placeholders.index(site.k_past))
            with graph.inserting_after(new_len):
                packed = graph.call_function(
                    torch.ops.kvfx.attend.default,
                    (site.q, site.k, site.v, bias_in, flag_in, site.mask, float(site.scale), float(site.softcap)),
                )
            with graph.inserting_after(packed):
                attn_out = graph.call_function(operator.getitem, (packed, 0))
                bias = graph.call_function(operator.getitem, (packed, 1))
                seen = graph.call_function(operator.add, (seen_in, new_len))
            site.node.replace_all_uses_with(attn_out)
        extra_outputs += [bias, seen]

    out_node.args = (tuple(outputs + extra_outputs),)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    gm.recompile()
    names = [p.name.lower() for p in placeholders]
    return StatePlan(
        n_outputs=n_outputs,
        output_is_sequence=is_sequence,
        decode_args=decode_args,
        state_outputs=state_outputs,
        positions_from_cache=bool(decode_args) and not any(h in n for n in names for h in POSITION_INPUT_HINTS),
        example_inputs=example_inputs,
    )


def _is_impure(node: fx.Node) -> bool:
    # Keep in-place methods (StaticCache's index_copy_, user mutations): FX
    # treats call_method nodes as pure.
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    return node.is_impure()
