"""The architecture matrix: every family of the zoo, sdpa and eager attention."""

import re

import pytest
import torch

import kvfx
from kvfx.explain import Report
from kvfx.testing import assert_equivalent, assert_rewritten, cache_lengths, cache_lengths_by_layer, generate
from kvfx.testing.zoo import ZOO, tiny_model

PAIRS = [pytest.param(name, attn, id=f"{name}-{attn}") for name, entry in ZOO.items() for attn in entry.attn_impls]
# With no compression, CI checks each family under one attention (SDPA where it has it; KVFX_SLOW=1 adds
# eager attention everywhere): the compressed check below runs both for every family.
UNCOMPRESSED_PAIRS = [
    pytest.param(name, attn, id=f"{name}-{attn}",
                 marks=[pytest.mark.slow] if attn == "eager" and "sdpa" in entry.attn_impls else [])
    for name, entry in ZOO.items() for attn in entry.attn_impls]
# Entries with nothing kvfx compresses, and what it must say about them.
LEFT_ALONE = {
    "mistral_sliding": "sliding-window layer",  # every layer's window binds: the cache is bounded already
}
PROMPT = 24
STEPS = 32


def prompt(model, batch=1, length=PROMPT):
    return torch.randint(2, model.config.vocab_size, (batch, length))


@pytest.mark.parametrize("name,attn", UNCOMPRESSED_PAIRS)
def test_budget_above_prompt_matches_eager(name, attn):
    model = tiny_model(name, attn=attn)
    assert_equivalent(model, prompt(model), steps=16, atol=1e-4, require_rewrite=name not in LEFT_ALONE)


@pytest.mark.parametrize("name,attn", PAIRS)
def test_snapkv_half_budget_cache_lengths_graphs_and_breaks(name, attn):
    model = tiny_model(name, attn=attn)
    ids = prompt(model)
    eager = generate(model, ids, steps=STEPS)
    policy = kvfx.SnapKV(budget=0.5, window=4)
    if name in LEFT_ALONE:
        with pytest.warns(UserWarning, match=re.escape(LEFT_ALONE[name])):
            run = generate(model, ids, policy=policy, steps=STEPS)
        assert cache_lengths(run.cache) == cache_lengths(eager.cache)
        return
    run = assert_rewritten(model, policy, ids, steps=STEPS)
    rewritten = {s.layer for r in run.records for s in r.rewritten}
    left_alone = {s.layer: s.reason for r in run.records for s in r.sites if not s.compressible}
    expected_compressed = (PROMPT + 1) // 2 + STEPS - 1
    eager_lengths, kept_lengths = cache_lengths_by_layer(eager.cache), cache_lengths_by_layer(run.cache)
    assert eager_lengths.keys() == kept_lengths.keys()
    for layer, full in eager_lengths.items():
        kept = kept_lengths[layer]
        if layer in rewritten:
            assert kept == expected_compressed, f"layer {layer}: {kept} slots, expected {expected_compressed}"
        else:
            assert kept == full, f"layer {layer} was not rewritten but its cache changed"
            assert layer in left_alone, f"layer {layer} is neither rewritten nor explained"
    # the table `kvfx inspect` prints says exactly what was rewritten
    rows = Report(policy, run.records, 0, 0).rows()
    assert sum(r[-1].startswith("rewritten") for r in rows) == sum(len(r.rewritten) for r in run.records)
    assert all(r[-1].startswith(("rewritten", "left alone: ")) and len(r[-1]) > 12 for r in rows)
    if ZOO[name].sliding:
        assert any("sliding" in why for why in left_alone.values()), "sliding layers must be reported"
    assert len(run.records) <= 3, f"{len(run.records)} graphs compiled for prefill + {STEPS} decode steps"
    assert run.graph_breaks == 0


def test_handwritten_gpt_with_tuple_cache():
    """The matrix checks on a plain nn.Module whose cache is a tuple of (k, v)."""
    from torch._dynamo.utils import counters

    from kvfx.testing.handwritten import TinyGPT, greedy_generate

    model = TinyGPT().eval()
    ids = torch.randint(0, 128, (1, PROMPT))
    expected = greedy_generate(model, ids, 16)
    with torch.no_grad():
        expected_logits, _ = model(ids)
    for policy, check in ((kvfx.StreamingLLM(budget=1 << 30), "equal"), (kvfx.SnapKV(budget=0.5, window=4), "lengths")):
        torch._dynamo.reset()
        counters.clear()
        kvfx.compile(model, policy, inner="aot_eager")
        if check == "equal":                                          # (a) budget above the prompt
            assert torch.equal(greedy_generate(model, ids, 16), expected)
            with torch.no_grad():
                torch.testing.assert_close(model(ids)[0], expected_logits, rtol=0, atol=1e-4)
        else:                                                         # (b) + (c)
            with torch.no_grad():
                logits, past = model(ids)
                for _ in range(STEPS - 1):
                    logits, past = model(logits[:, -1:].argmax(-1), past)
            assert [k.shape[-2] for k, _ in past] == [(PROMPT + 1) // 2 + STEPS - 1] * 2
            assert len(model._kvfx_backend.records) <= 3
            assert sum(counters["graph_break"].values()) == 0
        kvfx.restore(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sites_report_the_models_head_shape(attn):
    """Heads, KV heads and head_dim as explain prints them, with the model's
    4-D mask present (eager) or not (sdpa)."""
    model = tiny_model("llama", attn=attn)
    run = generate(model, prompt(model), policy=kvfx.SnapKV(budget=0.5, window=4), steps=2)
    shapes = {(s.heads, s.kv_heads, s.head_dim) for r in run.records for s in r.sites}
    assert shapes == {(4, 2, 16)}, shapes
