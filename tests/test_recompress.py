"""Recompress: a one-shot policy applied again while decoding. Its schedule
keeps each layer under target + every slots; a recompression keeps what the
policy ranks best among the slots held (sinks and window first, order kept),
per row, a padded row within its own real slots; the compiled rewrite equals
the eager reference through several recompressions with one decode graph;
a window score (SnapKV) ranks by the attention its last ``window`` decode
queries paid, gathered step by step in the running score."""

import pytest
import torch

import kvfx
from kvfx.testing import against_reference, cache_lengths, generate
from kvfx.testing.reference import eager_reference
from kvfx.testing.zoo import tiny_model

NEG_INF = float("-inf")


def lengths_by_hand(start, steps, every, target):
    """Slots a row holds after each decode step that brings one token: once
    it reaches target + every, it gives up ``every`` slots at a time."""
    out, n = [], start
    for _ in range(steps):
        n += 1
        while n >= target + every:
            n -= every
        out.append(n)
    return out


def test_rows_stay_under_target_plus_every_and_drop_to_target_when_due():
    policy = kvfx.Recompress(kvfx.KNorm(budget=0.5), every=4, target=8)
    got, n = [], 8
    for _ in range(12):
        n = policy.decode_length(n + 1, 1)
        got.append(n)
    assert got == [9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8] == lengths_by_hand(8, 12, 4, 8)
    assert policy.decode_length(5, 1) == 5                       # under target: nothing to do
    assert policy.decode_length(30, 1) == 8 + (30 - 8) % 4       # a cache above target + every comes down at once
    rows = policy.decode_length(torch.tensor([5, 11, 12, 13]), 1)
    assert rows.tolist() == [5, 11, 8, 9]


def keep_by_hand(k, bias, sinks, window, n):
    """One row: its real slots in order; sinks and window first, then the lowest key norms (KNorm), n in all."""
    real = [i for i in range(k.shape[0]) if bias[i] != NEG_INF]
    always = set(real[:sinks]) | set(real[len(real) - window:])
    rest = sorted((i for i in real if i not in always), key=lambda i: (k[i].norm().item(), i))
    return sorted(always | set(rest[: max(0, n - len(always))]))


def test_a_recompression_keeps_the_policys_best_real_slots_of_each_row_in_order():
    torch.manual_seed(0)
    b, kv_heads, s, d = 2, 2, 14, 8
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    bias = torch.zeros(b, kv_heads, s)
    bias[1, 0, [0, 3, 4]] = NEG_INF            # a padded row's fillers, anywhere in the row
    bias[1, 1, [1, 2, 9]] = NEG_INF
    policy = kvfx.Recompress(kvfx.KNorm(budget=0.5, sinks=1, window=2), every=4, target=10)
    q = torch.randn(b, 4, 1, d)
    k2, v2, bias2, score2 = policy.step(q, k, v, bias, torch.zeros_like(bias), 0.3)
    assert k2.shape[2] == 10 and not score2.any()
    for row in range(b):
        for head in range(kv_heads):
            want = keep_by_hand(k[row, head], bias[row, head], 1, 2, 10)
            real = bias2[row, head] != NEG_INF
            assert int(real.sum()) == len(want)        # 11 real slots keep 10, 14 keep 10
            torch.testing.assert_close(k2[row, head][real], k[row, head, want])
            torch.testing.assert_close(v2[row, head][real], v[row, head, want])


def test_a_step_before_the_rows_are_due_changes_nothing():
    k = torch.randn(1, 2, 9, 8)
    bias = torch.zeros(1, 2, 9)
    policy = kvfx.Recompress(kvfx.KNorm(budget=0.5), every=4, target=8)
    out = policy.step(torch.randn(1, 2, 1, 8), k, k, bias, bias, 0.3)
    assert out[0] is k and out[2] is bias


