"""kvfx's slot store (kvfx.store) and the transformers cache layer that holds
it (kvfx.integrations.transformers_store): pages hold exactly the kept slots
of each (batch, KV head) row, decode writes in place, and compiled kvfx over
the store equals the eager reference for every preset."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import kvfx
from kvfx import store as slot_store
from kvfx.integrations.transformers import cache_bytes
from kvfx.integrations.transformers_store import CapacityError, KvfxLayer
from kvfx.kernels.paged_attention import paged_attention_reference
from kvfx.testing import generate
from kvfx.testing.reference import eager_reference
from kvfx.testing.zoo import tiny_model

NEG_INF = float("-inf")


def ragged_store(page=4):
    torch.manual_seed(0)
    b, hkv, w, d = 2, 3, 21, 4
    k, v = torch.randn(b, hkv, w, d), torch.randn(b, hkv, w, d)
    bias, score = torch.randn(b, hkv, w), torch.randn(b, hkv, w)
    lengths = torch.tensor([[21, 5, 9], [1, 16, 17]])
    pages = int(slot_store.cdiv(lengths, page).sum())
    store = slot_store.pack(k, v, bias, score, lengths, pages, slot_store.cdiv(21, page), page)
    return store, (k, v, bias, score, lengths)


def rows_of(store, width):
    """Each row's valid slots, from the store's rectangles."""
    k, v, bias, score = slot_store.gather(store, width)
    lengths = store.lengths
    return [[(k[b, h, :n], v[b, h, :n], bias[b, h, :n], score[b, h, :n]) for h, n in enumerate(row.tolist())]
            for b, row in enumerate(lengths)]


# -- the store ----------------------------------------------------------------------

def test_pack_keeps_each_rows_own_slots_and_nothing_else():
    store, (k, v, bias, score, lengths) = ragged_store()
    assert store.k_pages.shape[0] == int(slot_store.cdiv(lengths, 4).sum())   # 6+2+3 + 1+4+5 pages, no longest-row padding
    for b, row in enumerate(rows_of(store, 21)):
        for h, (kk, vv, bb, ss) in enumerate(row):
            n = lengths[b, h]
            assert torch.equal(kk, k[b, h, :n]) and torch.equal(vv, v[b, h, :n])
            assert torch.equal(bb, bias[b, h, :n]) and torch.equal(ss, score[b, h, :n])
    _, _, gathered_bias, _ = slot_store.gather(store, 21)
    assert (gathered_bias[0, 1, 5:] == NEG_INF).all(), "slots past a row's length are invisible"


def test_store_bytes_are_the_kept_slots_plus_less_than_a_page_per_row():
    store, (k, v, *_, lengths) = ragged_store(page=4)
    per_slot = 2 * k.shape[-1] * k.element_size() + 8          # K, V, bias and score
    slots = store.k_pages.shape[0] * 4
    assert lengths.sum() <= slots < lengths.sum() + lengths.numel() * 4
    tables = sum(t.numel() * t.element_size() for t in (store.page_table, store.lengths, store.pages, store.seen))
    assert store.nbytes() == slots * per_slot + tables


def test_append_writes_after_each_row_in_place_and_grow_keeps_every_slot():
    store, (k, *_, lengths) = ragged_store()
    grown = slot_store.grow(store, 2)
    assert torch.equal(grown.pages, store.pages + 2)
    new = torch.randn(2, 3, 3, 4)
    pool = grown.k_pages
    slot_store.append(grown, new, new)
    assert grown.k_pages is pool, "append writes into the existing pages"
    assert torch.equal(grown.lengths, lengths + 3) and int(grown.seen) == 3
    for b, row in enumerate(rows_of(grown, 24)):
        for h, (kk, _, bb, _) in enumerate(row):
            n = lengths[b, h]
            assert torch.equal(kk[:n], k[b, h, :n]) and torch.equal(kk[n:], new[b, h])
            assert (bb[n:] == 0).all()


def test_select_rows_copies_each_chosen_rows_pages():
    store, _ = ragged_store()
    grown = slot_store.grow(store, 1)
    picked = slot_store.select_rows(grown, torch.tensor([1, 1, 0]))
    assert picked.k_pages.shape[0] == int(grown.pages[[1, 1, 0]].sum())
    before, after = rows_of(grown, 21), rows_of(picked, 21)
    for src, dst in ((1, 0), (1, 1), (0, 2)):
        for (a, *_), (c, *_) in zip(before[src], after[dst]):
            assert torch.equal(a, c)
    slot_store.append(picked, torch.ones(3, 3, 1, 4), torch.ones(3, 3, 1, 4))
    assert torch.equal(rows_of(picked, 22)[1][0][0][:-1], before[1][0][0]), "rows copied from one row do not share pages"


def test_scatter_rewrites_every_row():
    store, _ = ragged_store()
    k = torch.randn(2, 3, 4, 4)
    slot_store.scatter(store, k, k, torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    assert (store.lengths == 4).all()
    got, _, bias, score = slot_store.gather(store, 4)
    assert torch.equal(got, k) and (bias == 0).all() and (score == 1).all()


def test_repack_rewrites_ragged_rows_in_place_within_the_pool_with_room_for_more():
    store, _ = ragged_store()
    pool, width = store.k_pages.shape[0], store.page_table.shape[2]
    torch.manual_seed(1)
    b, hkv, w, d = 2, 3, 12, 4
    k, v, score = torch.randn(b, hkv, w, d), torch.randn(b, hkv, w, d), torch.randn(b, hkv, w)
    lengths = torch.tensor([[3, 12, 7], [9, 0, 5]])
    bias = torch.zeros(b, hkv, w).masked_fill(torch.arange(w) >= lengths[..., None], NEG_INF)
    k_pages = store.k_pages
    slot_store.repack(store, k, v, bias, score, lengths, room=2)
    assert store.k_pages is k_pages and store.k_pages.shape[0] == pool and store.page_table.shape[2] == width
    assert store.lengths.tolist() == lengths.tolist()
    assert store.pages.tolist() == slot_store.cdiv(lengths + 2, store.page).tolist()    # room for 2 more each
    for row, held in zip(rows_of(store, w), zip(k, v, score, lengths)):
        for h, (kk, vv, bb, ss) in enumerate(row):
            n = int(held[3][h])
            assert torch.equal(kk, held[0][h, :n]) and torch.equal(vv, held[1][h, :n])
            assert torch.equal(ss, held[2][h, :n]) and bool((bb == 0).all())
    valid = torch.zeros_like(store.slot_bias, dtype=torch.bool).view(-1)
    valid[slot_store.flat_index(store, torch.arange(w).expand(b, hkv, w))
          [(torch.arange(w) < lengths[..., None]).reshape(-1)]] = True
    assert bool((store.slot_bias.view(-1)[~valid] == NEG_INF).all())   # every other slot of the pool: -inf


def test_add_scores_adds_at_each_rows_slots_and_leaves_every_other_slot_alone():
    """A row read past its pages reads another row's page through the table
    (entries past a row's pages name page 0): adding zero there changes nothing."""
    store, (_, _, _, score, lengths) = ragged_store()
    before = store.slot_score.clone()
    width = 21
    delta = torch.rand(2, 3, width).masked_fill(torch.arange(width) >= lengths[..., None], 0.0)
    slot_store.add_scores(store, width, delta)
    for row, held in zip(rows_of(store, width), zip(score, delta, lengths)):
        for h, (_, _, _, got) in enumerate(row):
            n = int(held[2][h])
            torch.testing.assert_close(got, held[0][h, :n] + held[1][h, :n])
    assert torch.equal(store.slot_score.view(-1)[store.slot_bias.view(-1) == NEG_INF],
                       before.view(-1)[store.slot_bias.view(-1) == NEG_INF])


def test_paged_attention_reference_attends_each_row_over_its_own_slots():
    store, (k, v, bias, _, lengths) = ragged_store()
    grown = slot_store.grow(store, 1)
    new = torch.randn(2, 3, 2, 4)
    slot_store.append(grown, new, new)
    q = torch.randn(2, 6, 2, 4)
    out = paged_attention_reference(q, grown.k_pages, grown.v_pages, grown.slot_bias, grown.page_table,
                                    grown.lengths, 0.5)
    for b in range(2):
        for h in range(3):
            n = lengths[b, h]
            kk, vv = torch.cat([k[b, h, :n], new[b, h]]), torch.cat([v[b, h, :n], new[b, h]])
            logits = q[b, 2 * h:2 * h + 2] @ kk.T * 0.5                               # [2 heads, 2 queries, n + 2]
            mask = torch.cat([bias[b, h, :n].expand(2, -1), torch.tensor([[0, NEG_INF], [0, 0]])], 1)
            torch.testing.assert_close(out[b, 2 * h:2 * h + 2], (logits + mask).softmax(-1) @ vv)


def test_attention_reads_a_store_of_equal_rows_in_place_and_any_page_order_alike():
    from kvfx.kernels.paged_attention.reference import page_rows

    torch.manual_seed(3)
    b, hkv, n, d = 2, 3, 37, 8
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    pages = slot_store.cdiv(n, 16)
    store = slot_store.pack(k, v, torch.zeros(b, hkv, n), None, torch.full((b, hkv), n), b * hkv * pages, pages, 16)
    store = slot_store.grow(store, 2)
    new = torch.randn(b, hkv, 1, d)
    slot_store.append(store, new, new)
    (keys,) = page_rows(store.page_table, slot_store.cdiv(n + 1, 16), store.k_pages)
    assert keys.untyped_storage().data_ptr() == store.k_pages.untyped_storage().data_ptr(), "a view, not a copy"
    q = torch.randn(b, 2 * hkv, 1, d)
    args = (store.slot_bias, store.page_table, store.lengths, 0.3)
    in_place = paged_attention_reference(q, store.k_pages, store.v_pages, *args)
    # the same slots with the pages shuffled in the pool: read through the page table, the same attention
    perm = torch.randperm(store.k_pages.shape[0])
    moved = [torch.empty_like(x).index_copy_(0, perm, x) for x in (store.k_pages, store.v_pages, store.slot_bias)]
    gathered = paged_attention_reference(q, moved[0], moved[1], moved[2], perm[store.page_table], store.lengths, 0.3)
    torch.testing.assert_close(in_place, gathered, rtol=0, atol=1e-6)
    full_k, full_v = torch.cat([k, new], 2), torch.cat([v, new], 2)
    want = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(in_place, want, rtol=1e-5, atol=1e-5)


# -- compiled kvfx over the store = the eager reference ----------------------------------

POLICIES = {
    "StreamingLLM": kvfx.StreamingLLM(budget=0.5, sinks=2),
    "SnapKV": kvfx.SnapKV(budget=0.5, window=4),
    "KNorm": kvfx.KNorm(budget=0.5),
    "H2O": kvfx.H2O(budget=0.5, window=4),
    "TOVA": kvfx.TOVA(budget=0.5),
    "PyramidKV": kvfx.PyramidKV(budget=0.4, window=4),
    "AdaKV": kvfx.AdaKV(budget=0.35, window=4),
    "KVMerger": kvfx.KVMerger(budget=0.5, exempt_layers=(), count_bias=True),
    "ChunkKV": kvfx.ChunkKV(budget=0.5, window=4, chunk=4, reuse_every=2),
    "RazorAttention": kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((0, 1), (1, 0))),
    "ZeroMerge": kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
}
STEPS = 64


