"""The hand-written gallery (kvfx.testing.gallery): each model written the way
its upstream project writes it, compressed by kvfx or left alone with the form
kvfx saw named."""

import warnings

import pytest
import torch

import kvfx
from kvfx.testing import no_compression
from kvfx.testing.gallery import DIM, GALLERY, HEAD_DIM, HEADS, AlibiAttention, BmmAttention, MetaLlamaAttention, \
    NanoGPTAttention, TupleCacheLM, gpt_fast_loop

PROMPT, STEPS = 24, 8
COMPRESSED = ["nanogpt", "bmm", "sinks", "latent", "alibi", "gpt-fast", "meta-llama"]
LEFT_ALONE = {  # entry, policy -> what the reason must name
    ("gpt-fast", "TOVA"): "TOVA ranks slots at every decode step; kvfx runs continuous policies on returned caches "
                          "and slot stores, not on module buffers yet",
    ("alibi", "TOVA"): "the per-head position bias (ALiBi) is corrected once, when TOVA compresses the prompt; TOVA "
                       "ranks slots at every decode step",
    # Recompress is continuous too, and the reason says what it does while decoding
    ("gpt-fast", "Recompress"): "Recompress compresses again every 8 new tokens; kvfx runs continuous policies on "
                                "returned caches and slot stores, not on module buffers yet",
    # heads that hold their own counts while decoding need kvfx's slot store
    ("nanogpt", "Recompress(AdaKV)"): "Recompress compresses again every 8 new tokens with a budget its KV heads "
                                      "share, so they hold different counts: kvfx runs that on its slot store only, "
                                      "not on a cache the model keeps itself (dynamic)",
}
LEFT_ALONE_POLICIES = {"TOVA": lambda: kvfx.TOVA(budget=0.5),
                       "Recompress": lambda: kvfx.Recompress(kvfx.KNorm(budget=0.5), every=8, target=16),
                       "Recompress(AdaKV)": lambda: kvfx.Recompress(kvfx.AdaKV(budget=0.5, window=4), every=8,
                                                                    target=16)}


def ids():
    return torch.randint(2, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def run(name, policy=None, how="compile"):
    return GALLERY[name].run(ids(), STEPS, policy, how)


def assert_same(got, expected, atol=1e-4):
    assert torch.equal(got.tokens, expected.tokens), f"tokens differ:\n{got.tokens}\n{expected.tokens}"
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"step {step}: logits differ by {diff:.3g}"


@pytest.mark.parametrize("how", ["compile", "backend"])
@pytest.mark.parametrize("name", COMPRESSED)
def test_budget_above_the_prompt_equals_eager(name, how):
    compiled, be = run(name, no_compression(), how)
    assert_same(compiled, run(name)[0])
    sites = [s for r in be.records for s in r.sites]
    assert sites and all(s.compressible for s in sites), [s.reason for s in sites]
    assert {s.phase for s in sites} == {"prefill", "decode"}


class _PositionedAlibi(AlibiAttention):
    """The ALiBi block's eager reference after eviction: the bias reads each
    cached key's original position (kept beside it in the cache), which is
    what a compressed ALiBi cache must reproduce."""

    def forward(self, x, pos, past):
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, S, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        key_pos = pos
        if past is not None:
            k, v, key_pos = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), torch.cat([past[2], pos])
        alibi = self.slopes.view(1, HEADS, 1, 1) * (key_pos - pos[-1]).view(1, 1, 1, -1)
        scores = q.matmul(k.transpose(-1, -2)) * HEAD_DIM ** -0.5 + alibi
        scores = scores.masked_fill(key_pos.view(1, -1) > pos.view(-1, 1), float("-inf")).softmax(-1)
        return self.out_proj(scores.matmul(v).transpose(1, 2).reshape(B, S, DIM)), (k, v, key_pos)


