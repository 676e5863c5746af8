"""Every seed method, continuous baseline, per-layer / per-head budget, query-agnostic score and
ExpectedAttention (the queries before RoPE, found in each architecture's graph) on
the architecture matrix: prefill + 32 decode steps, at most 2 graphs, no
graph break, compressible layers at the policy's length -- eager attention
and materialised masks included, whatever the layers' lengths.

CI runs a covering subset (every architecture with at least one method, every
method on several architectures); KVFX_FULL_MATRIX=1 runs all pairs.
"""

import os

import pytest
import torch

import kvfx
from kvfx.testing import cache_lengths, generate
from kvfx.testing.zoo import ZOO, tiny_model

METHODS = {
    "KVMerger": kvfx.KVMerger(budget=0.5, exempt_layers=(), count_bias=True),
    "ChunkKV": kvfx.ChunkKV(budget=0.5, window=4, chunk=4, reuse_every=2),
    "RazorAttention": kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((1, 0),)),
    "ZeroMerge": kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
    "TOVA": kvfx.TOVA(budget=0.5),
    "PyramidKV": kvfx.PyramidKV(budget=0.3, window=4),
    "AdaKV": kvfx.AdaKV(budget=0.35, window=4),
    "KeyDiff": kvfx.KeyDiff(budget=0.35),
    "LagKV": kvfx.LagKV(budget=0.35, sinks=2, lag=4),
    "CUR": kvfx.CUR(budget=0.35, sinks=2, local_window=4),
    "ExpectedAttention": kvfx.ExpectedAttention(budget=0.35, sinks=2, n_future_positions=16),
}
# Not here: nothing to compress (every window binds; ALiBi), or a latent cache kvfx compresses on transformers'
# own layers, not in a slot store (tests/test_matrix.py and tests/test_gallery.py cover it).
NOT_STORES = {"mistral_sliding", "bloom", "deepseek_v3"}
ARCHS = [(name, attn) for name, entry in ZOO.items() if name not in NOT_STORES for attn in entry.attn_impls]
PROMPT, STEPS = 24, 32

if os.environ.get("KVFX_FULL_MATRIX") == "1":
    PAIRS = [(a, m) for a in ARCHS for m in METHODS]
else:  # each architecture once, methods assigned round-robin
    PAIRS = [(arch, list(METHODS)[i % len(METHODS)]) for i, arch in enumerate(ARCHS)]


@pytest.mark.parametrize("arch,method", [pytest.param(a, m, id=f"{a[0]}-{a[1]}-{m}") for a, m in PAIRS])
def test_method_runs_on_architecture(arch, method):
    name, attn = arch
    policy = METHODS[method]
    model = tiny_model(name, attn=attn)
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT))
    run = generate(model, ids, policy=policy, steps=STEPS)
    # two graphs: prefill and decode (a sliding-window layer's own cache adds one when it fills)
    assert len(run.records) <= 2 + ZOO[name].sliding, f"{len(run.records)} graphs"
    assert run.graph_breaks == 0
    rewritten = {s.layer for r in run.records for s in r.rewritten}
    assert rewritten, "no layer rewritten"
    n_layers = model.config.num_hidden_layers
    for layer in rewritten:
        store = run.cache.layers[layer]
        heads = policy.head_slots(PROMPT, layer, n_layers, store.lengths.shape[1])
        grown = 0 if policy.schedule == "continuous" else STEPS - 1
        held, expected = store.lengths.sum().item(), sum(heads) + grown * len(heads)
        assert held == expected, f"layer {layer}: its heads hold {held} slots, expected {expected}"
    assert kvfx.tokens_seen(run.cache.layers[min(rewritten)]) == PROMPT + STEPS - 1


@pytest.mark.parametrize("name,attn", [("falcon", "sdpa"), ("llama", "eager")])
def test_layers_of_different_lengths_decode_with_a_materialised_mask(name, attn):
    """Falcon builds a 4-D mask even for SDPA; eager attention adds one: the
    store's layers differ in length and kvfx's attention masks each itself."""
    model = tiny_model(name, attn=attn)
    ids = torch.randint(2, 100, (1, PROMPT))
    policy = METHODS["RazorAttention"]
    run = generate(model, ids, policy=policy, steps=4)
    kept = policy.budget_length(PROMPT) + 3                    # sinks, recent, compensation; 3 decode tokens
    assert cache_lengths(run.cache) == [kept, PROMPT + 3]
    heads = run.cache.layers[1].lengths.shape[1]                # Falcon caches a K/V per query head
    assert run.cache.layers[1].lengths[0].tolist() == [PROMPT + 3] + [kept] * (heads - 1)