def padded_batch(length=30):
    ids = torch.randint(2, 100, (3, length))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def assert_same_run(compiled, reference, atol=1e-5):
    assert torch.equal(compiled.tokens, reference.tokens)
    for step, (a, b) in enumerate(zip(compiled.logits, reference.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"decode step {step}: {m}")


# Every preset under SDPA; under eager attention CI runs one of each fold (KVFX_SLOW=1 runs all).
EAGER_IN_CI = {"StreamingLLM", "KVMerger", "RazorAttention", "ZeroMerge", "TOVA"}


@pytest.mark.parametrize("name,attn", [
    pytest.param(name, attn, id=f"{name}-{attn}",
                 marks=[pytest.mark.slow] if attn == "eager" and name not in EAGER_IN_CI else [])
    for attn in ("sdpa", "eager") for name in POLICIES])
def test_compiled_store_equals_eager_reference_over_64_decode_steps_on_a_padded_batch(name, attn):
    policy = POLICIES[name]
    model = tiny_model("llama", attn=attn)
    ids, mask = padded_batch()
    if not policy.supports_padding:      # ChunkKV's chunks start at a row's first token: unpadded rows
        mask = torch.ones_like(ids)
    compiled = generate(model, ids, attention_mask=mask, policy=policy, steps=STEPS + 1)
    with eager_reference(model, policy):
        reference = generate(model, ids, attention_mask=mask, steps=STEPS + 1)
    assert_same_run(compiled, reference)
    assert len(compiled.records) <= 2 and compiled.graph_breaks == 0, "one prefill graph and one decode graph"
    layers = compiled.cache.layers
    assert all(isinstance(layer, KvfxLayer) for layer in layers)
    assert all(int(layer.seen) == 30 + STEPS for layer in layers)


@pytest.mark.parametrize("name", ["RazorAttention", "AdaKV", "PyramidKV", "ZeroMerge"])
def test_compiled_store_equals_eager_reference_with_repeated_kv_heads(name):
    """Qwen2 repeats K/V for its query heads (expand + reshape) instead of enable_gqa."""
    policy = POLICIES[name]
    model = tiny_model("qwen2")
    ids, mask = padded_batch()
    compiled = generate(model, ids, attention_mask=mask, policy=policy, steps=17)
    with eager_reference(model, policy):
        reference = generate(model, ids, attention_mask=mask, steps=17)
    assert_same_run(compiled, reference)


def row_lengths(run):
    return [layer.lengths.tolist() for layer in run.cache.layers]


def test_per_head_budgets_hold_each_heads_own_slots():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    razor = kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((0, 1), (1, 0)))
    run = generate(model, ids, policy=razor, steps=3)
    n = razor.budget_length(40) + 2                      # sinks + window + compensation, then 2 decode tokens
    assert row_lengths(run) == [[[n, 42]], [[42, n]]], "retrieval heads keep all 40 + 2, the others their budget"
    ada = kvfx.AdaKV(budget=0.35, window=4)
    run = generate(model, ids, policy=ada, steps=1)
    for layer in run.cache.layers:
        assert layer.lengths.sum() == 2 * ada.budget_length(40), "the layer's heads share 2 x budget slots"