class _EvictingMetaAttention(MetaLlamaAttention):
    """Meta's attention whose decode steps (no mask) do not see the evicted
    prompt positions: the eager reference of a compressed Meta cache."""

    def forward(self, x, start_pos: int, pos, mask):
        if mask is None:
            mask = self.evicted[: start_pos + x.shape[1]]
        return super().forward(x, start_pos, pos, mask)


def _evict_by_hand(cache, keep):
    """Keep the prompt slots ``keep`` of every cache tensor [B, H, S, D]."""
    return [{n: t[:, :, keep] for n, t in layer.items()} if isinstance(layer, dict) else tuple(t[:, :, keep] for t in layer)
            for layer in cache]


@pytest.mark.parametrize("how", ["compile", "backend"])
@pytest.mark.parametrize("name", COMPRESSED)
def test_half_budget_shrinks_the_cache_and_equals_the_eager_reference(name, how):
    """StreamingLLM keeps the first 4 and the last 8 prompt slots: the eager
    reference applies that selection to the cache the model returned, then
    decodes with the model's own code."""
    policy = kvfx.StreamingLLM(budget=0.5, sinks=4)
    compiled, _ = run(name, policy, how)
    full, _ = run(name)
    assert compiled.cache_bytes <= 0.55 * full.cache_bytes, (compiled.cache_bytes, full.cache_bytes)

    entry = GALLERY[name]
    model = entry.model()
    keep = list(range(4)) + list(range(PROMPT - 8, PROMPT))
    prompt = ids()
    if name == "meta-llama":  # its buffers keep every slot: a mask hides the evicted ones from later tokens
        evicted = torch.zeros(PROMPT + STEPS + 1)
        evicted[[p for p in range(PROMPT) if p not in keep]] = float("-inf")
        for block in model.layers:
            block.attn.__class__ = _EvictingMetaAttention
            block.attn.evicted = evicted
        assert_same(compiled, entry.generate(model, prompt, STEPS))
        return
    if name == "gpt-fast":  # its buffers keep every slot: the mask hides the evicted ones from later tokens
        model.setup_caches(1, PROMPT + STEPS + 1)
        evicted = [p for p in range(PROMPT) if p not in keep]
        model.causal_mask[PROMPT:, evicted] = False
        reference = gpt_fast_loop(model, prompt, STEPS)
        assert_same(compiled, reference)
        return
    if name == "alibi":  # the bias must follow each kept key's original position
        for block in model.blocks:
            block.attn.__class__ = _PositionedAlibi
    with torch.no_grad():
        if name == "nanogpt":
            logits, past = model(prompt, None, torch.arange(PROMPT))
        else:
            logits, past = model(prompt, torch.arange(PROMPT))
        if name == "alibi":
            past = [(k[:, :, keep], v[:, :, keep], key_pos[keep]) for k, v, key_pos in past]
        else:
            past = _evict_by_hand(past, keep)
        tokens, all_logits = [prompt], [logits[:, -1]]
        for i in range(STEPS):
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            pos = torch.arange(PROMPT + i, PROMPT + i + 1)
            logits, past = model(nxt, past, pos) if name == "nanogpt" else model(nxt, pos, past)
            all_logits.append(logits[:, -1])
    reference = type(compiled)(torch.cat(tokens, dim=1), all_logits, 0)
    assert_same(compiled, reference)


@pytest.mark.parametrize("name,policy", sorted(LEFT_ALONE))
def test_left_alone_forms_name_what_kvfx_saw(name, policy, caplog):
    """Warning, TORCH_LOGS=+kvfx and explain carry the same reason; the model
    runs as it would without kvfx."""
    import logging

    why = LEFT_ALONE[name, policy]
    policy = LEFT_ALONE_POLICIES[policy]()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="kvfx"):
        warnings.simplefilter("always")
        compiled, be = run(name, policy)
    assert_same(compiled, run(name)[0])
    reasons = {s.reason for r in be.records for s in r.sites}
    assert reasons == {why}, reasons
    assert any(why in str(w.message) for w in caught)
    assert any(why in rec.getMessage() for rec in caplog.records)
    from kvfx.explain import Report

    rows = Report(policy, be.records, 0, 0).rows()
    assert rows and all(why in row[-1] for row in rows)


