"""The seed methods and baselines: exactness invariants, the compiled
rewrite against the eager reference, head maps."""


import pytest
import torch

import kvfx
from kvfx.kernels.attention import slot_attention_reference
from kvfx.testing import cache_lengths, generate
from kvfx.testing.reference import eager_reference
from kvfx.testing.zoo import tiny_model

ALL_VALID = lambda b, s: torch.ones(b, s, dtype=torch.bool)  # noqa: E731


def full_attention(q, k, v, scale):
    """The new queries attending to the whole uncompressed cache (+ themselves)."""
    return slot_attention_reference(q, k, v, torch.zeros(k.shape[0], k.shape[1], k.shape[2] - q.shape[2]), scale)


def attention_after(policy, q_prompt, k, v, q_new, k_new, v_new, scale):
    kept = policy.compress(q_prompt, k, v, ALL_VALID(k.shape[0], k.shape[2]), scale)
    return slot_attention_reference(q_new, torch.cat([kept.k, k_new], 2), torch.cat([kept.v, v_new], 2),
                                     kept.slot_bias, scale)


def test_compensation_token_with_log_count_is_exact_when_dropped_tokens_are_identical():
    torch.manual_seed(1)
    b, hkv, s, d = 1, 2, 40, 8
    k, v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    policy = kvfx.RazorAttention(budget=4, sinks=2, window=4, retrieval_heads=())  # keeps 2 sinks + 4 recent; drops 34
    k[:, :, 2:-4] = k[:, :, 2:3]
    v[:, :, 2:-4] = v[:, :, 2:3]
    q_new, k_new, v_new = torch.randn(b, 4, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    got = attention_after(policy, None, k, v, q_new, k_new, v_new, 0.3)
    want = full_attention(q_new, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    without = attention_after(kvfx.RazorAttention(budget=4, sinks=2, window=4, retrieval_heads=(), compensation_bias=False),
                              None, k, v, q_new, k_new, v_new, 0.3)
    assert (without - want).abs().max() > 1e-3, "without +ln|D| the output must differ"


def test_merging_identical_tokens_with_count_bias_is_exact():
    torch.manual_seed(2)
    b, hkv, s, d = 1, 2, 30, 8
    k, v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    for start in (3, 12, 20):                       # three runs of 5 identical tokens
        k[:, :, start:start + 5] = k[:, :, start:start + 1]
        v[:, :, start:start + 5] = v[:, :, start:start + 1]
    q = torch.randn(b, 4, s, d)
    policy = kvfx.KVMerger(budget=s - 12, recent=0.0, protect_top=0.0, count_bias=True, exempt_layers=())
    q_new, k_new, v_new = torch.randn(b, 4, 2, d), torch.randn(b, hkv, 2, d), torch.randn(b, hkv, 2, d)
    got = attention_after(policy, q, k, v, q_new, k_new, v_new, 0.35)
    want = full_attention(q_new, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), 0.35)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_kvmerger_merged_key_is_the_gaussian_weighted_sum_around_the_pivot():
    # One head, 6 tokens: tokens 1..3 are similar (one set), the rest are not.
    k = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1.1, 0.1], [0, 0.9, -0.1], [0, 0, 1], [-1, 0, 0]])[None, None]
    v = torch.arange(18, dtype=torch.float32).view(1, 1, 6, 3)
    q = torch.zeros(1, 1, 6, 3)
    q[0, 0, :, 1] = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0])  # only query 3 looks at the set: pivot = token 3
    policy = kvfx.KVMerger(budget=4, epsilon=0.9, sigma=0.5, recent=0.0, protect_top=0.0, exempt_layers=())
    kept = policy.compress(q, k, v, ALL_VALID(1, 6), 1.0)
    members = [1, 2, 3]
    pivot = int(kept.index[0, 0, 1])
    assert kept.k.shape[2] == 4 and pivot in members
    g = torch.exp(-((k[0, 0, pivot] - k[0, 0, members]) ** 2).sum(-1) / (2 * 0.5**2))
    w = g / g.sum()
    torch.testing.assert_close(kept.k[0, 0, 1], (w[:, None] * k[0, 0, members]).sum(0))
    torch.testing.assert_close(kept.v[0, 0, 1], (w[:, None] * v[0, 0, members]).sum(0))
    torch.testing.assert_close(kept.k[0, 0, [0, 2, 3]], k[0, 0, [0, 4, 5]])