def test_layers_of_different_lengths_need_no_fallback_with_eager_attention_and_padding():
    model = tiny_model("llama", attn="eager")
    policy = kvfx.PyramidKV(budget=0.3, window=4)
    ids, mask = padded_batch()
    run = generate(model, ids, attention_mask=mask, policy=policy, steps=5)
    first, last = (layer.lengths.max().item() for layer in run.cache.layers)
    assert first > last, "PyramidKV's layers hold different lengths"
    with eager_reference(model, policy):
        reference = generate(model, ids, attention_mask=mask, steps=5)
    assert_same_run(run, reference)


def test_a_multi_token_step_on_uneven_layers_is_one_call():
    model = tiny_model("llama")
    policy = kvfx.PyramidKV(budget=0.3, window=4)
    ids = torch.randint(2, 100, (1, 30))
    follow = torch.randint(2, 100, (1, 5))
    kvfx.compile(model, policy, inner="aot_eager")
    try:
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            lengths = [layer.lengths.clone() for layer in cache.layers]
            out = model(follow, cache=cache, use_cache=True)
    finally:
        kvfx.restore(model)
    assert out.logits.shape[1] == 5
    assert [torch.equal(layer.lengths, n + 5) for layer, n in zip(cache.layers, lengths)] == [True, True]
    with eager_reference(model, policy), torch.no_grad():
        ref_cache = model(ids, use_cache=True).past_key_values
        # the reference's cache is shorter than the tokens it saw: give it the positions
        ref = model(follow, cache=ref_cache, use_cache=True, position_ids=torch.arange(30, 35)[None])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_static_cache_generate_compresses_and_equals_the_reference():
    model = tiny_model("llama")
    policy = kvfx.SnapKV(budget=0.3, window=4)
    ids, mask = padded_batch()
    kvfx.compile(model, policy, inner="aot_eager", page_size=4)        # small pages: a tiny cache
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                 cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    finally:
        kvfx.restore(model)
    cache = out.past_key_values
    assert type(cache).__name__ == "StaticCache" and all(isinstance(layer, KvfxLayer) for layer in cache.layers)
    kept, room = policy.budget_length(30), cache.layers[0].max_length - 30       # max_cache_len = 30 + 20 - 1
    for layer in cache.layers:
        assert (layer.lengths == kept + 19).all()
        # born exact, then grown once to the static cache's length: 9 + 19 slots, in pages
        assert (layer.pages == slot_store.cdiv(kept, 4) + slot_store.cdiv(room, 4)).all()
    # what the static cache's buffers would hold: 2 layers x 3 rows x 2 KV heads x 49 slots of K and V (dim 16, fp32)
    static = 2 * 3 * 2 * (30 + room) * 16 * 2 * 4
    assert cache_bytes(cache) < static
    with eager_reference(model, policy):
        reference = generate(model, ids, attention_mask=mask, steps=20)
    assert torch.equal(out.sequences, reference.tokens)
    for a, b in zip(out.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_200_decode_steps_compile_two_graphs_and_never_recompile():
    model = tiny_model("llama")
    counters.clear()
    ids = torch.randint(2, 100, (1, 24))
    run = generate(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), steps=201)
    layer = run.cache.layers[0]
    grown = layer.pages[0, 0].item() - slot_store.cdiv(12, 16)
    assert grown > 3, f"the store grew {grown} page(s) per row: this test needs several growths"
    assert len(run.records) == 2, f"{len(run.records)} graphs: one prefill, one decode expected"
    assert sum(counters["recompiles"].values()) == 0 and run.graph_breaks == 0


