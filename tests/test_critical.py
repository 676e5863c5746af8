"""CriticalKV: any policy's score weighed by what each value does to the
layer's output (||v W_o||_1), in two stages. The score equals the paper's
algorithm written out by hand; the compiled rewrite finds W_o in the graph
(transformers' o_proj, GPT-2's Conv1D, a hand-written block's nn.Linear) and
equals the eager reference; a model whose attention output meets no linear
layer is left alone with what kvfx saw there."""

import copy
import math

import pytest
import torch
from torch import nn

import kvfx
from kvfx.policies.scores import out_projection, projected_value_norm
from kvfx.testing import against_reference, assert_equivalent, cache_lengths, generate
from kvfx.testing.handwritten import TinyGPT, _rope
from kvfx.testing.zoo import tiny_model

PROMPT, STEPS = 40, 4


def value_norm_by_hand(v, weight):            # v: [Hkv, S, D], weight: [hidden, H * D]
    kv_heads, length, d = v.shape
    group = weight.shape[1] // d // kv_heads
    out = torch.zeros(kv_heads, length)
    for kv in range(kv_heads):
        for g in range(group):
            w = weight[:, (kv * group + g) * d:(kv * group + g + 1) * d]      # query head kv * group + g
            for j in range(length):
                out[kv, j] += (w @ v[kv, j]).abs().sum() / group
    return out


def test_the_value_norm_is_the_l1_norm_through_each_heads_output_slice():
    torch.manual_seed(0)
    v, weight = torch.randn(2, 2, 9, 4), torch.randn(16, 4 * 4)               # 4 query heads over 2 KV heads
    got = projected_value_norm(v, weight)
    for b in range(2):
        torch.testing.assert_close(got[b], value_norm_by_hand(v[b], weight), rtol=1e-5, atol=1e-5)


def test_the_score_takes_the_policys_best_first_then_weighs_the_rest_by_the_value_norm():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    weight, valid = torch.randn(24, 32), torch.ones(1, 30, dtype=torch.bool)
    snap = kvfx.SnapKV(budget=0.4, window=4)
    critical = kvfx.CriticalKV(snap, epsilon=1e-3, first_stage=0.5)
    with out_projection(weight):
        got = critical._score(q, k, valid, 0.3, v)
    base = snap._score(q, k, valid, 0.3)
    first = math.floor(math.ceil(0.4 * 30) * 0.5)                           # half the 12 kept slots
    for h in range(2):
        expect = (base[0, h] + 1e-3) * value_norm_by_hand(v[0], weight)[h]
        ranked = base[0, h].clone()
        ranked[-4:] = math.inf                                              # the window ranks first
        for i in sorted(range(30), key=lambda i: -ranked[i])[:first]:
            expect[i] = torch.finfo(torch.float32).max
        torch.testing.assert_close(got[0, h], expect, rtol=1e-5, atol=1e-6)


def test_first_stage_one_is_the_policy_itself_and_zero_weighs_every_slot():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    weight, valid = torch.randn(24, 32), torch.ones(1, 30, dtype=torch.bool)
    snap = kvfx.SnapKV(budget=0.4, window=4)
    with out_projection(weight):
        whole = kvfx.CriticalKV(snap, first_stage=1.0).select(q, k, valid, 0.3, v=v)
        weighed = kvfx.CriticalKV(snap, first_stage=0.0)._score(q, k, valid, 0.3, v)
    assert torch.equal(whole, snap.select(q, k, valid, 0.3))
    torch.testing.assert_close(weighed, (snap._score(q, k, valid, 0.3) + 1e-4) * projected_value_norm(v, weight))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_compiled_equals_the_eager_reference(family):
    """llama/qwen2: o_proj (nn.Linear, GQA); gpt2: c_proj, a Conv1D whose addmm weight is [H x D, hidden]."""
    model = tiny_model(family)
    policy = kvfx.CriticalKV(kvfx.SnapKV(budget=0.3, window=4))
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    compiled, reference = against_reference(model, ids, policy, steps=STEPS)
    assert cache_lengths(compiled.cache) == [12 + STEPS - 1] * model.config.num_hidden_layers
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
    # W_o changes what is kept: the plain policy keeps other slots somewhere.
    plain = generate(model, ids, policy=policy.policy, steps=1)
    assert any(not torch.equal(a.keys, b.keys[:, :, :12]) for a, b in zip(plain.cache.layers, compiled.cache.layers))


