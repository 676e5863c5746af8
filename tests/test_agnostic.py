"""The query-agnostic presets (KeyDiff, LagKV, CUR): each score equals its
algorithm written out by hand (and kvpress's press where kvpress is
installed), the compiled rewrite keeps exactly the by-hand slots, a padded
row keeps what it keeps alone, and the presets compose as scorers."""

import math

import pytest
import torch

import kvfx
from kvfx.policies.scores import key_diff, lag_relative, leverage
from kvfx.testing import assert_equivalent, assert_padded_row_keeps_what_it_keeps_alone, generate
from kvfx.testing.zoo import tiny_model

PROMPT = 40


# -- the algorithms by hand, one (batch row, head) at a time --------------------------------

def keydiff_by_hand(k):                      # k: [S, D]
    unit = [row / row.norm() for row in k]
    anchor = sum(unit) / len(unit)
    return torch.stack([-(row @ anchor) / (row.norm() * anchor.norm()) for row in k])


def lagkv_by_hand(k, v, sinks, lag):         # LagKV, Algorithm 1 without cross scoring
    s = k.shape[0]
    if s < sinks + 2 * lag:
        return torch.tensor([1.0] * sinks + [i / (s - sinks) for i in range(s - sinks)])
    parts = (s - sinks) // lag
    tail = s - sinks - (parts - 1) * lag
    score = [2.0] * sinks + [0.0] * (s - sinks - tail) + [1 + (i + 1) / (tail + 1) for i in range(tail)]
    for p in range(parts - 1):
        lo, mid, hi = sinks + p * lag, sinks + (p + 1) * lag, sinks + (p + 2) * lag
        spreads = []
        for x in (k, v):
            ref = x[mid:hi]
            norm = (x[lo:mid] - ref.min(0).values) / (ref.max(0).values - ref.min(0).values)
            spreads.append(torch.softmax(norm.std(-1), 0))
        combined = (spreads[0] + spreads[1]) / 2
        for rank, i in enumerate(combined.argsort().tolist()):
            score[lo + i] = rank / lag
    return torch.tensor(score)


def cur_by_hand(k, v, sinks, window):        # kv_product leverage, local windows
    s = k.shape[0]
    k2, v2 = (k ** 2).sum(-1), (v ** 2).sum(-1)
    for start in range(0, s, window):
        part = slice(start, start + window)
        k2[part], v2[part] = k2[part] / k2[part].sum(), v2[part] / v2[part].sum()
    score = k2 * v2
    score = score / score.sum()
    score[:sinks] = 1.0
    return score


BY_HAND = {
    "KeyDiff": (kvfx.KeyDiff(budget=0.3), lambda k, v: keydiff_by_hand(k)),
    "LagKV": (kvfx.LagKV(budget=0.3, sinks=4, lag=8), lambda k, v: lagkv_by_hand(k, v, 4, 8)),
    "CUR": (kvfx.CUR(budget=0.3, sinks=4, local_window=8), lambda k, v: cur_by_hand(k, v, 4, 8)),
}


def by_hand_index(name, k, v, n):
    """Kept slots of [B, Hkv, S, D] by the hand-written score: sinks first, then the best."""
    policy, score = BY_HAND[name]
    out = []
    for b in range(k.shape[0]):
        heads = []
        for h in range(k.shape[1]):
            s = score(k[b, h].clone(), v[b, h].clone())
            s[: policy.sinks] = math.inf
            heads.append(torch.sort(s, descending=True, stable=True).indices[:n].sort().values)
        out.append(torch.stack(heads))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(BY_HAND))
@pytest.mark.parametrize("length", [13, 40, 61])
def test_score_equals_the_algorithm_by_hand(name, length):
    torch.manual_seed(length)
    k, v = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    policy, score = BY_HAND[name]
    valid = torch.ones(2, length, dtype=torch.bool)
    got = policy._score(None, k, valid, 0.3, v)
    for b in range(2):
        for h in range(2):
            expect = score(k[b, h].clone(), v[b, h].clone())
            torch.testing.assert_close(got[b, h], expect.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(BY_HAND))
def test_compiled_keeps_the_by_hand_slots(family, name):
    policy, _ = BY_HAND[name]
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    run = generate(model, ids, policy=policy, steps=1)
    assert run.graph_breaks == 0
    n = math.ceil(0.3 * PROMPT)
    for layer, entry in enumerate(full.layers):
        k, v = entry.keys, entry.values
        index = by_hand_index(name, k, v, n)[..., None]
        got = run.cache.layers[layer]
        assert got.keys.shape[2] == n
        torch.testing.assert_close(got.keys, k.gather(2, index.expand(-1, -1, -1, k.shape[-1])), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values, v.gather(2, index.expand(-1, -1, -1, v.shape[-1])), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(BY_HAND))
