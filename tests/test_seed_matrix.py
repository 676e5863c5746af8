"""Every seed method and continuous baseline on the architecture matrix:
prefill + 32 decode steps, at most 3 graphs, no graph break, compressible
layers at the policy's length.

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
}
# Same-length layers for eager attention: transformers adds one mask sized for
# the first layer to every layer (see test_uneven_layers_with_eager_attention_fail_clearly).
EAGER_SAFE = {
    "RazorAttention": kvfx.RazorAttention(budget=0.2, sinks=2, window=4),
}
ARCHS = [(name, attn) for name, entry in ZOO.items() if name != "mistral_sliding" for attn in entry.attn_impls]
PROMPT, STEPS = 24, 32

if os.environ.get("KVFX_FULL_MATRIX") == "1":
    PAIRS = [(a, m) for a in ARCHS for m in METHODS]
else:  # each architecture once, methods assigned round-robin
    PAIRS = [(arch, list(METHODS)[i % len(METHODS)]) for i, arch in enumerate(ARCHS)]


@pytest.mark.parametrize("arch,method", [pytest.param(a, m, id=f"{a[0]}-{a[1]}-{m}") for a, m in PAIRS])
def test_method_runs_on_architecture(arch, method):
    name, attn = arch
    masked = attn == "eager" or name == "falcon"   # a materialised mask: layers must be of one length
    policy = EAGER_SAFE.get(method, METHODS[method]) if masked else METHODS[method]
    model = tiny_model(name, attn=attn)
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT))
    run = generate(model, ids, policy=policy, steps=STEPS)
    assert len(run.records) <= 3, f"{len(run.records)} graphs"
    assert run.graph_breaks == 0
    rewritten = {s.layer for r in run.records for s in r.rewritten}
    assert rewritten, "no layer rewritten"
    n_layers = model.config.num_hidden_layers
    for layer, held in enumerate(cache_lengths(run.cache)):
        if layer not in rewritten:
            continue
        kept = policy.kept_length(PROMPT, layer, n_layers)
        expected = kept if policy.schedule == "continuous" else kept + STEPS - 1
        assert held == expected, f"layer {layer}: {held} slots, expected {expected}"
    state = run.cache.layers[min(rewritten)].keys._kvfx_state
    assert int(state.seen) == PROMPT + STEPS - 1


def test_uneven_layers_with_a_materialised_mask_fail_clearly():
    model = tiny_model("falcon", attn="sdpa")                 # Falcon builds a 4-D mask even for SDPA
    ids = torch.randint(2, 100, (1, PROMPT))
    with pytest.raises(ValueError, match=r"different cache lengths.*materialises its attention mask"):
        generate(model, ids, policy=METHODS["RazorAttention"], steps=3)


def test_uneven_layers_with_eager_attention_fail_clearly():
    model = tiny_model("llama", attn="eager")
    ids = torch.randint(2, 100, (1, PROMPT))
    with pytest.raises(ValueError, match=r"different cache lengths \[8, 24\].*'eager'"):
        generate(model, ids, policy=METHODS["RazorAttention"], steps=3)