def test_kvmerger_meets_the_budget_exactly_even_without_similar_keys():
    k = torch.randn(2, 2, 50, 8)
    policy = kvfx.KVMerger(budget=0.3, epsilon=0.999, exempt_layers=())
    kept = policy.compress(torch.randn(2, 4, 50, 8), k, torch.randn(2, 2, 50, 8), ALL_VALID(2, 50), 0.3)
    assert kept.k.shape[2] == 15 and torch.isfinite(kept.slot_bias).all()


def positions_of(kept_keys, full_keys):
    """Original positions of the kept key rows (exact matches)."""
    same = (kept_keys[:, :, :, None, :] == full_keys[:, :, None, :, :]).all(-1)   # [B, Hkv, n, S]
    assert same.any(-1).all(), "a kept key is not one of the prompt's keys"
    return same.float().argmax(-1)


@pytest.mark.parametrize("reuse_every", [1, 2])
def test_chunkkv_keeps_whole_chunks_the_same_for_every_head_and_layer_group(reuse_every):
    model = tiny_model("llama")
    model.config.num_hidden_layers  # 2 layers: with reuse_every=2, layer 1 reuses layer 0
    ids = torch.randint(2, 100, (1, 44))
    with torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    policy = kvfx.ChunkKV(budget=0.5, window=4, chunk=5, reuse_every=reuse_every)
    run = generate(model, ids, policy=policy, steps=1)
    kept = [positions_of(run.cache.layers[i].keys, full.layers[i].keys) for i in range(2)]
    for pos in kept:
        assert (pos == pos[:, :1]).all(), "every head keeps the same positions"
        chunk_part = pos[0, 0][pos[0, 0] < 40]                 # 44 - window 4 = 40 = 8 whole chunks
        chunks, counts = torch.unique(chunk_part // 5, return_counts=True)
        assert (counts == 5).all(), f"partial chunk kept: {chunk_part.tolist()}"
        assert pos[0, 0][-4:].tolist() == [40, 41, 42, 43], "observation window kept"
    assert torch.equal(kept[0], kept[1]) == (reuse_every == 2) or reuse_every == 1
    if reuse_every == 2:
        assert torch.equal(kept[0], kept[1])
        assert "reuses the indices of layer 0" in [s.note for s in run.records[0].sites]


def test_zeromerge_cache_is_constant_and_counts_sum_to_tokens_seen():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    run = generate(model, ids, policy=kvfx.ZeroMerge(budget=0.25, residual=2, window=3), steps=65)
    lengths = cache_lengths(run.cache)
    assert lengths == [10, 10]
    for layer in run.cache.layers:
        assert kvfx.tokens_seen(layer) == 40 + 64
        counts = layer.dense()[2].exp().sum(-1)
        torch.testing.assert_close(counts, torch.full_like(counts, 104.0), rtol=0, atol=1e-3)
    assert len(run.records) <= 3 and run.graph_breaks == 0


def test_zeromerge_length_is_constant_every_step():
    model = tiny_model("qwen2")
    ids = torch.randint(2, 100, (1, 40))
    policy = kvfx.ZeroMerge(budget=0.25, residual=2, window=3)
    kvfx.compile(model, policy, inner="aot_eager")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(64):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            assert cache_lengths(cache) == [10, 10]
    kvfx.restore(model)


def test_tova_evicts_to_a_constant_budget():
    model = tiny_model("llama")
    run = generate(model, torch.randint(2, 100, (1, 24)), policy=kvfx.TOVA(budget=0.5), steps=10)
    assert cache_lengths(run.cache) == [12, 12]


def test_pyramidkv_budgets_decrease_with_depth():
    policy = kvfx.PyramidKV(budget=0.3, window=4)
    lengths = [policy.kept_length(1000, layer, 8) for layer in range(8)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > 300 > lengths[-1]
    assert abs(sum(lengths) / 8 - 300) < 10


@pytest.mark.parametrize("budget,window,sinks", [(0.2, 32, 0), (0.1, 32, 0), (0.35, 4, 2), (64, 16, 4)])
@pytest.mark.parametrize("n_layers", [2, 3, 24])
def test_pyramidkv_mean_kept_per_layer_never_exceeds_the_budget(budget, window, sinks, n_layers):
    policy = kvfx.PyramidKV(budget=budget, window=window, sinks=sinks)
    for length in [*range(1, 400), *range(400, 4097, 37)]:
        kept = [policy.kept_length(length, layer, n_layers) for layer in range(n_layers)]
        allowed = budget if isinstance(budget, int) else budget * length
        # Below the always-kept tokens every layer keeps them, as every preset does.
        assert sum(kept) / n_layers <= max(allowed, min(length, sinks + window)) + 1, (length, kept)
        assert all(min(length, sinks + window) <= n <= length for n in kept), (length, kept)


def test_pyramidkv_plan_is_the_same_formula_for_symbolic_lengths():
    from kvfx.explain import S

    policy = kvfx.PyramidKV(budget=0.2, window=32)
    for layer in range(3):
        formula = policy.kept_length(S, layer, 3)
        assert all(int(formula.subs(S, n)) == policy.kept_length(n, layer, 3) for n in (1, 50, 320, 1024, 4096))


def test_razor_retrieval_heads_hold_every_slot_and_the_others_only_theirs():
    model = tiny_model("llama")
    policy = kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=((1, 0),))
    run = generate(model, torch.randint(2, 100, (1, 40)), policy=policy, steps=1)
    assert cache_lengths(run.cache) == [2 + 4 + 1, 40]
    layer = run.cache.layers[1]
    assert layer.lengths[0].tolist() == [40, 7]                # the retrieval head keeps everything, the other 7
    bias = layer.dense()[2][0]
    assert torch.isfinite(bias[0]).all()
    assert torch.isfinite(bias[1, :7]).all()                   # 2 sinks, a compensation slot, 4 recent


POLICIES = {
    "StreamingLLM": kvfx.StreamingLLM(budget=0.5, sinks=2),
    "SnapKV": kvfx.SnapKV(budget=0.5, window=4),
    "KNorm": kvfx.KNorm(budget=0.5),
    "H2O": kvfx.H2O(budget=0.5, window=4),
    "TOVA": kvfx.TOVA(budget=0.5),
    "PyramidKV": kvfx.PyramidKV(budget=0.5, window=4),
    "KVMerger": kvfx.KVMerger(budget=0.5, exempt_layers=(), count_bias=True),
    "ChunkKV": kvfx.ChunkKV(budget=0.5, window=4, chunk=4, reuse_every=2),
    "RazorAttention": kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((1, 0),)),
    "ZeroMerge": kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
    # the window approximation of the attention sums (the last 6 queries of the prompt)
    "H2O-last-queries": kvfx.H2O(budget=0.5, window=4, sum_queries=6),
    "ZeroMerge-last-queries": kvfx.ZeroMerge(budget=0.25, residual=2, window=3, sum_queries=6),
    # the seed methods' merges guided by another policy's score
    "KVMerger-SnapKV": kvfx.KVMerger(budget=0.5, exempt_layers=(), scorer=kvfx.SnapKV(window=4)),
    "KVMerger-KNorm": kvfx.KVMerger(budget=0.5, exempt_layers=(), scorer=kvfx.KNorm()),
    "ZeroMerge-SnapKV": kvfx.ZeroMerge(budget=0.25, residual=2, window=3, scorer=kvfx.SnapKV(window=4)),
}


