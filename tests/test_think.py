"""ThinK: after any token policy, each KV head's lowest-scored key channels
are zeroed in the prompt's cache. The channel score equals the paper's
|q_c|^2 |k_c|^2 written out by hand and kvpress's ThinKPress on the same
model; the compiled rewrite equals the eager reference; decode keys, values
and the tokens the wrapped policy keeps are untouched; a latent cache is left
alone saying why."""

import pytest
import torch

import kvfx
from kvfx.policies.think import channel_scores, pruned_channels
from kvfx.testing import against_reference, assert_equivalent, cache_lengths, generate
from kvfx.testing.zoo import tiny_model

PROMPT, STEPS = 40, 4


def channel_scores_by_hand(q, k, window):      # q: [H, S, D], k: [Hkv, n, D] (no padding)
    heads, _, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    out = torch.zeros(kv_heads, d)
    for kv in range(kv_heads):
        for c in range(d):
            q_sq = sum(float((q[kv * group + g, -window:, c] ** 2).mean()) for g in range(group)) / group
            out[kv, c] = q_sq * float((k[kv, :, c] ** 2).mean())
    return out


def test_the_channel_score_is_the_windows_query_energy_times_the_keys():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 30, 8), torch.randn(2, 3, 12, 8)
    got = channel_scores(q, k, torch.ones(2, 30, dtype=torch.bool), torch.ones(2, 3, 12, dtype=torch.bool), 5)
    for b in range(2):
        torch.testing.assert_close(got[b], channel_scores_by_hand(q[b], k[b], 5), rtol=1e-5, atol=1e-7)


def test_a_padded_row_scores_its_channels_as_it_would_alone():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 10, 8)
    alone = channel_scores(q, k, torch.ones(1, 20, dtype=torch.bool), torch.ones(1, 2, 10, dtype=torch.bool), 6)
    q_pad = torch.cat([torch.randn(1, 4, 3, 8), q], dim=2)              # 3 left-padding queries
    k_pad = torch.cat([torch.randn(1, 2, 2, 8), k], dim=2)              # 2 filler slots
    q_valid = torch.arange(23) >= 3
    k_valid = (torch.arange(12) >= 2).expand(1, 2, 12)
    padded = channel_scores(q_pad, k_pad, q_valid[None], k_valid, 6)
    torch.testing.assert_close(padded, alone, rtol=1e-6, atol=1e-7)


def test_it_zeroes_the_lowest_channels_of_the_kept_keys_only():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    valid = torch.ones(1, 30, dtype=torch.bool)
    snap = kvfx.SnapKV(budget=0.5, window=4)
    think = kvfx.ThinK(snap, key_channels=0.4, channel_window=6)
    plain, cut = snap.compress(q, k, v, valid, 0.3), think.compress(q, k, v, valid, 0.3)
    assert torch.equal(cut.index, plain.index) and torch.equal(cut.v, plain.v)         # the same tokens
    zeroed = (cut.k == 0).all(dim=2)                                                      # [B, Hkv, D]
    assert (zeroed.sum(-1) == int(8 * 0.4)).all()
    expect = channel_scores_by_hand(q[0], plain.k[0], 6).argsort(-1)[:, :3]              # the 3 lowest per head
    assert torch.equal(zeroed[0], torch.zeros(2, 8, dtype=torch.bool).scatter(-1, expect, True))
    assert torch.equal(cut.k.masked_fill(zeroed[:, :, None], 0), plain.k.masked_fill(zeroed[:, :, None], 0))


