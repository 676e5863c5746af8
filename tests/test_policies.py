"""Policy construction, validation and the keep primitive."""

import pytest
import torch

import kvfx
from kvfx.policies import budget_tokens, key_of


@pytest.mark.parametrize("cls", [kvfx.StreamingLLM, kvfx.SnapKV, kvfx.KNorm])
@pytest.mark.parametrize("budget", [0, -1, 1.5, "half", 0.0, float("nan"), True, None])
def test_bad_budget_names_field_value_and_range(cls, budget):
    with pytest.raises(ValueError) as err:
        cls(budget=budget)
    msg = str(err.value)
    assert f"{cls.__name__}.budget={budget!r}" in msg and "(0, 1]" in msg and ">= 1" in msg


def test_window_larger_than_budget_is_rejected():
    with pytest.raises(ValueError, match=r"sinks \+ window = 64 exceeds budget=16"):
        kvfx.SnapKV(budget=16, window=64)


@pytest.mark.parametrize("kwargs,field", [(dict(sinks=-1), "sinks"), (dict(window=0), "window"),
                                          (dict(kernel=4), "kernel"), (dict(window=2.5), "window")])
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"SnapKV\.{field}="):
        kvfx.SnapKV(**kwargs)


def test_policies_are_frozen():
    policy = kvfx.SnapKV(budget=0.3)
    with pytest.raises(Exception):
        policy.budget = 0.5


@pytest.mark.parametrize("text", ["SnapKV(budget=0.25, window=16)", "StreamingLLM(budget=64, sinks=2)", "KNorm"])
def test_parse_policy_roundtrips(text):
    policy = kvfx.parse_policy(text)
    assert kvfx.parse_policy(repr(policy)) == policy and key_of(policy) == repr(policy)


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "SnapKV(budget=x)", "Nope(budget=1)",
                                  "SnapKV(bogus=1)", "SnapKV(budget=2.0)", "SnapKV(**{'budget': 1})"])
def test_parse_policy_rejects_anything_but_a_literal_preset(text):
    with pytest.raises(ValueError):
        kvfx.parse_policy(text)


@pytest.mark.parametrize("budget,length,expected", [(0.5, 10, 5), (0.5, 11, 6), (0.35, 100, 35), (0.35, 101, 36),
                                                    (1.0, 7, 7), (8, 100, 8)])
def test_budget_tokens_is_integer_ceil(budget, length, expected):
    assert budget_tokens(budget, length) == expected


def test_prompt_at_or_under_budget_is_untouched():
    policy = kvfx.KNorm(budget=16)
    k = torch.randn(1, 2, 16, 8)
    index = policy.select(None, k, torch.ones(1, 16, dtype=torch.bool), 1.0)
    assert index.tolist() == [[list(range(16))] * 2]


def test_kept_length_never_below_always_kept_tokens():
    policy = kvfx.SnapKV(budget=0.1, window=8)
    assert policy.kept_length(40) == 8       # 10% of 40 = 4 < window
    assert policy.kept_length(5) == 5        # never more than the prompt
    assert policy.kept_length(1000) == 100


def test_select_keeps_sinks_window_and_original_order():
    policy = kvfx.KNorm(budget=8, sinks=2, window=3)
    k = torch.randn(2, 3, 30, 4)
    valid = torch.ones(2, 30, dtype=torch.bool)
    index = policy.select(None, k, valid, 1.0)
    assert index.shape == (2, 3, 8)
    assert torch.all(index[..., 1:] > index[..., :-1]), "kept slots must stay in original order"
    for head in index.reshape(-1, 8).tolist():
        assert {0, 1, 27, 28, 29} <= set(head)


def test_padding_is_evicted_first_and_sinks_are_the_first_real_tokens():
    policy = kvfx.StreamingLLM(budget=6, sinks=2)
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    index = policy.select(None, torch.randn(1, 1, 20, 4), valid, 1.0)
    assert index.flatten().tolist() == [5, 6, 16, 17, 18, 19]


def test_a_latent_is_scored_on_its_expanded_keys_with_one_selection_for_every_head():
    """MLA: k, v are a latent [B, 1, S, r] and a rotary key [B, 1, S, dr]; the
    slots kept are those the per-head scores on the expanded keys rank first
    once averaged over the heads, and both tensors keep the same slots."""
    torch.manual_seed(0)
    policy = kvfx.SnapKV(budget=0.5, window=4)
    q, expanded = torch.randn(1, 4, 24, 16), torch.randn(1, 4, 24, 16)
    latent, rotary = torch.randn(1, 1, 24, 12), torch.randn(1, 1, 24, 8)
    valid = torch.ones(1, 24, dtype=torch.bool)
    out = policy.compress(q, latent, rotary, valid, 0.25, score_keys=expanded)
    score = policy.score(q, expanded, valid, 0.25).mean(1, keepdim=True)          # [1, 1, 24]
    kept = policy.keep().select(policy, score, valid, policy.budget_length(24), policy.row_keep(valid)).index
    assert out.index.shape == (1, 1, 12)
    torch.testing.assert_close(out.index, kept)
    torch.testing.assert_close(out.k, latent.gather(2, kept[..., None].expand(-1, -1, -1, 12)))
    torch.testing.assert_close(out.v, rotary.gather(2, kept[..., None].expand(-1, -1, -1, 8)))
    # scoring the latent itself would pick other slots: the expanded keys matter
    assert not torch.equal(policy.compress(q[:, :1, :, :12], latent, rotary, valid, 0.25).index, kept)
