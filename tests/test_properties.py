"""Property tests of kvfx's operators for every preset: random shapes, GQA
ratios, padding, budgets at the edge of the prompt length, NaN/inf inputs."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfx
import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx.*)
from kvfx.policies import key_of

NEG_INF = float("-inf")
CONSERVES_COUNTS = {"ZeroMerge", "RazorAttention"}  # every real token is counted once: sum(exp(bias)) = real tokens


def make_policy(name: str, budget):
    small = {
        "StreamingLLM": dict(sinks=1), "SnapKV": dict(window=2, kernel=3), "KNorm": {}, "H2O": dict(window=2),
        "TOVA": {}, "PyramidKV": dict(window=2, beta=2.0), "KVMerger": dict(exempt_layers=(), count_bias=True),
        "ChunkKV": dict(window=2, chunk=2), "RazorAttention": dict(sinks=1, window=2, retrieval_heads=((1, 0),)),
        "ZeroMerge": dict(residual=1, window=2), "AdaKV": dict(window=2, kernel=3),
        "KeyDiff": {}, "LagKV": dict(sinks=1, lag=4), "CUR": dict(sinks=1, local_window=4),
        "ExpectedAttention": dict(sinks=1, n_future_positions=16),
    }[name]
    return kvfx.PRESETS[name](budget=budget, **small)


def sdpa_mask(valid: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, S, S] causal mask with padded key columns off, as transformers builds."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (causal[None] & valid[:, None, :])[:, None]


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(kvfx.PRESETS)))
    batch, kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        budget = draw(st.integers(6, 24))
        length = budget + draw(st.sampled_from([-1, 0, 1]))  # around the budget edge
    else:
        budget = draw(st.sampled_from([0.05, 0.2, 0.35, 0.5]))
        length = draw(st.integers(4, 48))
    pad = draw(st.integers(0, length - 1)) if batch == 2 else 0
    layer = draw(st.integers(0, 3))
    return name, budget, batch, kv_heads, groups, length, pad, layer, draw(st.integers(0, 2**16))


def tensors(batch, kv_heads, groups, length, pad, seed, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[-1, :pad] = False
    return q, k, v, valid


@settings(max_examples=50, deadline=None)
@given(case=cases())
def test_compress_keeps_the_promised_slots_and_never_a_pad(case):
    name, budget, batch, kv_heads, groups, length, pad, layer, seed = case
    policy = make_policy(name, budget)
    q, k, v, valid = tensors(batch, kv_heads, groups, length, pad, seed)
    k_out, v_out, bias, score, index = torch.ops.kvfx.compress(q, k, v, sdpa_mask(valid), None, key_of(policy),
                                                               layer, 4, 8 ** -0.5)
    n = policy.kept_length(length, layer, 4)
    assert k_out.shape == (batch, kv_heads, n, 8) and v_out.shape == k_out.shape
    assert bias.shape == score.shape == index.shape == (batch, kv_heads, n)
    assert not bias.isnan().any() and not (bias == float("inf")).any()
    real = valid.sum(-1)
    live = bias > NEG_INF
    assert torch.all(live.sum(-1) <= torch.clamp(real[:, None], max=n))   # never more live slots than real tokens
    if name in CONSERVES_COUNTS:
        torch.testing.assert_close(bias.exp().sum(-1), real[:, None].float().expand(-1, kv_heads), rtol=1e-5, atol=1e-4)
    if kvfx.PRESETS[name].fold == "evict":  # each live slot is a real token's own key and value
        for b in range(batch):
            for h in range(kv_heads):
                for slot in live[b, h].nonzero().flatten().tolist():
                    i = int(index[b, h, slot])
                    assert bool(valid[b, i]), "a pad slot is live"
                    assert torch.equal(k_out[b, h, slot], k[b, h, i]) and torch.equal(v_out[b, h, slot], v[b, h, i])
    again = torch.ops.kvfx.compress(q, k, v, sdpa_mask(valid), None, key_of(policy), layer, 4, 8 ** -0.5)
    assert all(torch.equal(a, b) for a, b in zip(again, (k_out, v_out, bias, score, index)))  # deterministic


@settings(max_examples=50, deadline=None)
@given(case=cases(), page=st.sampled_from([1, 4, 16]))
def test_store_compress_holds_each_rows_kept_slots_in_the_pages_its_fake_promised(case, page):
    """The store a prefill leaves: each (batch, KV head) row holds exactly the
    slots the rectangular compression keeps for it, in pages whose number and
    table width are what the graph was traced with (the fake implementation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kvfx import store as slot_store

    name, budget, batch, kv_heads, groups, length, pad, layer, seed = case
    policy = make_policy(name, budget)
    q, k, v, valid = tensors(batch, kv_heads, groups, length, pad, seed)
    args = (sdpa_mask(valid), None, key_of(policy), layer, 4, 8 ** -0.5)
    k_rect, v_rect, bias, score, _ = torch.ops.kvfx.compress(q, k, v, *args)
    real = torch.ops.kvfx.store_compress(q, k, v, *args, page)
    with FakeTensorMode() as mode:
        fake = torch.ops.kvfx.store_compress(*(mode.from_tensor(t) for t in (q, k, v, args[0])), *args[1:], page)
    assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake]
    store = slot_store.Store(*real[:8])
    assert int(store.seen) == length
    lengths = store.lengths
    assert (lengths <= k_rect.shape[2]).all() and (store.pages == slot_store.cdiv(lengths, page)).all()
    got_k, got_v, got_bias, got_score = slot_store.gather(store, int(lengths.max()))
    for b in range(batch):
        for h in range(kv_heads):
            n = int(lengths[b, h])
            assert torch.equal(got_k[b, h, :n], k_rect[b, h, :n]) and torch.equal(got_v[b, h, :n], v_rect[b, h, :n])
            assert torch.equal(got_bias[b, h, :n], bias[b, h, :n]) and torch.equal(got_score[b, h, :n], score[b, h, :n])
            assert (bias[b, h, n:] == NEG_INF).all(), "the rectangle pads a row past its length with invalid slots"