def test_a_cache_kept_nowhere_is_the_only_no_kv_cache():
    """The one form that reads "no KV cache": keys computed and dropped."""
    model = TupleCacheLM(BmmAttention).eval()

    def forward(ids):
        return model(ids, torch.arange(ids.shape[1]))[0]

    be = kvfx.backend(kvfx.SnapKV(), inner="aot_eager")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="no KV cache: the keys attention reads are neither returned"):
        torch.compile(forward, backend=be)(ids())


class _BranchingAttention(NanoGPTAttention):
    """nanoGPT's attention with data-dependent Python control flow between the
    cache write and the attention call (a graph break, as routing between
    attention experts makes)."""

    def forward(self, x, layer_past=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if layer_past is not None:
            k, v = torch.cat((layer_past[0], k), dim=-2), torch.cat((layer_past[1], v), dim=-2)
        if k.abs().sum() > 1e9:  # a tensor read in Python: dynamo breaks the graph here
            q = q * 1.0
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=layer_past is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), (k, v)


def test_a_graph_break_inside_attention_is_named_where_it_broke():
    model = GALLERY["nanogpt"].model()
    for block in model.h:
        block.attn.__class__ = _BranchingAttention
    expected = GALLERY["nanogpt"].generate(model, ids(), 2)
    torch._dynamo.reset()
    kvfx.compile(model, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = GALLERY["nanogpt"].generate(model, ids(), 2)
    assert_same(got, expected)
    split = [s.reason for r in model._kvfx_backend.records for s in r.sites]
    assert split and all(why.startswith("a graph break split this attention block from its cache write (dynamo "
                                        "broke the graph after c_attn, at test_gallery.py:") for why in split), split
    assert any("a graph break split this attention block" in str(w.message) for w in caught)


def test_a_per_query_head_bias_is_left_alone_and_a_cache_derived_one_is_not():
    """A bias that differs per query needs each slot's original position; one
    computed from the cached values is recomputed by the model from the kept
    slots (Doge's dynamic mask)."""
    from kvfx.passes.sites import find_sites

    def block(q, k_past, k_new, v_past, v_new, bias_of):
        k, v = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)
        s = q @ k.transpose(-1, -2) * 0.25 + bias_of(k, v)
        return (s.softmax(-1) @ v), k, v

    def shapes(q_len):
        return ([torch.randn(1, 4, q_len, 16)] + [torch.randn(1, 4, n, 16) for n in (5, q_len, 5, q_len)])

    per_query = lambda k, v: torch.arange(k.shape[2] * 4.0).view(1, 4, 1, -1).expand(1, 4, 3, -1) * 0.1  # noqa: E731
    from_values = lambda k, v: v.sum(-1)[:, :, None, :]  # noqa: E731
    for bias_of, why in ((per_query, "differs per head and per query"), (from_values, "")):
        sites = find_sites(_dynamo_graph(block, bias_of, shapes(3)))
        assert len(sites) == 1
        assert (why in sites[0].reason) if why else sites[0].compressible, sites[0].reason
        if not why:
            assert sites[0].bias_from == "cache"