def test_a_window_score_ranks_by_the_attention_of_the_last_window_queries_before_the_recompression():
    """SnapKV under Recompress: the last ``window`` decode calls before a
    recompression add their queries' attention to each slot's running score;
    the recompression then keeps what SnapKV keeps when those queries score
    the same slots at once (its score: the window's attention, pooled)."""
    torch.manual_seed(5)
    b, kv_heads, heads, d, target, every = 2, 2, 4, 8, 10, 5
    snap = kvfx.SnapKV(budget=0.5, sinks=1, window=3, kernel=3)
    policy = kvfx.Recompress(snap, every=every, target=target)
    assert policy.keeps_running_score and not kvfx.Recompress(kvfx.KNorm()).keeps_running_score
    k, v = torch.randn(b, kv_heads, target, d), torch.randn(b, kv_heads, target, d)
    bias, score = torch.zeros(b, kv_heads, target), torch.zeros(b, kv_heads, target)
    queries = []
    for step in range(every):
        q = torch.randn(b, heads, 1, d)
        queries.append(q)
        k_all = torch.cat([k, torch.randn(b, kv_heads, 1, d)], 2)
        v_all = torch.cat([v, torch.randn(b, kv_heads, 1, d)], 2)
        pad = lambda x: torch.nn.functional.pad(x, (0, 1))  # noqa: E731
        out = policy.step(q, k_all, v_all, pad(bias), pad(score), 0.3)
        if step < every - 1:
            k, v, bias, score = out
            assert k.shape[2] == target + step + 1
            # only the last 3 calls before the recompression gather attention
            assert bool(score.any()) == (step >= every - 3)
    want = kvfx.SnapKV(budget=target, sinks=1, window=3, kernel=3).compress(
        torch.cat(queries[-3:], 2), k_all, v_all, torch.ones(b, target + every, dtype=torch.bool), 0.3)
    assert out[0].shape[2] == target and not out[3].any()
    torch.testing.assert_close(out[0], want.k)
    torch.testing.assert_close(out[1], want.v)