def prefill_qkv(model, ids):
    """Each block's prompt queries (with rotary positions), keys and values."""
    seen = {}
    hooks = [b.q.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        _, past = model(ids)
    for h in hooks:
        h.remove()
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    block = model.blocks[0]
    return [(_rope(seen[i].view(b, s, block.h, block.d).transpose(1, 2), pos), *past[i])
            for i in range(len(model.blocks))]


def assert_keeps_what_the_policy_keeps_by_hand(model, weight_of):
    """Compile ``model`` (a TinyGPT) for CriticalKV(SnapKV) and check each layer keeps the slots the
    policy selects from its prompt q, k, v with ``weight_of(block)`` lent as W_o."""
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    policy = kvfx.CriticalKV(kvfx.SnapKV(budget=0.3, window=4))
    full = prefill_qkv(model, ids)
    kvfx.compile(model, policy, inner="aot_eager")
    with torch.no_grad():
        _, past = model(ids)
    valid = torch.ones(1, PROMPT, dtype=torch.bool)
    for layer, ((q, k, v), (k_c, _)) in enumerate(zip(full, past)):
        block = model.blocks[layer]
        with out_projection(weight_of(block)):
            index = policy.select(q, k, valid, block.d ** -0.5, layer, len(full), v=v)
        assert k_c.shape[2] == 12
        torch.testing.assert_close(k_c, k.gather(2, index[..., None].expand(-1, -1, -1, k.shape[-1])),
                                   rtol=0, atol=1e-5)


def test_a_handwritten_blocks_linear_output_projection_is_found():
    torch.manual_seed(3)
    assert_keeps_what_the_policy_keeps_by_hand(TinyGPT().eval(), lambda block: block.o.weight)


class EinsumOut(nn.Module):
    """An output projection applied per head by einsum: no linear layer over merged heads."""

    def __init__(self, heads: int, d: int, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(heads, d, dim) / dim ** 0.5)

    def forward(self, x):
        return torch.einsum("bshd,hdo->bso", x.unflatten(-1, (self.w.shape[0], -1)), self.w)


class MatmulOut(nn.Module):
    """FalconLinear's form: x @ W.T with W [hidden, H x Dv], or x @ W with W [H x Dv, hidden]."""

    def __init__(self, dim: int, transposed: bool) -> None:
        super().__init__()
        self.w, self.transposed = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5), transposed

    def forward(self, x):
        return x @ self.w if self.transposed else x @ self.w.T


@pytest.mark.parametrize("transposed", [False, True], ids=["x@W.T", "x@W"])
def test_a_matmul_by_a_parameter_is_an_output_projection_too(transposed):
    torch.manual_seed(3)
    model = TinyGPT().eval()
    for block in model.blocks:
        block.o = MatmulOut(64, transposed)
    assert_keeps_what_the_policy_keeps_by_hand(model, lambda block: block.o.w.T if transposed else block.o.w)


def test_no_linear_after_the_attention_leaves_the_model_alone_saying_what_reads_it():
    model = TinyGPT().eval()
    for block in model.blocks:
        block.o = EinsumOut(block.h, block.d, 64)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(ids)
    with pytest.warns(UserWarning, match=r"CriticalKV weighs values by the attention's output projection: the "
                                         r"attention output is read by unflatten"):
        kvfx.compile(model, kvfx.CriticalKV(kvfx.SnapKV(budget=0.3)), inner="aot_eager")
        with torch.no_grad():
            got, past = model(ids)
    assert [k.shape[2] for k, _ in past] == [PROMPT, PROMPT]                 # nothing evicted
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("policy", [kvfx.CriticalKV(kvfx.SnapKV(budget=0.3)), kvfx.CUR(budget=0.3)],
                         ids=["CriticalKV", "CUR"])
def test_a_latent_cache_is_left_alone_by_a_value_score_saying_why(policy):
    """MLA's cache holds one latent for every head: a score of per-head values is refused up front, not mid-run."""
    model = tiny_model("deepseek_v3")
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"scores the values per KV head; this cache holds one latent"):
        run = generate(model, ids, policy=policy, steps=2)
    assert cache_lengths(run.cache) == [PROMPT + 1] * model.config.num_hidden_layers


def test_a_budget_above_the_prompt_equals_eager():
    model = tiny_model("llama")
    assert_equivalent(model, torch.randint(0, model.config.vocab_size, (1, PROMPT)),
                      policy=kvfx.CriticalKV(kvfx.SnapKV(budget=1 << 20)), steps=STEPS)


def test_it_wraps_any_one_shot_policy_and_its_plan():
    pyramid = kvfx.CriticalKV(kvfx.PyramidKV(budget=0.5, window=4, beta=2.0))
    assert [pyramid.budget_length(40, layer, 4) for layer in range(4)] == \
        [pyramid.policy.budget_length(40, layer, 4) for layer in range(4)]
    merged = kvfx.CriticalKV(kvfx.SnapKV(budget=0.3), fold_rule=kvfx.Compensate())
    composed = kvfx.Compose(kvfx.SnapKV(budget=0.3), fold_rule=kvfx.Compensate())
    assert merged.budget_length(40) == composed.budget_length(40)
    chunk = kvfx.ChunkKV(budget=0.5, scorer=kvfx.CriticalKV(kvfx.KNorm()))
    assert chunk.needs_out_projection and chunk.needs_values and not chunk.needs_queries


@pytest.mark.parametrize("field, value, allowed", [
    ("epsilon", -1.0, "a finite number >= 0"), ("first_stage", 1.5, r"a fraction in \[0, 1\]"),
    ("policy", kvfx.TOVA(), "compresses the prompt once"), ("policy", "SnapKV", "a kvfx policy")])
