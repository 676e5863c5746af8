"""RazorAttention() with no retrieval heads: kvfx finds them for you, once
per model, and says so; where it cannot, it says why."""

import logging

import pytest
import torch

import kvfx
import kvfx.heads
from kvfx.testing import cache_lengths, generate
from kvfx.testing.zoo import tiny_model

RAZOR = dict(budget=0.1, sinks=2, window=4)


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """Counts the probe's model runs; a fresh cache directory per test."""
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    probe = kvfx.heads.probe_scores

    def counted(model, **kwargs):
        calls.append(kwargs)
        return probe(model, **kwargs)

    monkeypatch.setattr(kvfx.heads, "probe_scores", counted)
    return calls


def heads_used(model, policy) -> tuple:
    """The retrieval heads kvfx.compile gives ``policy`` on ``model``."""
    kvfx.compile(model, policy, inner="aot_eager")
    try:
        return model._kvfx_backend.policy.retrieval_heads
    finally:
        kvfx.restore(model)


def test_heads_are_probed_once_per_model_and_cached(probes, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="kvfx"):
        found = heads_used(model, kvfx.RazorAttention(**RAZOR))
    assert len(probes) == 1
    block = kvfx.heads.probe_block(model)
    assert found and found == kvfx.find_retrieval_heads(model, block=block, repeats=kvfx.heads.PROBE_REPEATS)
    probed = [r for r in caplog.records if r.levelno == logging.WARNING and "found the retrieval heads" in r.message]
    assert len(probed) == 1 and str(kvfx.heads.head_map_path(model)) in probed[0].message
    assert kvfx.load_head_map(kvfx.heads.head_map_path(model), model) == found
    # The same weights in a new process's model: the cached map, no probe.
    probes.clear()
    assert heads_used(tiny_model("llama"), kvfx.RazorAttention(**RAZOR)) == found
    assert probes == []
    # Other weights of the same architecture (a fine-tune): probed afresh.
    tuned = tiny_model("llama", seed=1)
    assert kvfx.heads.head_map_path(tuned) != kvfx.heads.head_map_path(model)
    heads_used(tuned, kvfx.RazorAttention(**RAZOR))
    assert len(probes) == 1


def test_found_heads_generate_what_the_same_heads_given_by_hand_do(probes):
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    found = generate(model, ids, policy=kvfx.RazorAttention(**RAZOR), steps=4)
    heads = kvfx.load_head_map(kvfx.heads.head_map_path(model), model)
    given = generate(model, ids, policy=kvfx.RazorAttention(**RAZOR, retrieval_heads=heads), steps=4)
    none = generate(model, ids, policy=kvfx.RazorAttention(**RAZOR, retrieval_heads=()), steps=4)
    assert torch.equal(found.tokens, given.tokens)
    for a, b in zip(found.logits, given.logits):
        assert torch.equal(a, b)
    # The heads matter: the retrieval heads keep every slot, so the cache is larger than with none.
    assert cache_lengths(found.cache) != cache_lengths(none.cache)


def test_explicit_empty_heads_never_probe(probes):
    assert heads_used(tiny_model("llama"), kvfx.RazorAttention(**RAZOR, retrieval_heads=())) == ()
    assert probes == []


def test_a_corrupted_cached_map_is_probed_again(probes, caplog):
    model = tiny_model("llama")
    path = kvfx.heads.head_map_path(model)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kvfx"):
        found = heads_used(model, kvfx.RazorAttention(**RAZOR))
    assert len(probes) == 1 and kvfx.load_head_map(path, model) == found
    assert any("not a kvfx head map" in r.message for r in caplog.records)


def test_a_policy_inside_a_composition_gets_its_heads(probes):
    policy = kvfx.Compose(kvfx.RazorAttention(**RAZOR), fold_rule=kvfx.Evict())
    model = tiny_model("llama")
    kvfx.compile(model, policy, inner="aot_eager")
    try:
        inner = model._kvfx_backend.policy.policy
    finally:
        kvfx.restore(model)
    assert isinstance(inner, kvfx.RazorAttention) and inner.retrieval_heads and len(probes) == 1


class Plain(torch.nn.Module):
    def forward(self, x):
        return x + 1


def test_where_kvfx_cannot_probe_it_says_why_and_names_the_way_out(probes):
    with pytest.raises(ValueError, match=r"Plain is not a transformers model.*retrieval_heads=\(\(layer, kv_head\)"):
        kvfx.compile(Plain(), kvfx.RazorAttention())
    with pytest.raises(ValueError, match=r"kvfx.backend: RazorAttention\(retrieval_heads=None\).*pass model="):
        kvfx.backend(kvfx.RazorAttention())
    # A policy that reaches compression without heads (the op called by hand) names the missing step.
    k = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match=r"retrieval_heads=None means \"find them\""):
        kvfx.RazorAttention(budget=4, sinks=1, window=2).compress(None, k, k, torch.ones(1, 12, dtype=torch.bool), 0.3)
    assert probes == []


def test_set_policy_finds_the_heads_too(probes):
    model = tiny_model("llama")
    kvfx.compile(model, kvfx.SnapKV(budget=0.5), inner="aot_eager")
    try:
        kvfx.set_policy(model, kvfx.RazorAttention(**RAZOR))
        assert model._kvfx_backend.policy.retrieval_heads and len(probes) == 1
    finally:
        kvfx.restore(model)