def test_decode_attention_reads_the_store_without_the_models_mask():
    model = tiny_model("llama")
    run = generate(model, torch.randint(2, 100, (1, 24)), policy=kvfx.SnapKV(budget=0.5, window=4), steps=2)
    decode = run.records[1].code_after
    # Equal rows on the CPU: the attention over the store is plain tensor code in the graph, as is the append.
    assert "paged_attention_uniform" in decode and "index_copy_" in decode
    assert "torch._C._nn.scaled_dot_product_attention" not in decode and "store_read" not in decode
    assert "kvfx.store_compress" in run.records[0].code_after and "store_mark" not in run.records[0].code_after
    # Rows of different lengths (AdaKV) read the store through kvfx's op.
    torch._dynamo.reset()
    run = generate(model, torch.randint(2, 100, (1, 24)), policy=kvfx.AdaKV(budget=0.5, window=4), steps=2)
    assert "kvfx.store_attend" in run.records[1].code_after
    assert "paged_attention_uniform" not in run.records[1].code_after


@pytest.mark.parametrize("policy", [kvfx.TOVA(budget=0.5), kvfx.ZeroMerge(budget=0.5, window=4)],
                         ids=["TOVA", "ZeroMerge"])
def test_under_inductor_a_continuous_step_is_in_the_graph_and_equals_the_eager_reference(policy):
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0   # a left-padded row: fillers among its slots, stepped per row
    run = generate(model, ids, policy=policy, inner="inductor", steps=12, attention_mask=mask)
    decode = run.records[1]
    assert [s.inline for s in decode.sites] == ["attention_and_step"] * 2
    assert "store_step" not in decode.code_after and run.graph_breaks == 0
    assert (run.cache.layers[0].lengths == policy.kept_length(40)).all()   # one slot out per token: constant
    with eager_reference(model, policy):
        reference = generate(model, ids, attention_mask=mask, steps=12)
    assert torch.equal(run.tokens, reference.tokens)
    for a, b in zip(run.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # aot_eager would copy the pages for the in-graph writes: the step stays kvfx's op there
    run = generate(model, ids, policy=policy, steps=2, attention_mask=mask)
    assert "kvfx.store_step" in run.records[1].code_after and "paged_attention_uniform" in run.records[1].code_after


@dataclasses.dataclass(frozen=True)
class _TwoPerToken(kvfx.TOVA):
    """TOVA removing two slots per new token: a step ``plan_step`` cannot plan."""

    def decode_length(self, total, new):
        return total - 2 * new


@pytest.mark.parametrize("policy", [kvfx.TOVA(budget=12), kvfx.ZeroMerge(budget=12, residual=2, window=3),
                                    _TwoPerToken(budget=12)], ids=["TOVA", "ZeroMerge", "two-per-token"])
def test_attention_and_step_equals_the_attention_then_the_ops_step(policy):
    """``kvfx.decode_step.attention_and_step`` (run eagerly here) returns the
    in-graph attention's output and leaves the store as ``kvfx::store_step``
    does after it; a step removing more than one slot falls back to the op."""
    from kvfx.decode_step import attention_and_step
    from kvfx.kernels.paged_attention.reference import paged_attention_uniform
    from kvfx.policies import key_of

    q, k, v, bias, score = _full_rows(policy, b=1)
    b, hkv, s, _ = k.shape
    stores = [slot_store.pack(k, v, bias, score, torch.full((b, hkv), s), b * hkv * 4, 4, 4) for _ in range(2)]
    extent, spec = torch.empty(0, s), key_of(policy)
    got = attention_and_step(q, *stores[0].tensors(), extent, hkv, 0.35, spec, 0, 1)
    want = paged_attention_uniform(q, *stores[1].tensors()[:3], hkv, 0.35)
    torch.ops.kvfx.store_step(q, *stores[1].tensors(), extent, spec, 0, 1, 0.35)
    torch.testing.assert_close(got, want)
    assert torch.equal(stores[0].lengths, stores[1].lengths)
    assert (stores[0].lengths == policy.decode_length(s, 1)).all()
    for x, y in zip(slot_store.dense(stores[0]), slot_store.dense(stores[1])):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_in_graph_decode_attention_equals_the_paged_reference():
    from kvfx.kernels.paged_attention.reference import paged_attention_reference, paged_attention_uniform
    from kvfx import store as slot_store

    torch.manual_seed(0)
    b, hkv, groups, d, page = 2, 2, 3, 8, 4
    k, v = torch.randn(b, hkv, 10, d), torch.randn(b, hkv, 10, d)
    bias = torch.zeros(b, hkv, 10).masked_fill(torch.rand(b, hkv, 10) < 0.2, float("-inf"))
    store = slot_store.pack(k, v, bias, None, torch.full((b, hkv), 10), b * hkv * 3, 3, page)
    store = slot_store.grow(store, 1)   # room past the rows' length: bias -inf, never attended
    slot_store.append(store, torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d))
    q = torch.randn(b, hkv * groups, 1, d)
    want = paged_attention_reference(q, store.k_pages, store.v_pages, store.slot_bias, store.page_table,
                                     store.lengths, 0.3)
    got = paged_attention_uniform(q, store.k_pages, store.v_pages, store.slot_bias, hkv, 0.3)
    torch.testing.assert_close(got, want)
    # A continuous step that shrinks the rows leaves -inf behind them, so the bias stays the whole mask.
    kept = slot_store.gather(store, 11)
    slot_store.scatter(store, *(x[:, :, :9] for x in kept), width=11)
    assert torch.isinf(slot_store.gather(store, 11)[2][:, :, 9:]).all()
    slot_store.append(store, torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d))   # the next step's token
    torch.testing.assert_close(
        paged_attention_uniform(q, store.k_pages, store.v_pages, store.slot_bias, hkv, 0.3),
        paged_attention_reference(q, store.k_pages, store.v_pages, store.slot_bias, store.page_table, store.lengths,
                                  0.3))