SEEDS = ("KVMerger", "ChunkKV", "RazorAttention", "ZeroMerge")
CASES = [("llama", name) for name in POLICIES] + [("qwen2", name) for name in SEEDS]


@pytest.mark.parametrize("family,name", CASES)
def test_compiled_equals_eager_reference_over_32_decode_steps(family, name):
    policy = POLICIES[name]
    model = tiny_model(family)
    ids = torch.randint(2, 100, (1, 24))
    compiled = generate(model, ids, policy=policy, steps=33)
    with eager_reference(model, policy):
        reference = generate(model, ids, steps=33)
    assert torch.equal(compiled.tokens, reference.tokens)
    for a, b in zip(compiled.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        if (got.lengths != got.lengths.max()).any():
            continue  # a ragged store holds each head's own slots; the reference pads its rectangle: logits compared
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-5)
    assert len(compiled.records) <= 3 and compiled.graph_breaks == 0


def test_retrieval_heads_are_deterministic_and_roundtrip_through_json(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "heads.json"
    heads = kvfx.find_retrieval_heads(model, block=32, repeats=4, induction_top=0.3, path=path)
    assert heads == kvfx.find_retrieval_heads(model, block=32, repeats=4, induction_top=0.3)
    assert heads and kvfx.load_head_map(path, model) == heads
    ids = torch.randint(2, 100, (1, 40))
    run_a = generate(model, ids, policy=kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=heads), steps=4)
    loaded = kvfx.load_head_map(path, model)
    run_b = generate(model, ids, policy=kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=loaded), steps=4)
    assert torch.equal(run_a.tokens, run_b.tokens)
    for a, b in zip(run_a.logits, run_b.logits):
        assert torch.equal(a, b)