def test_a_padded_row_keeps_what_it_keeps_alone(name):
    """LagKV's partitions and CUR's windows start at the row's first real token, and KeyDiff's anchor
    averages real keys only, so left padding changes nothing the row keeps."""
    policy, _ = BY_HAND[name]
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    assert_padded_row_keeps_what_it_keeps_alone(model, policy, ids, pad=10)


@pytest.mark.parametrize("policy", [kvfx.KeyDiff(budget=1 << 20), kvfx.LagKV(budget=1 << 20, lag=8),
                                    kvfx.CUR(budget=1 << 20)], ids=["KeyDiff", "LagKV", "CUR"])
def test_a_budget_above_the_prompt_equals_eager(policy):
    model = tiny_model("llama")
    assert_equivalent(model, torch.randint(0, model.config.vocab_size, (1, PROMPT)), policy=policy, steps=4)


def test_they_compose_as_scorers_and_get_the_values():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    valid = torch.ones(1, 30, dtype=torch.bool)
    lag = kvfx.LagKV(lag=4)
    chunk = kvfx.ChunkKV(budget=0.5, window=4, chunk=4, scorer=lag)
    merger = kvfx.KVMerger(budget=0.5, exempt_layers=(), scorer=kvfx.CUR(local_window=4))
    assert chunk.needs_values and merger.needs_values and not chunk.needs_queries
    torch.testing.assert_close(chunk._score(q, k, valid, 0.3, v), lag_relative(k, v, 4, 4))
    torch.testing.assert_close(merger._score(q, k, valid, 0.3, v), leverage(k, v, 4, "kv_product", 4))
    assert kvfx.Compose(lag, fold_rule=kvfx.Compensate()).needs_values
    assert chunk.compress(q, k, v, valid, 0.3).k.shape[2] == chunk.budget_length(30)


def test_a_score_that_reads_values_refuses_a_latent_cache():
    """A latent (MLA) cache's values are one shared latent, not per KV head: said, not mis-scored."""
    k, latent = torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 6)
    per_head_keys = torch.randn(1, 4, 20, 8)
    with pytest.raises(ValueError, match=r"CUR scores the values too.*\(1, 1, 20, 6\)"):
        kvfx.CUR().compress(None, k, latent, torch.ones(1, 20, dtype=torch.bool), 0.3, score_keys=per_head_keys)
    with pytest.raises(ValueError, match="LagKV scores the values too.*no values"):
        kvfx.LagKV().select(None, k, torch.ones(1, 20, dtype=torch.bool), 0.3)


def test_lagkv_under_a_tight_budget_keeps_the_sinks_and_the_most_recent_tokens():
    """Budget below sinks + last partition: the question at the prompt's end survives, not the oldest tail."""
    k, v = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    policy = kvfx.LagKV(budget=12, sinks=4, lag=16)           # protected: 4 sinks + 16 + 100 - 4 - 96 = 20 > 12
    kept = policy.select(None, k, torch.ones(1, 100, dtype=torch.bool), 0.3, v=v)
    assert kept.tolist() == [[[0, 1, 2, 3] + list(range(92, 100))] * 2]


def test_keydiff_anchor_reads_real_keys_only():
    k = torch.randn(1, 1, 10, 4)
    valid = torch.ones(1, 10, dtype=torch.bool)
    padded = torch.cat([torch.full((1, 1, 3, 4), 50.0), k], 2)
    score = key_diff(padded, torch.cat([torch.zeros(1, 3, dtype=torch.bool), valid], 1))
    torch.testing.assert_close(score[..., 3:], key_diff(k, valid))


@pytest.mark.parametrize("name", list(BY_HAND))
def test_equals_kvpress_when_installed(name):
    kvpress = pytest.importorskip("kvpress")
    torch.manual_seed(3)
    k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    press = {"KeyDiff": lambda: kvpress.KeyDiffPress(), "LagKV": lambda: kvpress.LagKVPress(n_sink=4, lag_size=64),
             "CUR": lambda: kvpress.CURPress(num_sinks=4, local_window_size=16)}[name]()
    ours = {"KeyDiff": lambda: key_diff(k, torch.ones(1, 300, dtype=torch.bool)),
            "LagKV": lambda: lag_relative(k, v, 4, 64), "CUR": lambda: leverage(k, v, 4, "kv_product", 16)}[name]()
    theirs = press.score(None, None, k, v, None, {}).float()
    if name == "LagKV":                      # kvpress scores the sinks and the tail 1; kvfx ranks them (above 1)
        protected = theirs == 1
        assert protected.sum() == 2 * (4 + 64 + (300 - 4) % 64)
        assert torch.equal(ours >= 1, protected)
        ours, theirs = ours[~protected], theirs[~protected]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