def _full_rows(policy, s=13, b=2, hkv=2, groups=2, d=8, seed=0):
    """Rows of s real slots after a decode step's append (the new token last, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    bias = torch.zeros(b, hkv, s)
    if isinstance(policy, kvfx.ZeroMerge):   # residual slots hold merged tokens: bias ln(count)
        bias[:, :, :policy.residual] = torch.randint(1, 6, (b, hkv, policy.residual), generator=g).float().log()
    score = torch.rand(b, hkv, s, generator=g)
    score[:, :, -1] = 0
    return torch.randn(b, hkv * groups, 1, d, generator=g), k, v, bias, score


def _step_in_store(policy, q, k, v, bias, score, page=4):
    """``Fold.plan_step`` applied to a store holding the rows (``kvfx.store.apply_step``);
    returns the store and the slots each row keeps."""
    b, hkv, s, _ = k.shape
    per_row = slot_store.cdiv(s, page)
    store = slot_store.pack(k, v, bias, score, torch.full((b, hkv), s), b * hkv * per_row, per_row, page)
    rows, old = slot_store.row_views(store, s), store.slot_score.clone()
    new = policy.step_score(q, rows[0], rows[2], rows[3], 0.35)
    plan = policy.fold().plan_step(policy, new, *rows[:3])
    slot_store.apply_step(store, s, new, plan)
    assert not torch.equal(store.slot_score, old)   # the running scores were written
    return store, policy.decode_length(s, 1)


@pytest.mark.parametrize("policy", [kvfx.TOVA(budget=12), kvfx.ZeroMerge(budget=12, residual=2, window=3)],
                         ids=["TOVA", "ZeroMerge"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "all-tied"])
def test_a_decode_step_written_into_the_store_equals_the_step_over_copies(policy, ties):
    q, k, v, bias, score = _full_rows(policy)
    if ties:   # a zero query attends uniformly: every slot ties, and the tie-break must match the sort's
        q.zero_()
        score.zero_()
    want = policy.step(q, k.clone(), v.clone(), bias.clone(), score.clone(), 0.35)
    store, kept = _step_in_store(policy, q, k, v, bias, score)
    assert kept == 12 == want[0].shape[2]
    rows = slot_store.gather(store, 13)
    for got, expected in zip(rows, want):
        assert torch.equal(got[:, :, :kept], expected)
    assert (rows[2][:, :, kept:] == NEG_INF).all()   # the freed slot is masked: the store's invariant
    if ties and isinstance(policy, kvfx.TOVA):       # the stable sort drops the last of equals: the new token
        assert torch.equal(rows[0][:, :, :kept], k[:, :, :kept])


@pytest.mark.parametrize("policy", [kvfx.TOVA(budget=12), kvfx.ZeroMerge(budget=12, residual=2, window=3),
                                    kvfx.TOVA(budget=0.5), kvfx.ZeroMerge(budget=0.5, residual=2, window=3)],
                         ids=["TOVA-keeps-every-real-slot", "ZeroMerge-drops-its-filler", "TOVA-evicts-a-real-slot",
                              "ZeroMerge-merges-a-real-slot"])
def test_a_padded_row_steps_in_the_store_as_the_step_over_copies_does(policy):
    q, k, v, bias, score = _full_rows(policy)
    filler = policy.residual if isinstance(policy, kvfx.ZeroMerge) else 0
    bias[0, 1, filler] = NEG_INF   # a left-padded row: a filler (bias -inf) among its slots
    want = policy.step(q, k.clone(), v.clone(), bias.clone(), score.clone(), 0.35)
    store, kept = _step_in_store(policy, q, k, v, bias, score)
    assert kept == 12
    rows = slot_store.gather(store, 12)
    for got, expected in zip(rows, want):
        assert torch.equal(got, expected)
    fillers = (rows[2][0, 1] == NEG_INF).sum().item()
    # An integer budget of 12 holds the row's 12 real tokens: the filler goes. A fraction
    # budget removes one slot per step from every row: the padded row loses a real one too.
    assert fillers == (0 if isinstance(policy.budget, int) else 1)


def test_one_eviction_moves_one_slot_into_the_hole_and_keeps_the_tail_in_order():
    from kvfx.policies.fold import StepPlan, drop_index

    # rows of 8 slots, the last 3 a tail (ZeroMerge's window); slot 4 is the last top slot
    drop = torch.tensor([[[1], [4], [3]]])
    index = drop_index(drop, 8, 4)
    assert index.tolist() == [[[0, 4, 2, 3, 5, 6, 7], [0, 1, 2, 3, 5, 6, 7], [0, 1, 2, 4, 5, 6, 7]]]
    k = torch.arange(8.).expand(1, 3, 8)[..., None].expand(-1, -1, -1, 2)
    store = slot_store.pack(k, k, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.full((1, 3), 8), 6, 2, 4)
    score = torch.arange(8.).expand(1, 3, 8)
    slot_store.apply_step(store, 8, score, StepPlan(drop, 4))
    keys, values, bias, kept_score = slot_store.gather(store, 8)
    assert torch.equal(kept_score[..., :7], index.float()) and torch.equal(keys[..., :7, 0], index.float())
    assert torch.equal(values, keys)
    assert (bias[..., 7] == NEG_INF).all() and (kept_score[..., 7] == 0).all()


@pytest.mark.parametrize("last", [4, 7], ids=["a-tail-after-last", "last-is-the-newest"])
def test_apply_step_writes_every_hole_and_a_merge_as_the_gather_over_copies(last):
    """Each row drops another slot, the hole at ``last`` included (the
    graduating tail token or TOVA's new token evicted), while slot 0 takes a
    merged slot (``StepPlan.write``): the store equals the write then the
    ``drop_index`` gather over copies, with the freed last slot masked."""
    from kvfx.policies.fold import StepPlan, drop_index

    s, rows, d = 8, last, 2
    drop = torch.arange(1, last + 1).view(1, rows, 1)
    k = (torch.arange(s * rows, dtype=torch.float32).view(1, rows, s, 1) + torch.tensor([0., 0.5])).contiguous()
    v, bias, score = -k, torch.rand(1, rows, s), torch.rand(1, rows, s)
    store = slot_store.pack(k, v, bias, score, torch.full((1, rows), s), rows * 2, 2, 4)
    write = (torch.zeros_like(drop), torch.full((1, rows, 1, d), -7.), torch.full((1, rows, 1, d), 7.),
             torch.full((1, rows, 1), 2.), torch.full((1, rows, 1), 9.))
    slot_store.apply_step(store, s, score, StepPlan(drop, last, write))
    want = [x.clone() for x in (k, v, bias, score)]
    for x, new in zip(want, write[1:]):
        x[:, :, :1] = new
    index = drop_index(drop, s, last)
    got = slot_store.gather(store, s)
    for x, y in zip(got[:2], want[:2]):
        assert torch.equal(x[:, :, :s - 1], y.gather(2, index[..., None].expand(-1, -1, -1, d)))
    for x, y in zip(got[2:], want[2:]):
        assert torch.equal(x[:, :, :s - 1], y.gather(2, index))
    assert (got[2][..., s - 1] == NEG_INF).all() and (got[3][..., s - 1] == 0).all()


def test_one_eviction_in_place_on_a_single_row():
    """One batch row and one KV head (Gemma-3's 1 KV head at batch 1): a single dense row."""
    from kvfx.policies.fold import StepPlan

    k = torch.arange(8.).view(1, 1, 8, 1).expand(-1, -1, -1, 2)
    store = slot_store.pack(k, k, torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.full((1, 1), 8), 2, 2, 4)
    slot_store.apply_step(store, 8, torch.arange(8.).view(1, 1, 8), StepPlan(torch.tensor([[[2]]]), 7))
    keys, _, bias, score = slot_store.gather(store, 8)
    assert keys[0, 0, :7, 0].tolist() == [0, 1, 7, 3, 4, 5, 6] and score[0, 0, :7].tolist() == [0, 1, 7, 3, 4, 5, 6]
    assert bias[0, 0, 7] == NEG_INF


@pytest.mark.parametrize("policy", [kvfx.TOVA(budget=12), kvfx.ZeroMerge(budget=12, residual=2, window=3)],
                         ids=["TOVA", "ZeroMerge"])
def test_the_store_step_runs_in_place_on_full_rows_and_over_copies_otherwise(policy):
    from kvfx.ops import store_step
    from kvfx.policies import key_of

    q, k, v, bias, score = _full_rows(policy)
    b, hkv, s, d = k.shape

    def run(bias):
        store = slot_store.pack(k, v, bias, score, torch.full((b, hkv), s), b * hkv * 4, 4, 4)
        store_step(q, store.k_pages, store.v_pages, store.slot_bias, store.slot_score, store.page_table,
                   store.lengths, store.pages, store.seen, torch.empty(b, s), key_of(policy), 0, 1, 0.35)
        return store

    want = policy.step(q, k, v, bias, score, 0.35)
    store = run(bias)
    assert (store.lengths == 12).all()
    got = slot_store.gather(store, s)
    for x, expected in zip(got, want):
        assert torch.equal(x[:, :, :12], expected)
    assert (got[2][:, :, 12:] == NEG_INF).all()
    # A left-padded row holds a filler (bias -inf): the step over copies, which handles it per row.
    padded = bias.clone()
    padded[0, 1, policy.residual if isinstance(policy, kvfx.ZeroMerge) else 0] = NEG_INF
    store = run(padded)
    rows = slot_store.gather(slot_store.pack(k, v, padded, score, torch.full((b, hkv), s), b * hkv * 4, 4, 4), s)
    for x, expected in zip(slot_store.gather(store, 12), policy.step(q, *rows, 0.35)):
        assert torch.equal(x, expected)
    if isinstance(policy, kvfx.TOVA):   # that row drops its filler and keeps every real slot, the newest in its place
        assert torch.equal(slot_store.gather(store, 12)[0][0, 1], torch.cat([k[0, 1, -1:], k[0, 1, 1:-1]]))


# -- edits, limits, bad input ------------------------------------------------------------

def test_beam_search_follows_rows_and_equals_the_reference():
    model = tiny_model("llama")
    policy = kvfx.SnapKV(budget=0.5, window=4)
    ids = torch.randint(2, 100, (2, 24))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=0)
    kvfx.compile(model, policy, inner="aot_eager")
    try:
        with torch.no_grad():
            beams = model.generate(ids, **kwargs)
    finally:
        kvfx.restore(model)
    with eager_reference(model, policy), torch.no_grad():
        reference = model.generate(ids, **kwargs)
    assert torch.equal(beams, reference)


def test_a_compressed_layer_refuses_crop_edits_and_calls_outside_the_graph():
    model = tiny_model("llama")
    run = generate(model, torch.randint(2, 100, (1, 24)), policy=kvfx.SnapKV(budget=0.5, window=4), steps=2)
    cache = run.cache
    with pytest.raises(ValueError, match="crop"):
        cache.crop(-1)
    with pytest.raises(AttributeError, match="slot store"):
        cache.layers[0].keys = torch.zeros(1)
    with pytest.raises(RuntimeError, match="outside the kvfx-compiled graph"), torch.no_grad():
        model(torch.tensor([[5]]), cache=cache, use_cache=True)   # the model's own forward


def prefill_bytes(model, ids, **compile_kwargs):
    kvfx.compile(model, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager", **compile_kwargs)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return cache, cache_bytes(cache)


def test_a_store_over_max_cache_bytes_is_refused_before_it_grows():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 24))
    try:
        _, held = prefill_bytes(model, ids)
        kvfx.restore(model)
        torch._dynamo.reset()
        cap = held + 100                                  # the prompt's store fits, a page more does not
        cache, again = prefill_bytes(model, ids, max_cache_bytes=cap)
        assert again == held
        with pytest.raises(CapacityError, match=rf"max_cache_bytes={cap:,} would be exceeded"), torch.no_grad():
            model(torch.tensor([[5]]), cache=cache, use_cache=True)
    finally:
        kvfx.restore(model)
    assert cache_bytes(cache) == held, "nothing was allocated"


def test_a_prompt_whose_store_would_exceed_max_cache_bytes_is_refused_before_the_prefill():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 64))
    try:
        _, held = prefill_bytes(model, ids)
        assert held == 2 * slot_store.prefill_bytes(kvfx.SnapKV(budget=0.5, window=4), 64, 0, 2, 1, 2, 2 * 16 * 4)
        kvfx.restore(model)
        torch._dynamo.reset()
        kvfx.compile(model, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager", max_cache_bytes=held - 1)
        with pytest.raises(CapacityError, match=rf"keeps {held:,} bytes of a 64-token prompt"), torch.no_grad():
            model(ids, use_cache=True)
        assert model._kvfx_backend.records == [], "refused before anything was traced or allocated"
    finally:
        kvfx.restore(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(page_size=0), r"page_size=0 is invalid: page_size must be an int >= 1"),
    (dict(max_cache_bytes=-5), r"max_cache_bytes=-5 is invalid"),
])
def test_compile_rejects_bad_store_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvfx.compile(tiny_model("llama"), kvfx.SnapKV(), **kwargs)