def _dynamo_graph(block, bias_of, inputs):
    """The FX graph dynamo hands a backend for ``block``."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda *a: block(*a, bias_of), backend=keep)(*inputs)
    return graphs[0]


def test_tiled_kv_heads_read_the_right_head():
    """JetMoE's ``k.repeat(1, r, 1, 1)`` tiles KV heads (query head h reads KV
    head h % Hkv, where repeat_kv gives h // r): kvfx reorders the query heads
    for its ops and the output back. Sharp scores make a wrong pairing show."""
    torch.manual_seed(0)
    wq, wk, wv = (torch.randn(DIM, n) * 3 for n in (HEADS * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM))

    def step(x, past):
        q = (x @ wq).view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = ((x @ w).view(1, -1, 2, HEAD_DIM).transpose(1, 2) for w in (wk, wv))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out = F.scaled_dot_product_attention(q, k.repeat(1, HEADS // 2, 1, 1), v.repeat(1, HEADS // 2, 1, 1),
                                             is_causal=past is None)
        return out, (k, v)

    def run_steps(fn):
        x, past, outs = torch.randn(1, 12, DIM, generator=torch.Generator().manual_seed(0)), None, []
        for _ in range(3):
            out, past = fn(x, past)
            outs.append(out[:, :, -1])
            x = torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(len(outs)))
        return outs

    import torch.nn.functional as F  # noqa: N812

    be = kvfx.backend(no_compression(), inner="aot_eager")
    torch._dynamo.reset()
    got = run_steps(torch.compile(step, backend=be))
    for a, b in zip(got, run_steps(step)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    sites = [s for r in be.records for s in r.sites]
    assert sites and all(s.compressible and s.gqa == "tile" for s in sites), [(s.gqa, s.reason) for s in sites]


def compiled_capacities(model) -> set:
    """The store capacities the model's decode graphs were compiled for."""
    from kvfx.runtime import StatefulGraph

    return {caps for entry in model._kvfx_backend._rewritable if isinstance(entry.runner, StatefulGraph)
            for caps in entry.runner._by_capacity}


def test_gpt_fast_buffers_become_phantoms_whose_store_grows_a_few_times():
    """After the prompt the module's buffers hold one position each; the store
    behind them holds the kept slots plus an eighth, grows by doubling (one
    decode graph per capacity), and refuses to write past the positions the
    model's own buffer planned (and a multi-token write into it, which dynamo
    cannot trace, with kvfx's reason). A second generation on new buffers
    starts again from the prompt."""
    from kvfx import buffers

    entry = GALLERY["gpt-fast"]
    model = entry.model()
    torch._dynamo.reset()
    kvfx.compile(model, kvfx.StreamingLLM(budget=0.5, sinks=4), inner="aot_eager")
    runner_calls = []
    with torch.no_grad():
        for prompt_len, steps in ((24, 8), (40, 3)):
            prompt = torch.randint(2, 128, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
            model.setup_caches(1, prompt_len + steps)
            gpt_fast_loop(model, prompt, steps - 1)
            cache = model.layers[0].attn.kv_cache
            one_position = cache.k_cache.numel() // cache.k_cache.shape[2] * cache.k_cache.element_size()
            assert buffers.is_phantom(cache.k_cache) and cache.k_cache.untyped_storage().nbytes() == one_position
            state = buffers.state_of(cache.k_cache)
            kept = prompt_len // 2
            assert state.used == kept + steps - 1 and state.limit == kept + steps
            assert len(compiled_capacities(model)) <= 3
            model(torch.tensor([[5]]), torch.arange(prompt_len + steps - 1, prompt_len + steps))  # the last slot
            runner_calls.append(buffers.state_of(cache.k_cache).capacity)
            with pytest.raises(ValueError, match=r"is full: it planned .* setup_caches"):
                buffers.grow(cache.k_cache, 1)  # (the model's own mask stops a call past its buffer first)
    assert runner_calls == [12 + 8, 20 + 3]  # kept + an eighth at first, then doubled up to the limit
    sites = [s for r in model._kvfx_backend.records for s in r.sites]
    assert all(s.cache == "buffer" and s.compressible for s in sites), {(s.cache, s.reason) for s in sites}
    with pytest.raises(RuntimeError, match="writes several tokens into a cache buffer kvfx took over"):
        model(torch.tensor([[5, 6]]), torch.arange(10, 12))