def test_bad_input_names_the_field_and_the_allowed_range(field, value, allowed):
    args = {"policy": kvfx.SnapKV(), field: value}
    with pytest.raises(ValueError, match=rf"CriticalKV\.{field}=.*{allowed}"):
        kvfx.CriticalKV(**args)


def test_without_a_lent_projection_it_says_so():
    k = torch.randn(1, 2, 20, 8)
    with pytest.raises(ValueError, match="output projection and got none"):
        kvfx.CriticalKV(kvfx.KNorm()).compress(None, k, k.clone(), torch.ones(1, 20, dtype=torch.bool), 0.3)


def test_the_value_norm_equals_kvpress_when_installed():
    kvpress = pytest.importorskip("kvpress")
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    values = torch.randn(1, model.config.num_key_value_heads, 30, attn.head_dim)
    torch.testing.assert_close(projected_value_norm(values, attn.o_proj.weight),
                               kvpress.CriticalKVPress.vwl1norm(values, attn), rtol=1e-5, atol=1e-5)


def test_snapkv_and_its_critical_score_equal_kvpress_when_installed():
    """The same attention, keys and values give kvpress's scores: SnapKV's is
    the window's mean attention (so CriticalKV's epsilon weighs the same), and
    CriticalKV(SnapKV) puts the same first stage at the top and the same
    (score + epsilon) x ||v W_o||_1 below it."""
    kvpress = pytest.importorskip("kvpress")
    from types import SimpleNamespace
    torch.manual_seed(5)
    b, h, kv_heads, s, d, window = 1, 4, 2, 128, 16, 32
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    logits = q @ k.repeat_interleave(h // kv_heads, dim=1).transpose(-1, -2) * d**-0.5
    attentions = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o_proj = nn.Linear(h * d, 48, bias=False)
    module = SimpleNamespace(config=SimpleNamespace(num_attention_heads=h, head_dim=d, hidden_size=48),
                             num_key_value_groups=h // kv_heads, o_proj=o_proj)
    hidden, valid = torch.zeros(b, s, 48), torch.ones(b, s, dtype=torch.bool)
    snap = kvpress.SnapKVPress(compression_ratio=0.5, window_size=window, kernel_size=5)
    ours = kvfx.SnapKV(budget=0.5, window=window, kernel=5).score(q, k, valid, d**-0.5)
    theirs = snap.score(module, hidden, k, v, attentions, {})
    torch.testing.assert_close(ours[..., :-window], theirs[..., :-window], rtol=1e-5, atol=1e-7)

    critical = kvpress.CriticalKVPress(snap)
    theirs = critical.score(module, hidden, k, v, attentions, {})
    with out_projection(o_proj.weight.detach()):
        ours = kvfx.CriticalKV(kvfx.SnapKV(budget=0.5, window=window, kernel=5))._score(q, k, valid, d**-0.5, v)
    top = torch.finfo(torch.float32).max
    assert torch.equal(ours == top, theirs == top) and int((ours == top).sum()) == b * kv_heads * 32
    rest = ours != top
    torch.testing.assert_close(ours[rest], theirs[rest], rtol=1e-5, atol=1e-9)


def test_a_recompression_of_a_returned_cache_is_lent_w_o_too():
    """Recompress(CriticalKV(KNorm)) on a hand-written block whose cache is a
    returned tuple (kvfx::step): each decode call returns the policy's step,
    by hand with the block's W_o, over the cache the call was given and its
    token's keys and values; two of the eight calls recompress."""
    torch.manual_seed(3)
    model = TinyGPT().eval()
    eager = copy.deepcopy(model)
    policy = kvfx.Recompress(kvfx.CriticalKV(kvfx.KNorm(budget=0.5)), every=4, target=8)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    kvfx.compile(model, policy, inner="aot_eager")
    recompressed = 0
    try:
        with torch.no_grad():
            _, past = model(ids)
            assert past[0][0].shape[2] == 8
            for step in range(8):
                token, pos = torch.tensor([[step + 3]]), torch.tensor([[16 + step]])
                _, given = eager(token, past, position_ids=pos)   # the cache the call's step ranks
                _, past = model(token, past, position_ids=pos)
                for block, (k, v), (k_c, v_c) in zip(model.blocks, given, past):
                    zeros = torch.zeros(k.shape[:3])
                    with out_projection(block.o.weight):
                        k_w, v_w, _, _ = policy.step(torch.zeros(1, block.h, 1, block.d), k, v, zeros, zeros,
                                                     block.d ** -0.5)
                    torch.testing.assert_close(k_c, k_w, rtol=0, atol=1e-5)
                    torch.testing.assert_close(v_c, v_w, rtol=0, atol=1e-5)
                recompressed += past[0][0].shape[2] < given[0][0].shape[2]
    finally:
        kvfx.restore(model)
    assert recompressed == 2