def chunks_by_hand(k, window, chunk, n):
    """One batch row [Hkv, S, D], ChunkKV guided by KNorm (score -|k|): the
    score summed over heads, chunks of ``chunk`` slots from the first, the
    newest ``window`` slots and the partial chunk before them kept, then the
    best whole chunks (mean score) while they fit within ``n``."""
    s = k.shape[1]
    token = (-k.norm(dim=-1)).sum(0)
    prefix = s - window
    full = prefix // chunk
    always = list(range(full * chunk, s))
    means = [(float(token[c * chunk:(c + 1) * chunk].mean()), c) for c in range(full)]
    best = sorted(means, key=lambda m: (-m[0], m[1]))[: max(0, (n - len(always)) // chunk)]
    return sorted([c * chunk + i for _, c in best for i in range(chunk)] + always)


def test_a_chunk_policy_keeps_whole_chunks_again_the_same_slots_in_every_head():
    torch.manual_seed(3)
    b, kv_heads, s, d = 2, 2, 27, 8
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    bias = torch.zeros(b, kv_heads, s)
    policy = kvfx.Recompress(kvfx.ChunkKV(budget=0.5, window=3, chunk=4, scorer=kvfx.KNorm()), every=4, target=18)
    # 27 slots are due: target + (27 - 18) % 4 = 19 allowed, of which whole chunks fit 3 + 0 (24 % 4) + 4 x 4
    assert policy.decode_length(27, 1) == 19
    assert policy.decode_length(20, 1) == 20 and policy.decode_length(22, 1) == 3 + 3 + 4 * 3  # due at 22: 18 allowed; 19 % 4 = 3
    k2, v2, bias2, score2 = policy.step(torch.randn(b, 4, 1, d), k, v, bias, torch.zeros_like(bias), 0.3)
    assert k2.shape[2] == 19 and not bias2.any() and not score2.any()
    for row in range(b):
        want = chunks_by_hand(k[row], 3, 4, 19)
        assert len(want) == 19
        torch.testing.assert_close(k2[row], k[row][:, want])
        torch.testing.assert_close(v2[row], v[row][:, want])


def padded_run(policy, family="llama"):
    """12 greedy tokens of a tiny model on a batch of two 40-token prompts, one
    left-padded by 7, compiled and under the eager reference (same tokens)."""
    model = tiny_model(family)
    ids = torch.randint(2, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return (model, ids, mask, *against_reference(model, ids, policy, steps=12, attention_mask=mask))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_equals_the_eager_reference_through_several_recompressions(family):
    policy = kvfx.Recompress(kvfx.SnapKV(budget=0.5, sinks=2, window=4), every=4, target=16)
    model, ids, mask, compiled, reference = padded_run(policy, family)
    # 20 slots after the prompt, then 11 decode calls: 17 18 19 16 17 18 19 16 17 18 19
    assert lengths_by_hand(20, 11, 4, 16)[-1] == 19
    assert cache_lengths(compiled.cache) == [19] * model.config.num_hidden_layers
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
    # SnapKV's window attention is gathered in a running score, one float per slot
    assert all(layer.slot_score.numel() > 0 for layer in compiled.cache.layers)
    # more recompressions compile nothing new
    longer = generate(model, ids, policy=policy, steps=30, attention_mask=mask)
    assert len(longer.records) == len(compiled.records)


def test_a_chunk_policy_compiled_equals_its_eager_reference_while_decoding():
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    policy = kvfx.Recompress(kvfx.ChunkKV(budget=0.5, window=4, chunk=4), every=4, target=16)
    compiled = generate(model, ids, policy=policy, steps=12)
    with eager_reference(model, policy):
        reference = generate(model, ids, steps=12)
    assert compiled.graph_breaks == 0 and any(r.rewritten for r in compiled.records)
    assert torch.equal(compiled.tokens, reference.tokens)
    lengths = cache_lengths(compiled.cache)
    assert lengths == cache_lengths(reference.cache) and max(lengths) < 16 + 4
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
    longer = generate(model, ids, policy=policy, steps=30)
    assert len(longer.records) == len(compiled.records)


def test_a_target_above_what_decoding_reaches_equals_the_wrapped_policy():
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    snap = kvfx.SnapKV(budget=0.5, window=4)
    alone = generate(model, ids, policy=snap, steps=6)
    wrapped = generate(model, ids, policy=kvfx.Recompress(snap, every=8, target=64), steps=6)
    assert torch.equal(alone.tokens, wrapped.tokens)
    assert cache_lengths(alone.cache) == cache_lengths(wrapped.cache) == [25, 25]


def critical_keep_by_hand(k, v, weight, real, sinks, window, n, first_stage=0.5, epsilon=1e-4):
    """One (batch, KV head) row of a recompression of CriticalKV(KNorm) to
    ``n`` slots. k, v [S, D] of KV head ``head`` (its query heads' slices of
    ``weight`` given as a list of [hidden, D]); ``real``: the row's real
    positions. Stage 1: the sinks, the window, then the lowest key norms up to
    floor(n x first_stage); stage 2: the rest by (-norm + epsilon) x the mean
    over the query heads of ||v W_o[h]||_1. The kept positions, in order."""
    norm = {i: -k[i].norm().item() for i in real}
    moved = {i: sum((weight_h @ v[i]).abs().sum().item() for weight_h in weight) / len(weight) for i in real}
    always = real[:sinks] + real[len(real) - window:]
    rest = sorted((i for i in real if i not in always), key=lambda i: (-norm[i], i))
    first = always + rest[:max(0, int(n * first_stage) - len(always))]
    second = sorted((i for i in real if i not in first), key=lambda i: (-(norm[i] + epsilon) * moved[i], i))
    return sorted(first + second[:n - len(first)])


def test_a_critical_recompression_weighs_each_value_by_the_lent_output_projection():
    """Recompress(CriticalKV(KNorm)): a recompression keeps the first stage
    (sinks, window, then floor(target / 2) by the key norm alone) and fills
    target by the norm corrected by what each value moves through W_o, the
    weight the rewrite lends to the decode step; a padded row within its own
    real slots."""
    from kvfx.policies.scores import out_projection

    torch.manual_seed(5)
    b, kv_heads, heads, s, d, hidden = 2, 2, 4, 20, 8, 16
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d) * torch.rand(1, 1, s, 1) * 4
    weight = torch.randn(hidden, heads * d)
    bias = torch.zeros(b, kv_heads, s)
    bias[1, :, :5] = NEG_INF                                          # a left-padded row
    policy = kvfx.Recompress(kvfx.CriticalKV(kvfx.KNorm(budget=0.5, sinks=1, window=2)), every=4, target=8)
    q = torch.randn(b, heads, 1, d)
    with out_projection(weight):
        k2, v2, bias2, _ = policy.step(q, k, v, bias, torch.zeros(b, kv_heads, s), 1.0)
    assert k2.shape[2] == 8
    differs = False
    for row in range(b):
        real = [i for i in range(s) if bias[row, 0, i] != NEG_INF]
        for head in range(kv_heads):
            slices = [weight[:, j * d:(j + 1) * d] for j in range(head * 2, head * 2 + 2)]
            want = critical_keep_by_hand(k[row, head], v[row, head], slices, real, 1, 2, 8)
            torch.testing.assert_close(k2[row, head], k[row, head, want])
            torch.testing.assert_close(v2[row, head], v[row, head, want])
            plain = sorted(sorted(real[1:-2], key=lambda i: k[row, head, i].norm().item())[:5] + real[:1] + real[-2:])
            differs |= plain != want
    assert differs   # the correction changed what KNorm alone would keep
    with pytest.raises(ValueError, match="output projection and got none"):
        policy.step(q, k, v, bias, torch.zeros(b, kv_heads, s), 1.0)


@pytest.mark.parametrize("inner", ["SnapKV", "AdaKV"])
def test_a_critical_recompression_compiled_equals_the_eager_reference(inner):
    """CriticalKV under Recompress, compiled: the decode step is lent the
    layer's W_o (its recompression would fail without it), through several
    recompressions on a padded batch, with equal rows (SnapKV's gathered
    window) and rows the heads share (AdaKV)."""
    scorer = getattr(kvfx, inner)(budget=0.5, sinks=2, window=4)
    policy = kvfx.Recompress(kvfx.CriticalKV(scorer), every=4, target=16)
    model, ids, mask, compiled, reference = padded_run(policy)
    assert compiled.graph_breaks == 0
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        if policy.ragged_rows:
            for row, head in zip(*torch.nonzero(got.lengths >= 0, as_tuple=True)):
                n = int(got.lengths[row, head])
                torch.testing.assert_close(got.keys[row, head, :n], want.keys[row, head, :n], rtol=0, atol=1e-5)
        else:
            assert got.keys.shape[2] == 19
            torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)


def test_h2o_accumulates_every_querys_attention_across_recompressions():
    """Recompress(H2O), by hand (one row, GQA): the kept prompt slots start
    from the prompt's column sums (summed over a KV head's query heads),
    every decode query adds the attention it pays each slot, and a
    recompression keeps the sink, the window and the highest sums, which
    the kept slots carry on (the paper's accumulated heavy hitters)."""
    torch.manual_seed(7)
    kv_heads, heads, prompt, d, scale = 2, 4, 16, 8, 0.5
    group = heads // kv_heads
    policy = kvfx.Recompress(kvfx.H2O(budget=0.5, window=2, sinks=1), every=3, target=8)
    q, k, v = torch.randn(1, heads, prompt, d), torch.randn(1, kv_heads, prompt, d), torch.randn(1, kv_heads, prompt, d)
    out = policy.compress(q, k, v, torch.ones(1, prompt, dtype=torch.bool), scale)
    held = []   # per KV head: [position, key, value, sum] of each slot held, in order
    for h in range(kv_heads):
        sums = torch.zeros(prompt)
        for g in range(h * group, (h + 1) * group):
            for i in range(prompt):
                sums[:i + 1] += (q[0, g, i] @ k[0, h, :i + 1].T * scale).softmax(-1)
        rest = sorted(range(1, prompt - 2), key=lambda j: -sums[j].item())[:5]
        held.append([[j, k[0, h, j], v[0, h, j], sums[j].item()] for j in sorted([0, *rest, prompt - 2, prompt - 1])])

    def check(k_got, score_got):
        for h in range(kv_heads):
            assert k_got.shape[2] == len(held[h])
            torch.testing.assert_close(k_got[0, h], torch.stack([slot[1] for slot in held[h]]))
            torch.testing.assert_close(score_got[0, h], torch.tensor([slot[3] for slot in held[h]]))

    check(out.k, out.slot_score)
    k_c, v_c, score = out.k, out.v, out.slot_score
    recompressions = 0
    for step in range(8):
        q1, k1, v1 = torch.randn(1, heads, 1, d), torch.randn(1, kv_heads, 1, d), torch.randn(1, kv_heads, 1, d)
        k_c, v_c = torch.cat([k_c, k1], 2), torch.cat([v_c, v1], 2)
        score = torch.cat([score, torch.zeros(1, kv_heads, 1)], 2)
        k_c, v_c, bias, score = policy.step(q1, k_c, v_c, torch.zeros(score.shape), score, scale)
        for h in range(kv_heads):
            held[h].append([prompt + step, k1[0, h, 0], v1[0, h, 0], 0.0])
            keys = torch.stack([slot[1] for slot in held[h]])
            for g in range(h * group, (h + 1) * group):
                for slot, p in zip(held[h], (q1[0, g, 0] @ keys.T * scale).softmax(-1)):
                    slot[3] += p.item()
            if len(held[h]) == 11:   # target + every: keep the sink, the window, the 5 highest sums
                middle = sorted(held[h][1:-2], key=lambda slot: -slot[3])[:5]
                held[h] = [held[h][0], *sorted(middle, key=lambda slot: slot[0]), *held[h][-2:]]
                recompressions += h == 0
        check(k_c, score)
    assert recompressions == 2 and bool((bias == 0).all())


def test_h2o_compiled_equals_the_eager_reference_with_its_sums_carried():
    """Recompress(H2O) compiled on a padded batch: the store keeps the
    running sums (prompt column sums, then every decode query's attention)
    and holds the same keys and sums as the eager reference through several
    recompressions, with one decode graph."""
    policy = kvfx.Recompress(kvfx.H2O(budget=0.5, sinks=2, window=4), every=4, target=16)
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    compiled = generate(model, ids, policy=policy, steps=12, attention_mask=mask)
    with eager_reference(model, policy) as reference:
        expected = generate(model, ids, steps=12, attention_mask=mask)
    assert compiled.graph_breaks == 0 and torch.equal(compiled.tokens, expected.tokens)
    assert cache_lengths(compiled.cache) == [19] * model.config.num_hidden_layers
    for layer, (got, want) in enumerate(zip(compiled.cache.layers, expected.cache.layers)):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
        _, _, bias, sums = got.dense()
        want_bias, want_sums = reference.state[layer]
        assert torch.equal(bias, want_bias)
        real = torch.isfinite(bias)
        torch.testing.assert_close(sums[real], want_sums[real], rtol=1e-5, atol=1e-5)
        # 40 prompt queries and 12 decode queries over 2 query heads a KV head: sums well past one query's
        assert float(sums[real].mean()) > 1.0
    longer = generate(model, ids, policy=policy, steps=30, attention_mask=mask)
    assert len(longer.records) == len(compiled.records)


def shared_keep_by_hand(k, bias, sinks, window, safeguard, n):
    """One batch row, heads holding their own slots (AdaKV's keep over KNorm's
    score): each head keeps its sinks and window, and its floor(n x
    safeguard) best slots counting those first (as kvpress's AdaKVPress,
    whose window scores rank first); the lowest key norms across the heads
    fill heads x n in all. Each head's kept slots, in order."""
    heads = k.shape[0]
    real = [[i for i in range(k.shape[1]) if bias[h, i] != NEG_INF] for h in range(heads)]
    norm = lambda h, i: k[h, i].norm().item()  # noqa: E731
    kept = []
    for h in range(heads):
        always = set(real[h][:sinks]) | set(real[h][len(real[h]) - window:])
        rest = sorted((i for i in real[h] if i not in always), key=lambda i: (norm(h, i), i))
        kept.append(always | set(rest[:max(0, int(n * safeguard) - len(always))]))
    # the rest: every head's remaining slots ranked together (ties: head, then position)
    pool = sorted(((norm(h, i), h, i) for h in range(heads) for i in real[h] if i not in kept[h]))
    for _, h, i in pool[:max(0, heads * n - sum(map(len, kept)))]:
        kept[h].add(i)
    return [sorted(s) for s in kept]


def test_a_shared_budget_recompression_keeps_the_best_slots_across_the_heads():
    """AdaKV's keep over rows of different lengths (invalid slots anywhere,
    this call's token last): each head keeps its sinks, window and safeguard
    share, the best slots across the heads fill Hkv x target per batch row,
    and each head's kept slots come first, in order."""
    torch.manual_seed(3)
    b, kv_heads, s, d = 2, 3, 20, 8
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    k[0, 1] *= 3                                # a head whose keys all rank low: it keeps fewer
    bias = torch.zeros(b, kv_heads, s)
    bias[0, 0, 14:19] = NEG_INF                 # rows of different lengths (their ends invalid),
    bias[0, 2, 17:19] = NEG_INF
    bias[1, 1, [0, 5, 6, 12]] = NEG_INF         # and a padded row's fillers anywhere
    knorm = kvfx.Compose(kvfx.KNorm(budget=0.5, sinks=1, window=2), keep_rule=kvfx.TopTokensAcrossHeads(safeguard=0.5))
    policy = kvfx.Recompress(knorm, every=4, target=8)
    assert policy.ragged_rows
    q = torch.randn(b, 6, 1, d)
    width = 12                                  # the mean a head holds, due at target + every
    k2, v2, bias2, score2 = policy.step_rows(q, k, v, bias, torch.zeros(b, kv_heads, s), 1.0, width)
    for row in range(b):
        want = shared_keep_by_hand(k[row], bias[row], 1, 2, 0.5, 8)
        lengths = torch.isfinite(bias2[row]).sum(-1).tolist()
        assert lengths == [len(w) for w in want] and sum(lengths) == kv_heads * 8
        for head in range(kv_heads):
            n = lengths[head]
            torch.testing.assert_close(k2[row, head, :n], k[row, head, want[head]])
            torch.testing.assert_close(v2[row, head, :n], v[row, head, want[head]])
            assert bool((bias2[row, head, n:] == NEG_INF).all()) and bool((bias2[row, head, :n] == 0).all())
    assert len(set(torch.isfinite(bias2[0]).sum(-1).tolist())) > 1   # the heads keep different counts
    assert int(torch.isfinite(bias2[0, 1]).sum()) == 4                 # the weak head: its safeguard, 8 x 0.5
    # not due: the rows come back as they were
    same = policy.step_rows(q, k, v, bias, torch.zeros(b, kv_heads, s), 1.0, width - 1)
    assert torch.equal(same[0], k) and torch.equal(same[2], bias)


def test_a_shared_budget_compiled_equals_the_eager_reference_and_frees_the_heads_slots():
    """Recompress(AdaKV) through several recompressions on a padded batch:
    one decode graph, the tokens and every head's kept keys of the eager
    reference, heads holding their own counts, and a store whose pages stay
    at the bound for Hkv x (target + every) slots per batch row."""
    policy = kvfx.Recompress(kvfx.AdaKV(budget=0.5, sinks=2, window=4), every=4, target=16)
    model, ids, mask, compiled, reference = padded_run(policy)
    kv_heads = model.config.num_key_value_heads
    ragged = False
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        lengths = got.lengths
        # 20 slots per head after the prompt, then 11 decode calls: 17 18 19 16 17 18 19 16 17 18 19
        assert int(lengths[0].sum()) == kv_heads * lengths_by_hand(20, 11, 4, 16)[-1]
        assert int(lengths[1].sum()) <= kv_heads * 19
        ragged |= len(set(lengths.flatten().tolist())) > 1
        for row in range(2):
            for head in range(kv_heads):
                n = int(lengths[row, head])
                torch.testing.assert_close(got.keys[row, head, :n], want.keys[row, head, :n], rtol=0, atol=1e-5)
        # pages for Hkv x (target + every) slots per batch row, each head wasting under a page
        assert got.k_pages.shape[0] == 2 * ((kv_heads * 20 + kv_heads * (got.page - 1)) // got.page)
    assert ragged
    longer = generate(model, ids, policy=policy, steps=30, attention_mask=mask)
    assert len(longer.records) == len(compiled.records)   # more recompressions compile nothing new
    assert [layer.nbytes() for layer in longer.cache.layers] == [layer.nbytes() for layer in compiled.cache.layers]


def test_a_shared_budget_is_refused_under_tensor_parallelism():
    from kvfx.distributed import TensorParallel

    with pytest.raises(ValueError, match="under tensor parallelism: a recompression whose budget the KV heads share"):
        TensorParallel(kvfx.Recompress(kvfx.AdaKV(budget=0.5, window=4), every=4, target=16), rank=0, world=2,
                       kv_heads=2)


@pytest.mark.parametrize("policy, says", [
    (kvfx.TOVA(budget=0.5), "already ranks slots at every decode step"),
    (kvfx.Recompress(kvfx.KNorm(budget=0.5), every=8, target=16), "already compresses again every 8 new tokens"),
    (kvfx.RazorAttention(budget=0.5), "Compensate"),
    (kvfx.Compose(kvfx.KNorm(budget=0.5), fold_rule=kvfx.GaussianMerge()), "GaussianMerge"),
    (kvfx.ChunkKV(budget=0.5, reuse_every=2), "reuses another layer's choice"),
])
def test_a_policy_it_cannot_rank_again_is_refused_saying_why(policy, says):
    with pytest.raises(ValueError, match=says):
        kvfx.Recompress(policy)


@pytest.mark.parametrize("field, value, allowed", [
    ("every", 0, "an int >= 1"), ("every", 2.5, "an int >= 1"), ("target", 5, "an int >= 6"),
])
def test_bad_input_names_the_field_and_the_allowed_range(field, value, allowed):
    with pytest.raises(ValueError, match=f"Recompress.{field}={value!r} is invalid: {field} must be {allowed}"):
        kvfx.Recompress(kvfx.SnapKV(sinks=2, window=4), **{field: value})


def test_it_parses_from_the_command_line_form():
    policy = kvfx.parse_policy("Recompress(KNorm(budget=0.4), every=16, target=128)")
    assert policy == kvfx.Recompress(kvfx.KNorm(budget=0.4), every=16, target=128)


@pytest.mark.parametrize("critical", [False, True], ids=["KNorm", "CriticalKV(KNorm)"])
def test_the_kept_keys_equal_kvpress_decoding_press_when_installed(critical):
    """KNorm at half the prompt, then compressed back to 16 slots every 4
    decode steps: kvpress's PrefillDecodingPress(KnormPress, DecodingPress)
    and kvfx's Recompress(KNorm) hold the same keys after each recompression
    (the same tokens fed to both; kvpress keeps them in score order, kvfx in
    position order). The same with CriticalKV's correction (CriticalKVPress),
    whose W_o kvfx lends to the decode step."""
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache

    def press(**kw):
        knorm = kvpress.KnormPress(**kw)
        return kvpress.CriticalKVPress(knorm) if critical else knorm

    model = tiny_model("llama")
    # No token twice: a repeated token's key has the same norm, and the two
    # sides break such a tie differently (kvfx: the earlier slot).
    tokens = 2 + torch.randperm(model.config.vocab_size - 2, generator=torch.Generator().manual_seed(2))[:40]
    ids, fed = tokens[None, :32], tokens[None, 32:]
    decoding = kvpress.PrefillDecodingPress(
        press(compression_ratio=0.5), kvpress.DecodingPress(press(), compression_interval=4, target_size=16))
    theirs = []
    with torch.no_grad(), decoding(model):
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for i in range(8):
            pos = torch.tensor([[32 + i]])
            model(input_ids=fed[:, i:i + 1], past_key_values=cache, use_cache=True, cache_position=pos[0],
                  position_ids=pos)
            if i % 4 == 3:
                theirs.append([layer.keys[0].clone() for layer in cache.layers])
    knorm = kvfx.KNorm(budget=0.5)
    kvfx.compile(model, kvfx.Recompress(kvfx.CriticalKV(knorm) if critical else knorm, every=4, target=16))
    ours = []
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            for i in range(8):
                cache = model(input_ids=fed[:, i:i + 1], past_key_values=cache, use_cache=True).past_key_values
                if i % 4 == 3:
                    ours.append([layer.keys[0].clone() for layer in cache.layers])
    finally:
        kvfx.restore(model)
    for mine, other in zip(ours, theirs):
        for k_ours, k_theirs in zip(mine, other):
            assert k_ours.shape == k_theirs.shape == (model.config.num_key_value_heads, 16, k_ours.shape[-1])
            for a, b in zip(k_ours, k_theirs):
                distance = torch.cdist(a, b)
                assert torch.equal(distance.argmin(-1).sort().values, torch.arange(16))   # one to one
                assert float(distance.min(-1).values.max()) < 1e-4