def test_it_wraps_any_one_shot_policy_and_wrappers_keep_its_cut():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    valid = torch.ones(1, 30, dtype=torch.bool)
    think = kvfx.ThinK(kvfx.KNorm(budget=0.5), key_channels=0.5)
    assert think.needs_queries and not think.policy.needs_queries        # the graph lends q for the channels
    for policy in (think, kvfx.Recompress(think, every=8, target=16),
                   kvfx.Compose(think, fold_rule=kvfx.Compensate())):
        out = policy.compress(q, k, v, valid, 0.3)
        assert ((out.k == 0).all(dim=2).sum(-1) == 4).all(), type(policy).__name__
    assert kvfx.ThinK(kvfx.ChunkKV(budget=0.5, chunk=4, window=4)).budget_length(40) == \
        kvfx.ChunkKV(budget=0.5, chunk=4, window=4).budget_length(40)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_compiled_equals_the_eager_reference(family):
    model = tiny_model(family)
    policy = kvfx.ThinK(kvfx.SnapKV(budget=0.3, window=4), key_channels=0.5, channel_window=8)
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    compiled, reference = against_reference(model, ids, policy, steps=STEPS)
    assert cache_lengths(compiled.cache) == [12 + STEPS - 1] * model.config.num_hidden_layers
    plain = generate(model, ids, policy=policy.policy, steps=STEPS)
    for got, want, snap in zip(compiled.cache.layers, reference.cache.layers, plain.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
        half = got.keys.shape[-1] // 2
        prompt, decoded = got.keys[:, :, :12], got.keys[:, :, 12:]
        assert ((prompt == 0).all(dim=2).sum(-1) == half).all()          # half of each head's channels, prompt only
        assert not (decoded == 0).any()
        zeroed = (prompt == 0).all(dim=2, keepdim=True)
        torch.testing.assert_close(prompt, snap.keys[:, :, :12].masked_fill(zeroed, 0), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values[:, :, :12], snap.values[:, :, :12], rtol=0, atol=1e-5)


def test_no_channel_cut_and_a_budget_above_the_prompt_equals_eager():
    model = tiny_model("llama")
    assert_equivalent(model, torch.randint(0, model.config.vocab_size, (1, PROMPT)),
                      policy=kvfx.ThinK(kvfx.SnapKV(budget=1 << 20), key_channels=0.0), steps=STEPS)


def test_a_latent_cache_is_left_alone_saying_why():
    model = tiny_model("deepseek_v3")
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"zeroes key channels per KV head .* one latent shared by every head"):
        run = generate(model, ids, policy=kvfx.ThinK(kvfx.SnapKV(budget=0.3)), steps=2)
    assert cache_lengths(run.cache) == [PROMPT + 1] * model.config.num_hidden_layers


@pytest.mark.parametrize("field, value, allowed", [
    ("key_channels", 1.0, r"a fraction of the key channels in \[0, 1\)"),
    ("key_channels", -0.1, r"a fraction of the key channels in \[0, 1\)"),
    ("channel_window", 0, "an int >= 1"), ("policy", "SnapKV", "a kvfx policy")])
def test_bad_input_names_the_field_and_the_allowed_range(field, value, allowed):
    args = {"policy": kvfx.SnapKV(), field: value}
    with pytest.raises(ValueError, match=rf"ThinK\.{field}=.*{allowed}"):
        kvfx.ThinK(**args)


def test_the_pruned_channels_equal_kvpress_when_installed():
    """kvpress's ThinKPress on the same tiny Llama zeroes the same channels of
    the same prompt keys (it recomputes the window's queries from the hidden
    states; kvfx takes them from the graph)."""
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    press = kvpress.ThinKPress(key_channel_compression_ratio=0.5, window_size=8)
    with torch.no_grad(), press(model):
        theirs = model(ids, past_key_values=DynamicCache()).past_key_values
    policy = kvfx.ThinK(kvfx.StreamingLLM(budget=1.0), key_channels=0.5, channel_window=8)
    ours = generate(model, ids, policy=policy, steps=1).cache
    for layer, got in enumerate(ours.layers):
        want = theirs.layers[layer].keys
        assert torch.equal((got.keys == 0).all(dim=2), (want == 0).all(dim=2)), f"layer {layer}"
        torch.testing.assert_close(got.keys, want, rtol=0, atol=1e-5)


def test_pruned_channels_break_ties_by_channel_order():
    score = torch.tensor([[[1.0, 0.5, 0.5, 2.0]]])
    assert pruned_channels(score, 0.5).tolist() == [[[False, True, True, False]]]
    assert pruned_channels(score, 0.25).tolist() == [[[False, True, False, False]]]
