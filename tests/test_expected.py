"""ExpectedAttention: the score equals the paper's algorithm written out by
hand with the model's own rotary embedding at the future positions (the
way kvpress computes it: the queries before RoPE from the attention's
q_proj, RoPE's cos and sin from its rotary_emb); the compiled rewrite finds
the queries before RoPE and the embedding in the graph and keeps exactly the
by-hand slots, including partial RoPE (Phi) and a query norm (Qwen3); a
padded row keeps what it keeps alone; a model whose queries are rotated in
a form kvfx does not read is left alone with what kvfx saw."""

import math

import pytest
import torch

import kvfx
from kvfx.policies.expected import expected_attention, future_rotation, rotary_embedding
from kvfx.testing import assert_equivalent, assert_padded_row_keeps_what_it_keeps_alone, generate
from kvfx.testing.reference import eager_reference, unrotated
from kvfx.testing.zoo import tiny_model

PROMPT, FUTURE, SINKS = 40, 64, 4


def mean_rotation_by_hand(model, length, future, dim):
    """kvpress's mean rotation: the model's rotary_emb at the next ``future``
    positions, cos I + sin P per position (P: rotate_half as a matrix),
    averaged; channels past the rotary ones unrotated."""
    x = torch.zeros(1, future, dim)
    cos, sin = model.model.rotary_emb(x, torch.arange(length, length + future)[None])   # [1, F, r]
    r = cos.shape[-1]
    turn = torch.zeros(r, r)
    turn[r // 2:, : r // 2], turn[: r // 2, r // 2:] = torch.eye(r // 2), -torch.eye(r // 2)
    rot = torch.eye(dim)
    rot[:r, :r] = (cos[0, :, :, None] * torch.eye(r) + sin[0, :, :, None] * turn).mean(0)
    return rot


def expected_by_hand(q, k, v, rot, scale, sinks):
    """q [H, S, D] before RoPE, k, v [Hkv, S, D] -> [Hkv, S], sinks +inf."""
    heads, length, d = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(k.shape[0], length)
    for h in range(heads):
        qs = q[h, sinks:]
        mu = qs.mean(0)
        cov = (qs - mu).T @ (qs - mu) / qs.shape[0]
        mu, cov = rot @ mu, rot @ cov @ rot.T
        keys = k[h // group, sinks:]
        logits = torch.stack([scale * (mu @ key) + scale * scale / 2 * (key @ cov @ key) for key in keys])
        out[h // group, sinks:] += logits.softmax(0) / group
    out = out * v.norm(dim=-1)
    out[:, :sinks] = math.inf
    return out


def keeping(seen, key):
    """A forward pre-hook that keeps the first hidden states it sees under ``key``."""
    def hook(module, args, kwargs):
        seen.setdefault(key, args[0] if args else kwargs["hidden_states"])
    return hook


def prompt_inputs(model, ids):
    """Per layer: the queries before RoPE [B, H, S, D] (the attention's own
    q_proj, and q_norm where it has one) and the full cache's k, v."""
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(keeping(seen, i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    for h in hooks:
        h.remove()
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hidden = seen[i]
        q = attn.q_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim)
        q = (attn.q_norm(q) if hasattr(attn, "q_norm") else q).transpose(1, 2)
        out.append((q.detach(), cache.layers[i].keys, cache.layers[i].values))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_the_fitted_rotation_equals_the_models_rotary_embedding_ahead(family):
    """The angles fitted from the prompt's cos and sin continue as the model's own RoPE."""
    model = tiny_model(family)
    dim = model.config.hidden_size // model.config.num_attention_heads
    x = torch.zeros(1, 300, dim)
    cos, sin = model.model.rotary_emb(x, torch.arange(300)[None])
    got = future_rotation(torch.stack((cos, sin))[:, :, None], torch.ones(1, 300, dtype=torch.bool), dim, FUTURE)
    torch.testing.assert_close(got[0], mean_rotation_by_hand(model, 300, FUTURE, dim), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi"])
def test_score_equals_the_algorithm_by_hand(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    q, k, v = prompt_inputs(model, ids)[0]
    cos, sin = model.model.rotary_emb(q, torch.arange(PROMPT)[None])
    valid = torch.ones(1, PROMPT, dtype=torch.bool)
    scale = q.shape[-1] ** -0.5
    got = expected_attention(q, k, v, valid, scale, future_rotation(torch.stack((cos, sin))[:, :, None], valid,
                                                                    q.shape[-1], FUTURE), SINKS)
    expect = expected_by_hand(q[0], k[0], v[0], mean_rotation_by_hand(model, PROMPT, FUTURE, q.shape[-1]), scale,
                              SINKS)
    torch.testing.assert_close(got[0, :, SINKS:], expect[:, SINKS:], rtol=1e-4, atol=1e-7)


def test_the_eager_reference_unrotates_the_queries():
    model = tiny_model("phi")                                      # partial RoPE: 8 of 16 channels
    q = torch.randn(2, 4, 10, 16)
    cos, sin = model.model.rotary_emb(q, torch.arange(10).expand(2, 10))
    r = cos.shape[-1]
    part = q[..., :r]
    rotated = torch.cat((part * cos[:, None] + torch.cat((-part[..., r // 2:], part[..., : r // 2]), -1)
                         * sin[:, None], q[..., r:]), -1)
    torch.testing.assert_close(unrotated(rotated, cos, sin), q, rtol=1e-5, atol=1e-5)


def rotation_by_basis(rope, dim, positions):
    """The mean over ``positions`` of the matrix that ``rope(x, p)`` applies
    to x's last dim, read off the basis vectors (row j of rope(I, p) is R_p e_j)."""
    eye = torch.eye(dim)
    return torch.stack([rope(eye, p).T for p in positions]).mean(0)


def gptj_case():
    """GPT-J: RoPE on [B, S, H, D], interleaved pairs, the first rotary_dim channels."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    model = tiny_model("gptj")
    attn, r = model.transformer.h[0].attn, model.config.rotary_dim
    table = model.transformer.rotary_emb.embed_positions

    def rope(x, p):
        sin, cos = table[p][None, None].split(r // 2, -1)                  # [1, 1, r/2]
        turned = apply_rotary_pos_emb(x[None, None, :, :r], sin, cos)[0, 0]
        return torch.cat((turned, x[:, r:]), -1)

    def queries(hidden):
        return attn.q_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    return model, attn, rope, queries


def complex_rope(x, pos, base=10000.0):
    """Meta's reference RoPE: channel pairs (2i, 2i + 1) as complex numbers times freqs_cis."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.polar(torch.ones(len(pos), d // 2), pos[:, None].float() * inv)[None, None]
    turned = torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs)
    return turned.flatten(3).type_as(x)


def gpt_oss_case():
    """gpt-oss: the written-out half-split form over torch.chunk halves, YaRN-scaled RoPE."""
    from transformers.models.gpt_oss.modeling_gpt_oss import _apply_rotary_emb

    model = tiny_model("gpt_oss", attn="eager")
    attn = model.model.layers[1].self_attn                # layer 0 slides: its cache is bounded, left as is

    def rope(x, p):
        cos, sin = model.model.rotary_emb(x[None], torch.tensor([[p]]))          # [1, 1, D/2], attention factor in
        return _apply_rotary_emb(x[None], cos, sin)[0]

    def queries(hidden):
        return attn.q_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    return model, attn, rope, queries


def gallery_case(name):
    """The hand-written gallery's own half-split RoPE (written out, cos and sin half as wide),
    or (meta-complex) Meta's complex form."""
    from kvfx.testing import gallery

    entry = gallery.GALLERY["meta-llama" if name == "meta-complex" else name]
    model = entry.model()
    attn = model.layers[0].attn if name != "nanogpt" else model.h[0].attn

    def rope(x, p):
        return gallery._rope(x[None, None], torch.tensor([p]))[0, 0] if name != "nanogpt" else x

    def queries(hidden):
        if name == "nanogpt":
            q = attn.c_attn(hidden)[..., : gallery.DIM]
        else:
            q = attn.wq(hidden) if name.startswith("meta") else attn.wqkv(hidden)[..., : gallery.DIM]
        return q.view(*hidden.shape[:2], gallery.HEADS, gallery.HEAD_DIM).transpose(1, 2)
    return entry, model, attn, rope, queries


@pytest.mark.parametrize("name", ["gptj", "gpt_oss", "meta-llama", "meta-complex", "gpt-fast", "nanogpt"])
def test_the_op_is_lent_the_queries_before_rope_and_where_rope_turns_them(name, monkeypatch):
    """Through the graph: the queries the score reads are the projection's
    (before RoPE), and the rotation it carries them by equals the model's own
    RoPE averaged over the next positions (GPT-J's interleaved partial form,
    gpt-oss's and the gallery's written-out half-split forms, Meta's complex
    form, none for nanoGPT)."""
    from kvfx.policies import expected
    from kvfx.testing import gallery

    if name == "meta-complex":
        monkeypatch.setattr(gallery, "_rope", complex_rope)

    lent = []
    score = expected.expected_attention
    monkeypatch.setattr(expected, "expected_attention",
                        lambda q, k, v, valid, scale, rotation, *a: lent.append((q, rotation)) or
                        score(q, k, v, valid, scale, rotation, *a))
    policy = kvfx.ExpectedAttention(budget=0.5, n_future_positions=FUTURE)
    seen = {}
    if name in ("gptj", "gpt_oss"):
        model, attn, rope, queries = gptj_case() if name == "gptj" else gpt_oss_case()
        ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
        hook = attn.register_forward_pre_hook(keeping(seen, "h"), with_kwargs=True)
        with torch.no_grad():
            model(ids)
        hook.remove()
        run = generate(model, ids, policy=policy, steps=1)
        dim = attn.head_dim
    else:
        entry, model, attn, rope, queries = gallery_case(name)
        ids = torch.randint(2, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        hook = attn.register_forward_pre_hook(keeping(seen, "h"), with_kwargs=True)
        entry.generate(model, ids, 1)
        hook.remove()
        run, backend = entry.run(ids, 1, policy)
        assert all(s.compressible for r in backend.records for s in r.sites)
        from kvfx.testing.gallery import HEAD_DIM as dim
    assert lent, "the score never ran"
    q, rotation = lent[0]                                                  # the first compressed layer's
    with torch.no_grad():
        torch.testing.assert_close(q, queries(seen["h"]), rtol=1e-5, atol=1e-5)
    expect = rotation_by_basis(rope, dim, range(PROMPT, PROMPT + FUTURE))
    torch.testing.assert_close(rotation[0], expect, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_compiled_keeps_the_by_hand_slots(family):
    policy = kvfx.ExpectedAttention(budget=0.3, n_future_positions=FUTURE)
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    run = generate(model, ids, policy=policy, steps=1)
    assert run.graph_breaks == 0
    n = math.ceil(0.3 * PROMPT)
    rot = mean_rotation_by_hand(model, PROMPT, FUTURE, model.config.hidden_size // model.config.num_attention_heads)
    for layer, (q, k, v) in enumerate(prompt_inputs(model, ids)):
        score = expected_by_hand(q[0], k[0], v[0], rot, q.shape[-1] ** -0.5, SINKS)
        index = torch.sort(score, descending=True, stable=True).indices[:, :n].sort().values[None, ..., None]
        got = run.cache.layers[layer]
        assert got.keys.shape[2] == n
        torch.testing.assert_close(got.keys, k.gather(2, index.expand(-1, -1, -1, k.shape[-1])), rtol=0, atol=1e-5)


def test_compiled_equals_the_eager_reference():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    policy = kvfx.ExpectedAttention(budget=0.4, n_future_positions=FUTURE)
    compiled = generate(model, ids, policy=policy, steps=6)
    with eager_reference(model, policy):
        reference = generate(model, ids, steps=6)
    assert compiled.graph_breaks == 0 and any(r.rewritten for r in compiled.records)
    assert torch.equal(compiled.tokens, reference.tokens)
    for got, want in zip(compiled.cache.layers, reference.cache.layers):
        assert got.keys.shape[2] == math.ceil(0.4 * PROMPT) + 5
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)


def test_a_padded_row_keeps_what_it_keeps_alone():
    """The statistics, sinks and future positions follow the row's real tokens."""
    policy = kvfx.ExpectedAttention(budget=0.3, n_future_positions=FUTURE)
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    assert_padded_row_keeps_what_it_keeps_alone(model, policy, ids, pad=10, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_budget_above_the_prompt_equals_eager(family):
    model = tiny_model(family)
    assert_equivalent(model, torch.randint(0, model.config.vocab_size, (1, PROMPT)),
                      policy=kvfx.ExpectedAttention(budget=1 << 20), steps=4)


def test_queries_without_rotary_embedding_use_the_identity():
    """GPT-2: the queries come straight from c_attn; the score is the by-hand one with R = I."""
    model = tiny_model("gpt2")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = model.transformer.h[0].attn.register_forward_pre_hook(keeping(seen, "h"), with_kwargs=True)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    hook.remove()
    attn = model.transformer.h[0].attn
    q = attn.c_attn(seen["h"])[..., : model.config.n_embd].view(1, PROMPT, -1, attn.head_dim).transpose(1, 2)
    k, v = cache.layers[0].keys, cache.layers[0].values
    run = generate(model, ids, policy=kvfx.ExpectedAttention(budget=0.3), steps=1)
    n = math.ceil(0.3 * PROMPT)
    score = expected_by_hand(q[0].detach(), k[0], v[0], torch.eye(q.shape[-1]), q.shape[-1] ** -0.5, SINKS)
    index = torch.sort(score, descending=True, stable=True).indices[:, :n].sort().values[None, ..., None]
    torch.testing.assert_close(run.cache.layers[0].keys, k.gather(2, index.expand(-1, -1, -1, k.shape[-1])),
                               rtol=0, atol=1e-5)


def test_another_position_form_is_left_alone_with_what_kvfx_saw(monkeypatch):
    """Queries that carry their positions some other way (here added, not rotated) are left alone."""
    from kvfx.testing import gallery

    monkeypatch.setattr(gallery, "_rope", lambda x, pos: x + 0.01 * pos[None, None, :, None].to(x.dtype))
    ids = torch.randint(2, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"ExpectedAttention reads the queries before their rotary embedding: its "
                                         r"queries reach attention through add \(at "):
        run, backend = gallery.GALLERY["meta-llama"].run(ids, 1, kvfx.ExpectedAttention(budget=0.3))
    assert not any(s.compressible for r in backend.records for s in r.sites)


def test_scoring_by_hand_without_the_rotary_embedding_says_how():
    k = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="rotary_embedding"):
        kvfx.ExpectedAttention().compress(torch.randn(1, 4, 12, 8), k, k, torch.ones(1, 12, dtype=torch.bool), 0.3)
    with rotary_embedding(None):                                    # unrotated queries: runs
        out = kvfx.ExpectedAttention(budget=6).compress(torch.randn(1, 4, 12, 8), k, k,
                                                        torch.ones(1, 12, dtype=torch.bool), 0.3)
    assert out.k.shape[2] == 6


def test_recompress_refuses_it():
    with pytest.raises(ValueError, match=r"Recompress.policy=ExpectedAttention.*no rotary embedding"):
        kvfx.Recompress(kvfx.ExpectedAttention(), every=8, target=16)


def test_equals_kvpress_when_installed():
    kvpress = pytest.importorskip("kvpress")
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(3))
    q, k, v = prompt_inputs(model, ids)[0]
    seen = {}
    attn = model.model.layers[0].self_attn
    hook = attn.register_forward_pre_hook(keeping(seen, "h"), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    hook.remove()
    attn.rotary_emb = model.model.rotary_emb                       # what kvpress's pipeline attaches
    theirs = kvpress.ExpectedAttentionPress(compression_ratio=0.5).score(attn, seen["h"], k, v, None, {}).float()
    cos, sin = model.model.rotary_emb(q, torch.arange(300)[None])
    valid = torch.ones(1, 300, dtype=torch.bool)
    ours = expected_attention(q, k, v, valid, q.shape[-1] ** -0.5,
                              future_rotation(torch.stack((cos, sin))[:, :, None], valid, q.shape[-1], 512), 4)
    torch.testing.assert_close(ours[..., 4:], theirs[..., 4:], rtol=1e-4, atol=1e-7)