def test_head_map_of_another_model_or_corrupted_is_rejected(tmp_path):
    path = tmp_path / "heads.json"
    kvfx.save_head_map(path, tiny_model("llama"), ((0, 0),))
    with pytest.raises(ValueError, match="another model config"):
        kvfx.load_head_map(path, tiny_model("qwen2"))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a kvfx head map"):
        kvfx.load_head_map(path, tiny_model("llama"))


@pytest.mark.parametrize("kwargs,field", [
    (dict(epsilon=2.0), "epsilon"), (dict(sigma=0), "sigma"), (dict(recent=1.5), "recent"),
    (dict(exempt_layers=[0]), "exempt_layers")])
def test_kvmerger_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=rf"KVMerger\.{field}="):
        kvfx.KVMerger(**kwargs)


def test_seed_policies_reject_bad_fields():
    with pytest.raises(ValueError, match=r"ChunkKV\.chunk=0"):
        kvfx.ChunkKV(chunk=0)
    with pytest.raises(ValueError, match=r"RazorAttention\.retrieval_heads="):
        kvfx.RazorAttention(retrieval_heads=((0, -1),))
    with pytest.raises(ValueError, match=r"ZeroMerge: budget=8 leaves no top slot"):
        kvfx.ZeroMerge(budget=8, residual=2, window=6)
    with pytest.raises(ValueError, match=r"PyramidKV\.beta="):
        kvfx.PyramidKV(beta=0.5)


# -- the prompt's attention lends its sums (CPU) or log-sum-exp to the scorers --


def _count_lse(monkeypatch, drop: bool = False) -> dict:
    """Spy on the column sums the scorers run: how many had the attention's
    log-sum-exp; ``drop``: withhold it (the two-pass sums)."""
    import kvfx.policies.scores as scores

    seen = {"lse": 0, "two_pass": 0}
    real = scores.column_sums

    def spy(q, k, valid, scale, decay=1.0, lse=None):
        seen["two_pass" if lse is None or drop else "lse"] += 1
        return real(q, k, valid, scale, decay, lse=None if drop else lse)

    monkeypatch.setattr(scores, "column_sums", spy)
    return seen


@pytest.mark.parametrize("path", ["sums", "lse"])
@pytest.mark.parametrize("policy", [kvfx.H2O(budget=0.5), kvfx.ZeroMerge(budget=0.5),
                                    kvfx.H2O(budget=0.5, sum_queries=7)], ids=["H2O", "ZeroMerge", "H2O-last7"])
