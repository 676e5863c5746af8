"""Nothing silently wrong: cache edits, dtypes, state isolation, long runs, random inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfx
from kvfx.testing import cache_lengths, generate
from kvfx.testing.zoo import tiny_model


def test_beam_search_without_compression_equals_eager_beam_search():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 24), generator=torch.Generator().manual_seed(0))

    def beams():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=3,
                              num_return_sequences=3, do_sample=False)

    expected = beams()
    kvfx.compile(model, kvfx.StreamingLLM(budget=1 << 20), inner="eager")
    try:
        assert torch.equal(beams(), expected)
    finally:
        kvfx.restore(model)


def _steps(model, ids, steps, edit=None):
    """Prefill + greedy steps by hand; ``edit(cache)`` after the first step. Returns the logits of each step."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = []
        for step in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            if step == 1 and edit is not None:
                nxt = edit(out.past_key_values, nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return logits


POLICY = kvfx.ZeroMerge(budget=0.5, window=4)   # continuous: each row's slot counts and scores differ


def test_state_follows_a_beam_reorder():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    kvfx.compile(model, POLICY, inner="eager")
    try:
        swap = torch.tensor([1, 0])
        reordered = _steps(model, ids, 4, edit=lambda cache, nxt: (cache.reorder_cache(swap), nxt[swap])[1])
        swapped = _steps(model, ids[swap], 4)
    finally:
        kvfx.restore(model)
    for got, want in zip(reordered[1:], swapped[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_state_follows_batch_select_and_crop_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    kvfx.compile(model, POLICY, inner="eager")
    try:
        keep = torch.tensor([1])
        selected = _steps(model, ids, 4, edit=lambda cache, nxt: (cache.batch_select_indices(keep), nxt[keep])[1])
        alone = _steps(model, ids[1:], 4)
        with pytest.raises(ValueError, match=r"crop\(\) on a compressed cache"):
            _steps(model, ids, 3, edit=lambda cache, nxt: (cache.crop(-1), nxt)[1])
        with pytest.raises(AttributeError, match="slot store"):   # any other edit
            _steps(model, ids, 3, edit=lambda cache, nxt: (setattr(cache.layers[0], "keys",
                                                                     cache.layers[0].keys.clone()), nxt)[1])
    finally:
        kvfx.restore(model)
    for got, want in zip(selected[1:], alone[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compress_and_match_without_compression(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(2, 100, (1, 24))
    eager = generate(model, ids, steps=8)
    same = generate(model, ids, policy=kvfx.StreamingLLM(budget=1 << 30), steps=8)
    for a, b in zip(eager.logits, same.logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2)
    run = generate(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=8)
    assert cache_lengths(run.cache) == [12 + 7] * 2 and run.cache.layers[0].keys.dtype == dtype


def test_two_models_with_different_policies_do_not_share_state():
    a, b = tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)
    ids = torch.randint(2, 100, (1, 24))
    alone_a = generate(a, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=6)
    alone_b = generate(b, ids, policy=kvfx.ZeroMerge(budget=0.25, residual=2, window=3), steps=6)
    torch._dynamo.reset()
    kvfx.compile(a, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager")
    kvfx.compile(b, kvfx.ZeroMerge(budget=0.25, residual=2, window=3), inner="aot_eager")
    with torch.no_grad():
        out_a, out_b = a(ids, use_cache=True), b(ids, use_cache=True)
        tokens_a, tokens_b = [], []
        for _ in range(6):                                   # interleaved decode steps
            tokens_a.append(out_a.logits[:, -1:].argmax(-1))
            tokens_b.append(out_b.logits[:, -1:].argmax(-1))
            out_a = a(input_ids=tokens_a[-1], past_key_values=out_a.past_key_values, use_cache=True)
            out_b = b(input_ids=tokens_b[-1], past_key_values=out_b.past_key_values, use_cache=True)
    kvfx.restore(a), kvfx.restore(b)
    assert torch.equal(torch.cat(tokens_a, 1), alone_a.tokens[:, 24:])
    assert torch.equal(torch.cat(tokens_b, 1), alone_b.tokens[:, 24:])


def test_recompiling_with_a_new_policy_uses_only_the_new_one():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 24))
    first = generate(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=3)
    second = generate(model, ids, policy=kvfx.KNorm(budget=6), steps=3)
    assert cache_lengths(first.cache) == [14, 14] and cache_lengths(second.cache) == [8, 8]
    assert all("KNorm" in line for r in second.records for line in r.code_after.splitlines() if "'" in line
               and "kvfx.store_compress" in line)


def test_long_generation_stays_bounded():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    run = generate(model, ids, policy=kvfx.ZeroMerge(budget=0.25, residual=2, window=3), steps=2000)
    assert cache_lengths(run.cache) == [10, 10]
    assert len(run.records) <= 3
    assert kvfx.tokens_seen(run.cache.layers[0]) == 40 + 1999


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 80), budget=st.integers(1, 80), sinks=st.integers(0, 4), window=st.integers(0, 4),
       groups=st.sampled_from([1, 2, 4]), pad=st.integers(0, 10), data=st.data())
def test_select_properties(length, budget, sinks, window, groups, pad, data):
    budget = max(budget, sinks + window)
    policy = data.draw(st.sampled_from([kvfx.KNorm, kvfx.StreamingLLM]))(budget=budget, sinks=sinks, window=window)
    k = torch.randn(2, 2, length, 8)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, : min(pad, length - 1)] = False
    index = policy.select(None, k, valid, 1.0)
    n = min(length, budget)
    assert index.shape == (2, 2, n)
    assert torch.all(index[..., 1:] > index[..., :-1])           # original order, no duplicates
    real = int(valid[1].sum())
    kept_pads = (~valid[1][index[1]]).sum(-1)
    assert torch.all(kept_pads == max(0, n - real))              # padding only when real tokens run out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_keys_give_a_defined_result(bad):
    k = torch.randn(1, 2, 20, 8)
    k[0, 0, 5] = bad
    index = kvfx.KNorm(budget=10).select(None, k, torch.ones(1, 20, dtype=torch.bool), 1.0)
    assert index.shape == (1, 2, 10) and torch.all(index[..., 1:] > index[..., :-1])


def test_runtime_keeps_no_reference_to_a_dropped_cache():
    import gc
    import weakref

    model = tiny_model("llama")
    kvfx.compile(model, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager")
    with torch.no_grad():
        out = model(torch.randint(2, 100, (1, 24)), use_cache=True)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    keys = weakref.ref(out.past_key_values.layers[0].k_pages)
    bias = weakref.ref(out.past_key_values.layers[0].slot_bias)
    del out
    gc.collect()
    assert keys() is None and bias() is None, "kvfx kept a dropped cache alive"
    kvfx.restore(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generation_matches_cpu(dtype):
    """The same policy on CUDA (Triton kernels, the default there) keeps the same cache and greedy tokens as on CPU."""
    policy = kvfx.SnapKV(budget=0.5, window=4)
    ids = torch.randint(2, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", dtype=dtype).to(device)
        runs[device] = generate(model, ids.to(device), policy=policy, steps=8)
    assert torch.equal(runs["cuda"].tokens.cpu(), runs["cpu"].tokens)
    assert cache_lengths(runs["cuda"].cache) == cache_lengths(runs["cpu"].cache)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for got, want in zip(runs["cuda"].logits, runs["cpu"].logits):
        torch.testing.assert_close(got.float().cpu(), want.float(), rtol=tol, atol=tol)
