"""Left-padded batches: every row decodes as it would alone, and no pad is kept."""

import pytest
import torch

import kvfx
from kvfx.testing import generate
from kvfx.testing.zoo import tiny_model

LENGTH, PAD, STEPS = 24, 6, 6


def policies(budget):
    return {
        "StreamingLLM": kvfx.StreamingLLM(budget=budget, sinks=2),
        "SnapKV": kvfx.SnapKV(budget=budget, window=4),
        "KNorm": kvfx.KNorm(budget=budget),
        "H2O": kvfx.H2O(budget=budget, window=4),
        "TOVA": kvfx.TOVA(budget=budget),
        "PyramidKV": kvfx.PyramidKV(budget=budget, window=4, beta=2.0),
        "KVMerger": kvfx.KVMerger(budget=budget, exempt_layers=()),
        "ChunkKV": kvfx.ChunkKV(budget=budget, window=4, chunk=4),
        "RazorAttention": kvfx.RazorAttention(budget=budget, sinks=2, window=4, retrieval_heads=()),
        "ZeroMerge": kvfx.ZeroMerge(budget=budget, window=4),
        "AdaKV": kvfx.AdaKV(budget=budget, window=4),
    }


CASES = [(name, budget) for budget in (10, 0.5) for name in policies(budget)]


@pytest.fixture(scope="module")
def batch():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, model.config.vocab_size, (2, LENGTH), generator=gen)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    with torch.no_grad():
        pads = model(ids, attention_mask=mask, use_cache=True).past_key_values
    return model, ids, mask, [layer.keys[1, :, :PAD] for layer in pads.layers]


# Refused with a clear error instead (see docs/limitations.md).
REFUSED = {"ChunkKV": "cannot compress a left-padded batch"}


@pytest.mark.parametrize("name,budget", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_each_row_of_a_padded_batch_decodes_as_it_would_alone(batch, name, budget):
    model, ids, mask, pad_keys = batch
    policy = policies(budget)[name]
    if name in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name]):
            generate(model, ids, attention_mask=mask, policy=policy, inner="eager", steps=STEPS)
        return
    batched = generate(model, ids, attention_mask=mask, policy=policy, inner="eager", steps=STEPS)
    for row, start in ((0, 0), (1, PAD)):
        alone = generate(model, ids[row:row + 1, start:], policy=policy, inner="eager", steps=STEPS)
        assert torch.equal(batched.tokens[row, LENGTH:], alone.tokens[0, LENGTH - start:]), f"row {row}"
        for step, (got, want) in enumerate(zip(batched.logits, alone.logits)):
            torch.testing.assert_close(got[row], want[0], rtol=1e-4, atol=1e-4, msg=f"row {row} step {step}")
    for layer, pads in zip(batched.cache.layers, pad_keys):  # no kept slot is a pad
        keys, _, bias, _ = layer.dense()
        kept, bias = keys[1], bias[1]
        same = (kept[:, :, None, :] - pads[:, None, :, :]).abs().amax(-1) < 1e-6
        assert not (same.any(-1) & (bias > float("-inf"))).any(), "a pad slot survived compression"