def test_column_sum_scorers_take_the_prompt_attentions_sums_or_log_sum_exp_and_keep_the_same(
        monkeypatch, policy, path):
    """On the CPU in float32 the prompt's attention sums each key's attention
    itself (with the policy's decay and queries); with KVFX_KERNELS set it
    lends its log-sum-exp. Either way the run equals the two-pass sums'."""
    model, ids = tiny_model("llama"), torch.randint(3, 100, (1, 40))
    if path == "lse":
        monkeypatch.setenv("KVFX_KERNELS", "reference")
    op, note = {"sums": ("kvfx.attention_column_sums", "sums each key"),
                "lse": ("kvfx.attention_lse", "log-sum-exp")}[path]
    seen = _count_lse(monkeypatch)
    lent = generate(model, ids, policy=policy, steps=4)
    prefill = [r for r in lent.records if any(s.phase == "prefill" for s in r.rewritten)]
    assert prefill and all(op in r.code_after for r in prefill)
    assert all(note in s.note for r in prefill for s in r.rewritten if s.phase == "prefill")  # explain says so
    layers = model.config.num_hidden_layers
    assert seen == ({"lse": 0, "two_pass": 0} if path == "sums" else {"lse": layers, "two_pass": 0})
    monkeypatch.setenv("KVFX_KERNELS", "reference")
    _count_lse(monkeypatch, drop=True)
    two_pass = generate(model, ids, policy=policy, steps=4)
    assert torch.equal(lent.tokens, two_pass.tokens)
    assert cache_lengths(lent.cache) == cache_lengths(two_pass.cache)
    for a, b in zip(lent.logits, two_pass.logits):
        assert (a - b).abs().max() <= 1e-4


def test_sums_over_repeated_keys_are_the_cache_heads_sums(monkeypatch):
    """A handwritten model that repeat_interleaves its KV heads for SDPA: the
    one-pass sums read the cache's own k, v grouped, and the kept cache equals
    the two-pass sums' (KVFX_KERNELS set)."""
    import kvfx.policies.scores as scores
    from kvfx.testing.handwritten import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(n_layers=2, n_heads=4, n_kv_heads=2).eval()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    real, own = scores.column_sums, []
    monkeypatch.setattr(scores, "column_sums", lambda *a, **kw: own.append(1) or real(*a, **kw))
    caches = {}
    for path in ("sums", "two-pass"):
        if path == "two-pass":
            monkeypatch.setenv("KVFX_KERNELS", "reference")
        torch._dynamo.reset()
        kvfx.compile(model, kvfx.H2O(budget=0.5, window=4), inner="aot_eager")
        with torch.no_grad():
            logits, past = model(ids)
        code = "".join(r.code_after for r in model._kvfx_backend.records)
        assert ("kvfx.attention_column_sums" in code) == (path == "sums")
        kvfx.restore(model)
        caches[path] = (logits, past, len(own))
    assert caches["sums"][2] == 0 and caches["two-pass"][2] == 2     # no pass of the scorer's own
    torch.testing.assert_close(caches["sums"][0], caches["two-pass"][0], atol=1e-5, rtol=0)
    for (k1, v1), (k2, v2) in zip(caches["sums"][1], caches["two-pass"][1]):
        assert k1.shape[-2] < 40
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=0)


def test_lent_sums_serve_only_the_terms_they_were_summed_with():
    """A scorer asking for other (decay, queries) than the lent sums', or a
    prompt with padding, computes its own."""
    from kvfx.kernels.column_sums import attention_with_column_sums, column_sums_reference
    from kvfx.policies.scores import attention_sums, prompt_lse

    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    valid = ALL_VALID(1, 30)
    out, sums = attention_with_column_sums(q, k, v, 0.3, 0.9, 6)
    with prompt_lse(q, None, sums, (0.9, 6)):
        assert attention_sums(q, k, valid, 0.3, 0.9, queries=6) is sums
        torch.testing.assert_close(attention_sums(q, k, valid, 0.3), column_sums_reference(q, k, valid, 0.3))
        padded = valid.clone()
        padded[0, :3] = False
        torch.testing.assert_close(attention_sums(q, k, padded, 0.3, 0.9, queries=6),
                                   column_sums_reference(q[:, :, -6:], k, padded, 0.3, 0.9))
        assert attention_sums(q.clone(), k, valid, 0.3, 0.9, queries=6) is not sums   # other queries
    torch.testing.assert_close(sums, column_sums_reference(q[:, :, -6:], k, valid, 0.3, 0.9))


