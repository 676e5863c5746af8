"""Policies compose primitives: a user's own subclass, ChunkKV over any scorer,
any keep followed by KVMerger's merge; each compiled rewrite equals its eager
reference."""

import dataclasses
from typing import Callable

import pytest
import torch

import kvfx
from kvfx.policies import key_of, policy_of
from kvfx.testing import cache_lengths, generate
from kvfx.testing.reference import eager_reference
from kvfx.testing.zoo import tiny_model

PROMPT, STEPS = 40, 6


@dataclasses.dataclass(frozen=True)
class MyNorm(kvfx.KNorm):
    """Keep the keys with the *largest* norm along the first ``dims`` channels."""

    dims: int = 4

    def score(self, q, k, valid, scale):
        return k[..., : self.dims].float().norm(dim=-1)


@dataclasses.dataclass(frozen=True)
class Weighted(kvfx.KNorm):
    """A field that is no literal: a function of the keys."""

    weigh: Callable = torch.abs

    def score(self, q, k, valid, scale):
        return self.weigh(k).sum(-1).float()


@dataclasses.dataclass(frozen=True)
class LastQuery(kvfx.Policy):
    """Reads the queries: the attention of the last one, head-averaged."""

    budget: float = 0.3

    def score(self, q, k, valid, scale):
        groups = q.shape[1] // k.shape[1]
        logits = q[:, :, -1:] @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
        return logits.softmax(-1)[:, :, 0].view(k.shape[0], k.shape[1], groups, -1).mean(2)


