"""KVzip: the prompt is fed again after an instruction to repeat it, in the
same prefill; each context slot scores the largest attention a query of that
reconstruction pays it; every layer's slots are ranked together and the
best ``budget`` kept, so layers and heads keep their own counts. The score
equals the model's own attention weights, the choice equals the paper's
written out by hand and kvpress's KVzipPress, and compiled kvfx equals the
eager reference on a padded batch; the prompt's own logits come back."""

import math

import pytest
import torch

import kvfx
from kvfx.integrations.transformers import output_cache
from kvfx.policies.kvzip import collecting, reconstruction_scores
from kvfx.testing import against_reference, assert_equivalent, generate
from kvfx.testing.handwritten import TinyGPT
from kvfx.testing.reference import eager_reference
from kvfx.testing.zoo import tiny_model

REPEAT = (5, 6, 7, 8)
PROMPT = 40


def scores_by_hand(q, k, valid, scale, context, unseen=()):   # q: [H, L, D], k: [Hkv, L, D], valid: [L]
    heads, length, _ = q.shape
    group = heads // k.shape[0]
    out = torch.full((k.shape[0], context), float("-inf"))
    for h in range(heads):
        for i in range(context, length):
            if not valid[i]:
                continue
            seen = [j for j in range(i + 1) if valid[j] and j not in unseen]
            weights = torch.softmax(torch.stack([q[h, i] @ k[h // group, j] * scale for j in seen]), 0)
            for w, j in zip(weights, seen):
                if j < context:
                    out[h // group, j] = max(out[h // group, j], w)
    for j in unseen:
        out[:, j] = 0.0
    return out


def test_the_score_is_the_largest_attention_a_reconstruction_query_pays():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 13, 8), torch.randn(2, 2, 13, 8)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :2] = False              # a left-padded row
    valid[1, 7:9] = False             # ... whose repeated prompt is padded too
    got = reconstruction_scores(q, k, valid, 0.4, 5)
    for b in range(2):
        torch.testing.assert_close(got[b], scores_by_hand(q[b], k[b], valid[b], 0.4, 5), rtol=1e-5, atol=1e-7)
    # Rows without padding take the fused kernel's log-sum-exp and the context's columns only.
    unpadded = reconstruction_scores(q[:1], k[:1], valid[:1], 0.4, 5)
    torch.testing.assert_close(unpadded[0], scores_by_hand(q[0], k[0], valid[0], 0.4, 5), rtol=1e-5, atol=1e-7)
    # A chat header of 3 tokens with 1 sink: its last 2 tokens are left out of the softmax and score 0.
    header = kvfx.KVzip(sinks=1, prefix=3, repeat=REPEAT).header(valid[:, :5])
    assert header.tolist() == [[False, True, True, False, False], [False, False, False, True, True]]
    got = reconstruction_scores(q, k, valid, 0.4, 5, header)
    for b, unseen in enumerate([(1, 2), (3, 4)]):
        torch.testing.assert_close(got[b], scores_by_hand(q[b], k[b], valid[b], 0.4, 5, unseen), rtol=1e-5,
                                   atol=1e-7)
    # Unpadded, the header's mass leaves each query's fused log-sum-exp instead.
    got = reconstruction_scores(q[:1], k[:1], valid[:1], 0.4, 5, header[:1])
    torch.testing.assert_close(got[0], scores_by_hand(q[0], k[0], valid[0], 0.4, 5, (1, 2)), rtol=1e-5, atol=1e-7)


def kept_by_hand(policy, scores, valid):                  # scores: {layer: [Hkv, S]}, valid: [S] (one row)
    entries = []
    real = valid.long().cumsum(0)
    for layer in sorted(scores):
        for h in range(scores[layer].shape[0]):
            for j in range(valid.shape[0]):
                if valid[j]:
                    sink = real[j] <= policy.sinks
                    entries.append((math.inf if sink else float(scores[layer][h, j]), layer, h, j))
    groups = [[e for e in entries if e[1] == layer] for layer in sorted(scores)] if policy.layerwise else [entries]
    kept = set()
    for group in groups:
        keep = math.ceil(policy.budget * len(group)) if isinstance(policy.budget, float) else \
            min(len(group), policy.budget * len({(e[1], e[2]) for e in group}))
        # best first; ties: earlier layer, head, position
        kept |= {e[1:] for e in sorted(group, key=lambda e: (-e[0], e[1], e[2], e[3]))[:keep]}
    return kept


@pytest.mark.parametrize("policy", [kvfx.KVzip(budget=0.3, repeat=REPEAT),
                                    kvfx.KVzip(budget=0.3, sinks=0, repeat=REPEAT, layerwise=True),
                                    kvfx.KVzip(budget=5, sinks=2, repeat=REPEAT)],
                         ids=["across-layers", "layerwise", "token-budget"])
def test_every_layers_slots_are_ranked_together_or_each_layers_alone(policy):
    torch.manual_seed(1)
    scores = {0: torch.rand(2, 3, 12), 2: torch.rand(2, 3, 12)}
    scores[2][0, 1, 4] = scores[0][0, 2, 6]          # a tie: the earlier layer wins
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    kept = policy.kept_slots(scores, valid)
    for b in range(2):
        want = kept_by_hand(policy, {l: s[b] for l, s in scores.items()}, valid[b])
        got = {(l, h, j) for l, m in kept.items() for h, j in zip(*torch.nonzero(m[b], as_tuple=True))}
        assert {(l, int(h), int(j)) for l, h, j in got} == want


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_compiled_equals_the_eager_reference_on_a_padded_batch(family):
    model = tiny_model(family)
    ids = torch.randint(2, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    policy = kvfx.KVzip(budget=0.3, repeat=REPEAT)
    compiled, reference = against_reference(model, ids, policy, steps=6, attention_mask=mask)
    assert "kvfx.store_attend" in compiled.records[-1].code_after     # rows of their own lengths
    for a, b in zip(compiled.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # Each (batch, KV head) row holds its own slots; a row's total is the budget of its real slots, plus the
    # tokens decoded (the last one is not cached yet).
    layers = compiled.cache.layers
    held = torch.stack([layer.lengths for layer in layers]).sum(dim=(0, 2))
    kv_heads = layers[0].lengths.shape[1]
    slots = len(layers) * kv_heads * torch.tensor([PROMPT, PROMPT - 7])
    decoded = len(layers) * kv_heads * 5
    assert held.tolist() == [math.ceil(0.3 * int(s)) + decoded for s in slots]
    assert len({int(n) for layer in layers for n in layer.lengths.flatten()}) > 1     # counts differ
    assert all(int(layer.seen) == PROMPT + 5 for layer in layers)


def test_an_unpadded_prompt_takes_the_fused_attentions_log_sum_exp_and_equals_the_reference():
    """No padding: the doubled prefill runs without a mask, its attention lends each query's log-sum-exp
    (kvfx::attention_lse), and a chat header is not repeated."""
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    policy = kvfx.KVzip(budget=0.3, repeat=REPEAT, prefix=3)
    compiled, reference = against_reference(model, ids, policy, steps=4)
    assert "kvfx.attention_lse" in compiled.records[0].code_after
    for a, b in zip(compiled.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_score_is_the_models_own_attention_and_the_prompts_logits_come_back():
    """Independent of kvfx's score function: the eager model's attention weights on
    [prompt, repeat, prompt] give the slots each head keeps; the compiled store holds
    exactly those keys, and the first token's logits are the prompt's."""
    model = tiny_model("llama", attn="eager")
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    doubled = torch.cat([ids, torch.tensor([REPEAT]), ids], dim=1)
    with torch.no_grad():
        full = model(doubled, output_attentions=True, use_cache=True)
        plain = model(ids).logits[:, -1]
    policy = kvfx.KVzip(budget=0.25, repeat=REPEAT)
    scores = {layer: a[:, :, PROMPT:, :PROMPT].unflatten(1, (model.config.num_key_value_heads, -1)).amax(dim=(2, 3))
              for layer, a in enumerate(full.attentions)}
    want = policy.kept_slots(scores, torch.ones(1, PROMPT, dtype=torch.bool))
    run = generate(model, ids, policy=policy, steps=2)
    torch.testing.assert_close(run.logits[0][:, :], plain, rtol=0, atol=1e-5)
    for layer, cached in enumerate(run.cache.layers):
        keys = output_cache(full).layers[layer].keys
        store_keys = cached.dense()[0]
        for h in range(store_keys.shape[1]):
            kept = torch.nonzero(want[layer][0, h]).flatten()
            torch.testing.assert_close(store_keys[0, h, :len(kept)], keys[0, h, kept], rtol=0, atol=1e-5)
            assert int(cached.lengths[0, h]) == len(kept) + 1              # + the first decoded token


def test_a_budget_above_the_prompt_keeps_everything_and_equals_eager():
    model = tiny_model("llama")
    assert_equivalent(model, torch.randint(2, model.config.vocab_size, (1, PROMPT)),
                      policy=kvfx.KVzip(budget=1.0, repeat=REPEAT), steps=8)


def test_the_store_holds_only_the_kept_slots():
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    run = generate(model, ids, policy=kvfx.KVzip(budget=0.2, repeat=REPEAT), steps=1)
    for layer in run.cache.layers:
        page = layer.k_pages.shape[1]
        assert layer.k_pages.shape[0] == int(((layer.lengths + page - 1) // page).sum())


class StubTokenizer:
    """One token per character; ``chat``: a template "<u>{message}</u><a>"."""

    def __init__(self, chat: bool) -> None:
        self.chat_template = "<u>...</u><a>" if chat else None

    def encode(self, text, add_special_tokens=False, return_tensors=None):
        ids = [2 + ord(c) % 90 for c in text]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kwargs):
        return f"<u>{messages[0]['content']}</u><a>"


def test_for_tokenizer_builds_kvpress_instruction_and_chat_header():
    plain, chat = StubTokenizer(chat=False), StubTokenizer(chat=True)
    policy = kvfx.KVzip.for_tokenizer(plain, budget=0.3)
    assert policy.repeat == tuple(plain.encode("\n\nRepeat the previous context exactly.\n"))
    assert policy.budget == 0.3 and policy.prefix == 0
    policy = kvfx.KVzip.for_tokenizer(chat)
    assert policy.repeat == tuple(chat.encode("\n\nRepeat the previous context exactly.</u><a>"))
    assert policy.prefix == len("<u>")
    assert kvfx.KVzip.for_tokenizer(chat, chat=False).prefix == 0


@pytest.mark.parametrize("field, value, allowed", [
    ("repeat", (), "a non-empty tuple of token ids"), ("repeat", [1, 2], "a non-empty tuple of token ids"),
    ("layerwise", 1, "True or False"), ("window", 4, "0"), ("prefix", -1, "an int >= 0"), ("budget", 1.5, r"a fraction of the prompt in \(0, 1\]"),
    ("sinks", -1, "an int >= 0")])
def test_bad_input_names_the_field_and_the_allowed_range(field, value, allowed):
    args = {"repeat": REPEAT, field: value}
    with pytest.raises(ValueError, match=rf"KVzip\.{field}=.*{allowed}"):
        kvfx.KVzip(**args)


def test_what_cannot_feed_the_prompt_twice_is_refused_saying_why():
    policy = kvfx.KVzip(repeat=REPEAT)
    with pytest.raises(ValueError, match="feeds the prompt a second time.*use kvfx.compile"):
        kvfx.backend(policy)
    with pytest.raises(ValueError, match="feeds the prompt a second time.*TinyGPT"):
        kvfx.compile(TinyGPT(), policy)
    for wrapped in (lambda: kvfx.Compose(policy), lambda: kvfx.ThinK(policy), lambda: kvfx.Recompress(policy),
                    lambda: kvfx.ChunkKV(scorer=policy)):
        with pytest.raises(ValueError, match="KVzip"):
            wrapped()
    model = tiny_model("llama")
    kvfx.compile(model, policy, inner="aot_eager")
    embeds = model.get_input_embeddings()(torch.randint(2, 100, (1, 12)))
    with pytest.raises(ValueError, match="feeds the prompt's token ids a second time; this prefill brings inputs_embeds"):
        model(inputs_embeds=embeds, use_cache=True)
    with pytest.raises(ValueError, match="output_attentions=True would return that call's"):
        model(torch.randint(2, 100, (1, 12)), use_cache=True, output_attentions=True)
    kvfx.restore(model)


@pytest.mark.parametrize("chat", [False, True], ids=["raw-prompt", "chat-header"])
def test_the_kept_slots_equal_kvpress_when_installed(monkeypatch, chat):
    """kvpress's KVzipPress (its default: every layer ranked together, 4 sinks)
    on the same tiny Llama and prompt, with a character tokenizer (with a chat
    template: the prompt starts with its header, which neither side repeats),
    masks exactly the slots kvfx drops."""
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache
    from kvpress.presses import kvzip_press

    tokenizer = StubTokenizer(chat)
    monkeypatch.setattr(kvzip_press.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: tokenizer))
    model = tiny_model("llama")
    ids = torch.randint(2, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    if chat:
        ids[0, :3] = torch.tensor(tokenizer.encode("<u>"))
    policy = kvfx.KVzip.for_tokenizer(tokenizer, budget=0.25)
    with eager_reference(model, policy) as reference:
        generate(model, ids, steps=1)
    press = kvpress.KVzipPress(compression_ratio=0.75)
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
    for layer, attn in enumerate(m.self_attn for m in model.model.layers):
        dropped = torch.zeros(1, model.config.num_key_value_heads, PROMPT, dtype=torch.bool)
        batch, head, position = attn.masked_key_indices
        dropped[batch, head, position] = True
        ours = reference.state[layer][0][..., :PROMPT] == float("-inf")
        assert torch.equal(ours, dropped), f"layer {layer}"


def test_scores_are_collected_only_inside_a_reconstruction_call():
    k = torch.randn(1, 2, 2 * 10 + len(REPEAT), 8)
    with pytest.raises(RuntimeError, match="outside a reconstruction call"):
        kvfx.KVzip(repeat=REPEAT).compress(torch.randn(1, 4, k.shape[2], 8), k, k, torch.ones(1, k.shape[2],
                                           dtype=torch.bool), 0.3)
    with collecting() as scores:
        out = kvfx.KVzip(repeat=REPEAT).compress(torch.randn(1, 4, k.shape[2], 8), k, k,
                                                 torch.ones(1, k.shape[2], dtype=torch.bool), 0.3, layer=3)
    assert list(scores) == [3] and scores[3].shape == (1, 2, 10) and out.k.shape[2] == 10


def test_a_model_with_layers_kvfx_leaves_alone_is_refused_before_the_prefill():
    """Gemma-3's sliding layers keep transformers' own cache: fed the prompt twice, they would hold the
    second copy's tokens."""
    model = tiny_model("gemma3")
    kvfx.compile(model, kvfx.KVzip(repeat=REPEAT), inner="aot_eager")
    with pytest.raises(ValueError, match=r"feeds the prompt twice through every layer, and layers 0 \(Dynamic"):
        model.generate(torch.randint(2, 100, (1, PROMPT)), attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
                       max_new_tokens=2, do_sample=False)
    kvfx.restore(model)