def test_a_masked_prompt_or_a_window_scorer_keeps_the_models_attention(monkeypatch):
    model = tiny_model("llama")
    ids, mask = torch.randint(3, 100, (2, 40)), torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0   # left padding: SDPA gets a mask, whose log-sum-exp kvfx does not take
    seen = _count_lse(monkeypatch)
    padded = generate(model, ids, attention_mask=mask, policy=kvfx.H2O(budget=0.5), steps=2)
    assert not any("kvfx.attention_lse" in r.code_after or "kvfx.attention_column_sums" in r.code_after
                   for r in padded.records)
    assert seen["lse"] == 0 and seen["two_pass"] > 0
    snap = generate(model, ids[:1], policy=kvfx.SnapKV(budget=0.5), steps=2)
    assert not any("kvfx.attention_lse" in r.code_after or "kvfx.attention_column_sums" in r.code_after
                   for r in snap.records)


@pytest.mark.parametrize("make", [
    lambda n: kvfx.H2O(budget=0.5, window=2, sum_queries=n),
    lambda n: kvfx.KVMerger(budget=0.5, exempt_layers=(), sum_queries=n),
    lambda n: kvfx.ZeroMerge(budget=0.5, residual=2, window=2, decay=0.9, sum_queries=n)])
def test_sum_queries_scores_by_the_last_queries_only(make):
    from kvfx.kernels.column_sums import column_sums_reference

    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)
    valid = ALL_VALID(2, 30)
    decay = getattr(make(0), "decay", 1.0)
    exact = make(0).score(q, k, valid, 0.3)
    torch.testing.assert_close(exact, column_sums_reference(q, k, valid, 0.3, decay))
    approx = make(5).score(q, k, valid, 0.3)
    torch.testing.assert_close(approx, column_sums_reference(q[:, :, -5:], k, valid, 0.3, decay))
    assert (approx - exact).abs().max() > 0.1       # an approximation, never silently the same
    torch.testing.assert_close(make(30).score(q, k, valid, 0.3), exact)   # n >= the prompt: exact
    # The lent log-sum-exp is sliced with the queries: one pass equals two.
    from kvfx.policies.scores import prompt_lse

    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    lse = logits.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    with prompt_lse(q, lse):
        torch.testing.assert_close(make(5).score(q, k, valid, 0.3), approx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda scorer: kvfx.KVMerger(budget=0.5, exempt_layers=(), scorer=scorer),
    lambda scorer: kvfx.ZeroMerge(budget=0.3, residual=2, window=3, scorer=scorer)], ids=["KVMerger", "ZeroMerge"])
def test_a_scorer_guides_the_seed_merges_and_none_is_the_paper(make):
    """``scorer=``: the protected set / pivots (KVMerger) and the top slots
    (ZeroMerge) follow the given policy's score; None is the paper's
    accumulated attention."""
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    valid = ALL_VALID(1, 40)
    snap = kvfx.SnapKV(window=6)
    torch.testing.assert_close(make(snap)._score(q, k, valid, 0.3), snap.score(q, k, valid, 0.3))
    paper = make(None)
    torch.testing.assert_close(paper._score(q, k, valid, 0.3),
                               kvfx.ZeroMerge(decay=paper.decay).score(q, k, valid, 0.3) if hasattr(paper, "decay")
                               else kvfx.H2O().score(q, k, valid, 0.3))
    guided, plain = make(snap).compress(q, k, v, valid, 0.3), paper.compress(q, k, v, valid, 0.3)
    assert guided.k.shape == plain.k.shape                                   # same budget
    assert not torch.equal(guided.index, plain.index)                        # other slots kept
    knorm = make(kvfx.KNorm())
    assert not knorm.needs_queries or isinstance(knorm, kvfx.ZeroMerge)      # ZeroMerge's steps read queries
    assert not make(snap).sums_attention and paper.sums_attention
    with pytest.raises(ValueError, match=r"scorer="):
        make("SnapKV")