def naive_attention(q, k, v, bias, scale):
    """float64 softmax attention of new queries (the last Sq slots are the new tokens, causal among themselves)."""
    b, h, sq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    vv = v.double().repeat_interleave(h // hkv, dim=1)
    logits = q.double() @ kk.transpose(-1, -2) * scale
    full_bias = torch.cat([bias.double(), torch.zeros(b, hkv, sq, dtype=torch.float64)], -1)
    logits = logits + full_bias.repeat_interleave(h // hkv, dim=1)[:, :, None, :]
    new_pos = torch.arange(s - sq, s)
    causal = torch.arange(s)[None, :] <= new_pos[:, None]
    logits = logits.masked_fill(~causal, NEG_INF)
    return logits.softmax(-1) @ vv


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       past=st.integers(1, 30), new=st.integers(1, 3), seed=st.integers(0, 2**16), data=st.data())
def test_attend_equals_naive_attention_and_ignores_invalid_slots(batch, kv_heads, groups, past, new, seed, data):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, new, 8, generator=gen)
    k = torch.randn(batch, kv_heads, past + new, 8, generator=gen)
    v = torch.randn(batch, kv_heads, past + new, 8, generator=gen)
    bias = torch.randn(batch, kv_heads, past, generator=gen).abs().log1p()   # merged-slot style log counts
    dead = torch.rand(batch, kv_heads, past, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 0.9]))
    bias = bias.masked_fill(dead, NEG_INF)
    score = torch.zeros_like(bias)
    seen = torch.tensor(past + 5)                    # tokens seen: more than the slots held
    out, new_bias, new_score, seen_after = torch.ops.kvfx.attend(q, k, v, bias, score, seen, None, 8 ** -0.5, 0.0)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, bias, 8 ** -0.5), rtol=1e-5, atol=1e-5)
    assert new_bias.shape == (batch, kv_heads, past + new) and torch.equal(new_bias[..., :past], bias)
    assert torch.all(new_bias[..., past:] == 0) and torch.all(new_score == 0)
    assert int(seen_after) == past + 5 + new
    # what an invalid slot holds never matters
    k2, v2 = k.clone(), v.clone()
    k2[..., :past, :] = torch.where(dead[..., None], 1e4, k2[..., :past, :])
    v2[..., :past, :] = torch.where(dead[..., None], -1e4, v2[..., :past, :])
    out2 = torch.ops.kvfx.attend(q, k2, v2, bias, score, seen, None, 8 ** -0.5, 0.0)[0]
    torch.testing.assert_close(out2, out)


