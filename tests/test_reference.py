"""Each policy's compiled rewrite equals the algorithm applied to the full
cache tensors by hand (same kept positions, same tensors)."""

import pytest
import torch
import torch.nn.functional as F

import kvfx
from kvfx.testing import generate
from kvfx.testing.zoo import tiny_model

PROMPT = 40


def full_prefill(model, ids):
    with torch.no_grad():
        out = model(ids, use_cache=True, output_attentions=True)
    cache = out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers], out.attentions


def by_hand_streaming(keys, attn, budget, sinks):
    length = keys.shape[-2]
    index = list(range(sinks)) + list(range(length - (budget - sinks), length))
    return torch.tensor(index).expand(*keys.shape[:2], budget)


def by_hand_knorm(keys, attn, n):
    norms = keys.norm(dim=-1)                       # [B, Hkv, S]
    return norms.topk(n, dim=-1, largest=False).indices.sort(-1).values


def by_hand_snapkv(keys, attn, n, window, kernel):
    b, hkv, s, _ = keys.shape
    h = attn.shape[1]
    # As the SnapKV authors' code: the window's attention to the prefix, summed,
    # average-pooled with zero padding, GQA-averaged; the window itself is kept.
    score = attn[:, :, -window:, :-window].sum(dim=-2)
    score = F.avg_pool1d(score, kernel, 1, kernel // 2, count_include_pad=True)
    score = score.view(b, hkv, h // hkv, s - window).mean(2)
    score = F.pad(score, (0, window), value=float("inf"))
    return score.topk(n, dim=-1).indices.sort(-1).values


CASES = {
    "StreamingLLM": (kvfx.StreamingLLM(budget=12, sinks=4), lambda k, a: by_hand_streaming(k, a, 12, 4)),
    "KNorm": (kvfx.KNorm(budget=0.5), lambda k, a: by_hand_knorm(k, a, 20)),
    "SnapKV": (kvfx.SnapKV(budget=0.5, window=8, kernel=5), lambda k, a: by_hand_snapkv(k, a, 20, 8, 5)),
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_by_hand(family, name):
    policy, by_hand = CASES[name]
    model = tiny_model(family, attn="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    full, attentions = full_prefill(model, ids)
    run = generate(model, ids, policy=policy, steps=1)
    compressed = run.cache
    for layer, ((k, v), attn) in enumerate(zip(full, attentions)):
        index = by_hand(k, attn)
        expect_k = k.gather(2, index[..., None].expand(-1, -1, -1, k.shape[-1]))
        expect_v = v.gather(2, index[..., None].expand(-1, -1, -1, v.shape[-1]))
        got_k, got_v = compressed.layers[layer].keys, compressed.layers[layer].values
        assert got_k.shape == expect_k.shape, f"layer {layer}: {got_k.shape} != {expect_k.shape}"
        torch.testing.assert_close(got_k, expect_k, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_v, expect_v, rtol=0, atol=1e-5)
