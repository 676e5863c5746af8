"""Helpers for checking kvfx on your own models in your own CI.

    from kvfx.testing import assert_rewritten, assert_equivalent, tiny_model
    assert_rewritten(model, kvfx.SnapKV(budget=0.5), input_ids)
    assert_equivalent(model, input_ids)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import kvfx
from kvfx.api import GraphRecord, restore
from kvfx.integrations.transformers import cache_entries, is_store, layer_entry, output_cache
from kvfx.policies import Policy, StreamingLLM


@dataclasses.dataclass
class Run:
    """One generation: its tokens, per-step logits, final cache and graphs."""

    tokens: torch.Tensor
    logits: list[torch.Tensor]
    cache: object
    records: list[GraphRecord]
    graph_breaks: int


def cache_lengths(cache) -> list[int]:
    """Slots per layer of a transformers cache (or a tuple of (k, v) pairs): a
    kvfx slot store's longest row, a rectangular cache's length. Layers that
    hold no keys (a hybrid's linear-attention or SSM layers) are skipped."""
    return list(cache_lengths_by_layer(cache).values())


def cache_lengths_by_layer(cache) -> dict[int, int]:
    """``cache_lengths`` keyed by each layer's index in the model."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)):
        indexed = [(i, entry) for i, entry in enumerate(map(layer_entry, layers)) if entry is not None]
    else:
        indexed = list(enumerate(cache_entries(cache)))
    return {i: int(e.lengths.max()) if is_store(e) else e[0].shape[-2] for i, e in indexed}


def generate(model, input_ids, *, policy: Optional[Policy] = None, inner: str = "aot_eager", steps: int = 16,
             attention_mask: Optional[torch.Tensor] = None, streamer=None) -> Run:
    """Greedy generation, eager when ``policy`` is None, else through kvfx.
    Restores the model's forward afterwards. ``streamer``: a transformers
    streamer (e.g. a progress bar) fed the prompt, then each new token."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if attention_mask is None:  # never let generate() guess padding from token ids
        attention_mask = torch.ones_like(input_ids)
    records: list[GraphRecord] = []
    if policy is not None:
        kvfx.compile(model, policy, inner=inner)
        records = model._kvfx_backend.records
    try:
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, return_dict_in_generate=True, output_logits=True,
                                 pad_token_id=getattr(model.config, "pad_token_id", None) or 0, streamer=streamer)
    finally:
        if policy is not None:
            restore(model)
    breaks = sum(counters["graph_break"].values())
    return Run(out.sequences, list(out.logits), output_cache(out), records, breaks)


def no_compression() -> Policy:
    """A policy whose budget exceeds any test prompt: the cache stays whole."""
    return StreamingLLM(budget=1 << 30)


def assert_equivalent(model, input_ids, *, attention_mask=None, policy: Optional[Policy] = None,
                      inner: str = "aot_eager", steps: int = 16, atol: float = 1e-4,
                      require_rewrite: bool = True) -> None:
    """With a budget that exceeds the prompt, kvfx must not change anything:
    same greedy tokens and logits within ``atol`` of eager, every step.
    ``require_rewrite=False`` for models with no compressible layer."""
    policy = policy or no_compression()
    eager = generate(model, input_ids, attention_mask=attention_mask, steps=steps)
    compiled = generate(model, input_ids, attention_mask=attention_mask, policy=policy, inner=inner, steps=steps)
    assert not require_rewrite or any(r.rewritten for r in compiled.records), "kvfx rewrote no attention site: nothing was checked"
    for step, (a, b) in enumerate(zip(eager.logits, compiled.logits)):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= atol, f"step {step}: logits differ from eager by {diff:.3g} (> {atol})"
    assert torch.equal(eager.tokens, compiled.tokens), (
        f"greedy tokens differ from eager:\n{eager.tokens}\n{compiled.tokens}")


def assert_rewritten(model, policy: Policy, input_ids, *, attention_mask=None, inner: str = "aot_eager",
                     steps: int = 2) -> Run:
    """Every attention site that reads a compressible cache is rewritten, every
    other one carries the reason why not, and at least one site is rewritten."""
    run = generate(model, input_ids, attention_mask=attention_mask, policy=policy, inner=inner, steps=steps)
    assert run.records, "kvfx was never called: the compiled forward is not the one generate() runs"
    sites = [s for r in run.records for s in r.sites]
    assert sites, "no attention call was found in any graph"
    for s in sites:
        assert s.compressible or s.reason, f"site {s.module} is neither rewritten nor explained"
    assert any(s.compressible for s in sites), "no site was rewritten: " + "; ".join(sorted({s.reason for s in sites}))
    for record in run.records:
        for s in record.rewritten:
            assert s.op in record.code_after, f"graph {record.index}: {s.module} is marked rewritten but {s.op} is absent"
    return run


def against_reference(model, input_ids, policy: Policy, *, steps: int = 16, attention_mask=None,
                      inner: str = "aot_eager") -> tuple[Run, Run]:
    """The same greedy generation compiled with ``policy`` and under its eager
    reference (``kvfx.testing.reference``): (compiled, reference). Asserts
    the compiled one rewrote a site without a graph break and that both chose
    the same tokens; compare their logits and caches further as you need."""
    from kvfx.testing.reference import eager_reference

    compiled = generate(model, input_ids, attention_mask=attention_mask, policy=policy, inner=inner, steps=steps)
    with eager_reference(model, policy):
        reference = generate(model, input_ids, attention_mask=attention_mask, steps=steps)
    assert compiled.graph_breaks == 0, f"{compiled.graph_breaks} graph break(s)"
    assert any(r.rewritten for r in compiled.records), "kvfx rewrote no attention site: nothing was checked"
    assert torch.equal(compiled.tokens, reference.tokens), (
        f"greedy tokens differ from the eager reference:\n{compiled.tokens}\n{reference.tokens}")
    return compiled, reference


def assert_padded_row_keeps_what_it_keeps_alone(model, policy: Policy, input_ids, pad: int,
                                                atol: float = 1e-5) -> None:
    """Row 1 of ``input_ids`` [2, S], left-padded by ``pad`` tokens, keeps in
    every layer and KV head the keys it keeps when it runs alone."""
    ids, mask = input_ids.clone(), torch.ones_like(input_ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    both = generate(model, ids, attention_mask=mask, policy=policy, steps=1)
    alone = generate(model, ids[1:, pad:], policy=policy, steps=1)
    for layer, (padded, single) in enumerate(zip(both.cache.layers, alone.cache.layers)):
        live = torch.isfinite(padded.dense()[2][1])                  # [Hkv, slots]: the row's real kept slots
        for head in range(live.shape[0]):
            torch.testing.assert_close(padded.keys[1, head][live[head]], single.keys[0, head], rtol=0, atol=atol,
                                       msg=lambda m: f"layer {layer}, KV head {head}: {m}")