def test_attend_on_a_cache_without_state_uses_the_models_mask():
    gen = torch.Generator().manual_seed(3)
    past, new = 12, 2
    q, k, v = (torch.randn(2, 4, new, 8, generator=gen), torch.randn(2, 2, past + new, 8, generator=gen),
               torch.randn(2, 2, past + new, 8, generator=gen))
    valid = torch.ones(2, past + new, dtype=torch.bool)
    valid[1, :5] = False                                          # a left-padded row
    mask = torch.ones(new, past + new, dtype=torch.bool).tril(past)[None, None] & valid[:, None, None, :]
    zeros = torch.zeros(2, 2, past)
    out, bias, _, seen = torch.ops.kvfx.attend(q, k, v, zeros, zeros, torch.tensor(-1), mask, 8 ** -0.5, 0.0)
    expected_bias = torch.zeros(2, 2, past).masked_fill(~valid[:, None, :past], NEG_INF)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, expected_bias, 8 ** -0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(bias[..., :past], expected_bias) and int(seen) == past + new


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["TOVA", "ZeroMerge"]), budget=st.integers(6, 16), grow=st.integers(-1, 2),
       new=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_continuous_step_keeps_its_length_and_counts(name, budget, grow, new, kv_heads, groups, seed):
    policy = make_policy(name, budget)
    gen = torch.Generator().manual_seed(seed)
    total = budget + grow + new                      # slots including the new tokens, around the budget
    q = torch.randn(1, kv_heads * groups, new, 8, generator=gen)
    k = torch.randn(1, kv_heads, total, 8, generator=gen)
    v = torch.randn(1, kv_heads, total, 8, generator=gen)
    counts = torch.randint(1, 4, (1, kv_heads, total), generator=gen).float()
    counts[..., -new:] = 1
    bias = counts.log() if name == "ZeroMerge" else torch.zeros_like(counts)
    score = torch.rand(1, kv_heads, total, generator=gen)
    k_out, v_out, bias_out, score_out = torch.ops.kvfx.step(q, k, v, bias, score, key_of(policy), 0, 1, 8 ** -0.5)
    n = policy.decode_length(total, new)
    assert k_out.shape == (1, kv_heads, n, 8) and bias_out.shape == score_out.shape == (1, kv_heads, n)
    assert n == min(total, max(total - new, budget))
    if name == "ZeroMerge":  # merging moves counts between slots, never loses or invents a token
        torch.testing.assert_close(bias_out.exp().sum(-1), counts.sum(-1), rtol=1e-5, atol=1e-4)
    else:  # TOVA evicts: every kept slot is an input slot
        same = (k_out[..., :, None, :] == k[..., None, :, :]).all(-1).any(-1)
        assert same.all()


@pytest.mark.parametrize("name", sorted(kvfx.PRESETS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_key_gives_a_defined_result(name, bad):
    """A non-finite key never raises and never makes a bias NaN: the slot is kept or dropped like any other."""
    policy = make_policy(name, 8)
    q, k, v, valid = tensors(1, 2, 2, 20, 0, seed=0)
    k[0, 0, 7] = bad
    k_out, v_out, bias, score, index = torch.ops.kvfx.compress(q, k, v, sdpa_mask(valid), None, key_of(policy), 1, 4,
                                                               8 ** -0.5)
    assert k_out.shape[2] == policy.kept_length(20, 1, 4)
    assert not bias.isnan().any()
    assert torch.isfinite(k_out[0, 1]).all()        # the other KV head is untouched by the bad key