def prompt(model):
    return torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def assert_matches_eager_reference(model, policy, ids):
    compiled = generate(model, ids, policy=policy, steps=STEPS)
    with eager_reference(model, policy):
        reference = generate(model, ids, steps=STEPS)
    assert any(r.rewritten for r in compiled.records) and compiled.graph_breaks == 0
    assert torch.equal(compiled.tokens, reference.tokens)
    for a, b in zip(compiled.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
    return compiled


@pytest.mark.parametrize("policy", [MyNorm(budget=0.3), Weighted(budget=0.3, weigh=torch.square), LastQuery()],
                         ids=lambda p: type(p).__name__)
def test_a_users_subclass_compresses_and_matches_its_eager_reference(policy):
    model = tiny_model("llama")
    run = assert_matches_eager_reference(model, policy, prompt(model))
    assert cache_lengths(run.cache) == [12 + STEPS - 1] * 2


def test_a_users_subclass_keeps_what_its_own_score_ranks_highest():
    model = tiny_model("llama")
    ids = prompt(model)
    with torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    run = generate(model, ids, policy=MyNorm(budget=0.3), steps=1)
    for full_layer, layer in zip(full.layers, run.cache.layers):
        want = full_layer.keys[..., :4].norm(dim=-1).topk(12, dim=-1).indices.sort(-1).values
        expect = full_layer.keys.gather(2, want[..., None].expand(-1, -1, -1, full_layer.keys.shape[-1]))
        torch.testing.assert_close(layer.keys, expect, rtol=0, atol=0)


def test_policies_reach_the_ops_by_identity():
    literal, own = kvfx.SnapKV(budget=0.25, window=8), MyNorm(budget=0.3, dims=3)
    assert key_of(literal) == repr(literal) and policy_of(repr(literal)) == literal
    # A user's class is never parsed from text: its key is unique to this process.
    assert key_of(own) != repr(own) and policy_of(key_of(own)) is own
    assert key_of(MyNorm(budget=0.3, dims=3)) == key_of(own)        # equal policies share a key


def test_a_users_class_named_like_a_preset_is_not_the_preset():
    @dataclasses.dataclass(frozen=True)
    class SnapKV(kvfx.KNorm):                                       # same name, other algorithm
        pass

    mine, shipped = SnapKV(budget=0.5), kvfx.SnapKV(budget=0.5)
    assert key_of(mine) != key_of(shipped) and type(policy_of(key_of(mine))) is SnapKV
    assert type(kvfx.parse_policy("SnapKV(budget=0.5)")) is kvfx.SnapKV


@pytest.mark.parametrize("scorer", [None, kvfx.KNorm(), MyNorm(), kvfx.SnapKV(window=4, kernel=3)],
                         ids=lambda s: type(s).__name__)
def test_chunkkv_takes_any_scorer(scorer):
    policy = kvfx.ChunkKV(budget=0.3, window=4, chunk=4, scorer=scorer)
    assert policy.needs_queries == (scorer is None or scorer.needs_queries)
    model = tiny_model("llama")
    ids = prompt(model)
    run = assert_matches_eager_reference(model, policy, ids)
    code = run.records[0].code_after
    assert ("kvfx.store_compress.default(None," in code) == (not policy.needs_queries)   # queries passed only when read


def test_chunkkv_over_a_scorer_keeps_the_chunks_that_scorer_ranks_best():
    model = tiny_model("llama")
    ids = prompt(model)
    with torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    run = generate(model, ids, policy=kvfx.ChunkKV(budget=0.3, window=4, chunk=4, scorer=MyNorm()), steps=1)
    for full_layer, layer in zip(full.layers, run.cache.layers):
        token = full_layer.keys[..., :4].norm(dim=-1).sum(1)[0]            # MyNorm's score, summed over heads
        chunks = token[:36].view(9, 4).mean(-1).topk(2).indices.sort().values   # 12 slots = window 4 + 2 chunks
        want = torch.cat([(chunks[:, None] * 4 + torch.arange(4)).flatten(), torch.arange(36, 40)])
        torch.testing.assert_close(layer.keys[0], full_layer.keys[0][:, want], rtol=0, atol=0)


def test_kvmerger_style_merge_after_snapkv_keep_is_snapkv_when_nothing_is_similar():
    model = tiny_model("llama")
    ids = prompt(model)
    snap = kvfx.SnapKV(budget=0.3, window=4)
    never = kvfx.Compose(snap, fold_rule=kvfx.GaussianMerge(epsilon=1.0))      # no cosine exceeds 1
    a, b = generate(model, ids, policy=snap, steps=STEPS), generate(model, ids, policy=never, steps=STEPS)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_kvmerger_style_merge_after_snapkv_keep_folds_what_snapkv_would_drop():
    model = tiny_model("llama")
    ids = prompt(model)
    merged = kvfx.Compose(kvfx.SnapKV(budget=0.3, window=4), fold_rule=kvfx.GaussianMerge(epsilon=-1.0,
                                                                                          count_bias=True))
    run = assert_matches_eager_reference(model, merged, ids)
    assert cache_lengths(run.cache) == [12 + STEPS - 1] * 2
    bias = run.cache.layers[0].dense()[2][..., :12]
    assert torch.isclose(bias.exp().sum(-1), torch.tensor(float(PROMPT))).all(), "every token counted once"
    assert (bias > 0).any(), "some slots hold merged tokens"


def test_compose_rejects_what_is_not_a_rule():
    with pytest.raises(ValueError, match=r"Compose\.fold_rule=.*fold rule"):
        kvfx.Compose(kvfx.SnapKV(), fold_rule=kvfx.TopTokens())
    with pytest.raises(ValueError, match=r"Compose\.policy="):
        kvfx.Compose(0.5)


def test_compositions_parse_from_text():
    text = "Compose(policy=SnapKV(budget=0.3, window=4), fold_rule=GaussianMerge(epsilon=0.5))"
    policy = kvfx.parse_policy(text)
    assert policy == kvfx.Compose(kvfx.SnapKV(budget=0.3, window=4), fold_rule=kvfx.GaussianMerge(epsilon=0.5))
    assert kvfx.parse_policy(repr(policy)) == policy
    assert kvfx.parse_policy("ChunkKV(budget=0.3, scorer=KNorm())").scorer == kvfx.KNorm()
    with pytest.raises(ValueError, match="unknown"):
        kvfx.parse_policy("Evict()")                                 # a rule is not a policy
