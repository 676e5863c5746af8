"""Left padding: pads are evicted first and never attended to."""

import torch

import kvfx
from kvfx.testing import generate
from kvfx.testing.zoo import tiny_model


def padded_batch(vocab, length=24, pad=6):
    ids = torch.randint(2, vocab, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def test_left_padded_batch_keeps_no_pad_slot():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True).past_key_values
    run = generate(model, ids, attention_mask=mask, policy=kvfx.SnapKV(budget=0.5, window=4), steps=1)
    for full_layer, layer in zip(full.layers, run.cache.layers):
        pads = full_layer.keys[1, :, :6]                       # [Hkv, 6, D]
        kept = layer.keys[1]                                   # [Hkv, 12, D]
        same = (kept[:, :, None, :] - pads[:, None, :, :]).abs().amax(-1) < 1e-6
        assert not same.any(), "a pad slot survived compression"
        live = torch.isfinite(layer.dense()[2]).sum(-1)
        assert live[0].tolist() == [12, 12]   # 50% of 24 real tokens
        assert live[1].tolist() == [9, 9]     # 50% of its own 18 real tokens; its other slots are invalid


def test_rows_shorter_than_budget_keep_pads_masked_out():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, pad=10)   # row 1 has 14 real tokens
    run = generate(model, ids, attention_mask=mask, policy=kvfx.KNorm(budget=20), steps=3)
    bias = run.cache.layers[0].dense()[2]
    assert bias.shape[-1] == 20 + 2
    assert torch.isfinite(bias[0]).all()
    assert (bias[1] == float("-inf")).sum(-1).tolist() == [6, 6]   # 20 kept - 14 real = 6 pads, masked


def test_padded_row_decodes_like_the_row_alone():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size)
    policy = kvfx.KNorm(budget=10, window=2)   # a token budget: the same for both rows
    batched = generate(model, ids, attention_mask=mask, policy=policy, steps=6).tokens
    alone = generate(model, ids[1:, 6:], policy=policy, steps=6).tokens
    assert torch.equal(batched[1, 6:], alone[0])
