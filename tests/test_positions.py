"""Positions follow tokens seen, never the (shorter) compressed cache length."""

import pytest
import torch

import kvfx
from kvfx.testing import generate
from kvfx.testing.handwritten import TinyGPT, greedy_generate
from kvfx.testing.zoo import tiny_model

POLICY = kvfx.SnapKV(budget=0.5, window=4)


def hand_loop(model, ids, steps):
    """A decode loop that passes only the cache: no cache_position, no position_ids."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        tokens = [ids]
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hand_written_loop_matches_generate_under_kvfx_compile(family):
    model = tiny_model(family)
    ids = torch.randint(2, model.config.vocab_size, (1, 24))
    expected = generate(model, ids, policy=POLICY, steps=8).tokens
    torch._dynamo.reset()
    kvfx.compile(model, POLICY, inner="aot_eager")
    got = hand_loop(model, ids, 8)
    assert torch.equal(got, expected)
    kvfx.restore(model)


def test_raw_backend_refuses_to_derive_positions_from_a_compressed_cache():
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, 24))
    model.forward = torch.compile(model.forward, backend=kvfx.backend(POLICY, inner="aot_eager"))
    with pytest.raises(kvfx.PositionError, match=r"holds 12 slots for 24 tokens seen.*position_ids"):
        hand_loop(model, ids, 2)


def test_tokens_seen_counts_every_token_absorbed():
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, 24))
    run = generate(model, ids, policy=POLICY, steps=5)
    layer = run.cache.layers[0]
    assert (layer.lengths == 12 + 4).all()
    assert kvfx.tokens_seen(layer) == 24 + 4


def test_handwritten_module_with_tuple_cache():
    model = TinyGPT().eval()
    ids = torch.randint(0, 128, (1, 40))
    # positions passed explicitly by kvfx.compile: same as the loop numbering tokens itself
    kvfx.compile(model, POLICY, inner="aot_eager")
    got = greedy_generate(model, ids, 6)
    _, past = model(ids)
    assert [k.shape[-2] for k, _ in past] == [20, 20]
    assert kvfx.tokens_seen(past[0][0]) == 40
    kvfx.restore(model)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=kvfx.backend(POLICY, inner="aot_eager"))
    with pytest.raises(kvfx.PositionError):
        greedy_generate(model, ids, 2)
    assert got.shape == (1, 46)
