"""A zoo of tiny, randomly initialised transformers causal LMs.

Every model is built from a hand-written config (never ``from_pretrained``, so
nothing is ever downloaded) and is small enough to run a generate loop on CPU
in well under a second. The zoo is meant for exercising a torch.compile backend
across the attention / KV-cache variants found in the wild: GQA, sliding
windows, soft-capping, partial rotary, fused QKV, eager vs SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["ZooEntry", "ZOO", "tiny_model"]

# Shared sizes. Heads are 4 with 2 KV heads wherever the family supports GQA.
_VOCAB = 128
_HIDDEN = 64
_FFN = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_MAX_POS = 512
_WINDOW = 8  # small, so a ~24 token prompt overflows it

# Random weights + a real eos id would make greedy generate stop at random
# points, so no eos. pad 0 is fine: it only matters for padding the batch.
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None, use_cache=True)
_BOTH = ("sdpa", "eager")


@dataclass(frozen=True)
class ZooEntry:
    """One tiny model recipe."""

    name: str  # e.g. "llama", "mistral_sliding", "gemma2"
    family: str  # transformers model_type, e.g. "llama"
    attn_impls: tuple[str, ...]  # which of ("sdpa", "eager") the family supports
    sliding: bool  # some layers use a sliding-window cache
    make_config: Callable[[], PretrainedConfig]


def _llama() -> PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS, **_IDS,
    )


def _mistral(sliding_window: int | None) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return transformers.MistralConfig(
            vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
            num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
            num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
            sliding_window=sliding_window, **_IDS,
        )

    return make


def _qwen2() -> PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
        use_sliding_window=False, tie_word_embeddings=False, **_IDS,
    )


def _qwen3() -> PretrainedConfig:
    return transformers.Qwen3Config(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS,
        max_position_embeddings=_MAX_POS, use_sliding_window=False,
        tie_word_embeddings=False, **_IDS,
    )


def _gemma() -> PretrainedConfig:
    return transformers.GemmaConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS,
        max_position_embeddings=_MAX_POS, **_IDS,
    )


def _gemma2() -> PretrainedConfig:
    # Layer 0 sliding, layer 1 global; attn_logit_softcapping (50) and
    # final_logit_softcapping (30) are left at their defaults.
    return transformers.Gemma2Config(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS,
        query_pre_attn_scalar=_HIDDEN // _HEADS,
        max_position_embeddings=_MAX_POS, sliding_window=_WINDOW,
        layer_types=["sliding_attention", "full_attention"], **_IDS,
    )


def _gemma3() -> PretrainedConfig:
    # Text-only Gemma3 (Gemma3ForCausalLM): one sliding and one global layer.
    return transformers.Gemma3TextConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS,
        query_pre_attn_scalar=_HIDDEN // _HEADS,
        max_position_embeddings=_MAX_POS, sliding_window=_WINDOW,
        layer_types=["sliding_attention", "full_attention"], **_IDS,
    )


def _phi() -> PretrainedConfig:
    # Phi: partial rotary (default factor 0.5), dense layer-normed block.
    return transformers.PhiConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_IDS,
    )


def _phi3() -> PretrainedConfig:
    # Phi3: fused qkv_proj; no sliding window.
    return transformers.Phi3Config(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
        original_max_position_embeddings=_MAX_POS, sliding_window=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_IDS,
    )


def _gpt2() -> PretrainedConfig:
    # GPT-2: MHA only, fused c_attn (Conv1D), learned absolute positions.
    return transformers.GPT2Config(
        vocab_size=_VOCAB, n_positions=_MAX_POS, n_embd=_HIDDEN, n_layer=_LAYERS,
        n_head=_HEADS, n_inner=_FFN, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **_IDS,
    )


def _gpt_neox() -> PretrainedConfig:
    # GPT-NeoX: MHA only, fused interleaved qkv, partial rotary (0.25).
    return transformers.GPTNeoXConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        max_position_embeddings=_MAX_POS, **_IDS,
    )


def _gptj() -> PretrainedConfig:
    # GPT-J: MHA only, interleaved (rotate_every_two) rotary on rotary_dim dims.
    return transformers.GPTJConfig(
        vocab_size=_VOCAB, n_positions=_MAX_POS, n_embd=_HIDDEN, n_layer=_LAYERS,
        n_head=_HEADS, rotary_dim=8, n_inner=_FFN, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, **_IDS,
    )


def _falcon() -> PretrainedConfig:
    # Falcon "new decoder architecture" is the variant with GQA (num_kv_heads).
    return transformers.FalconConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_kv_heads=_KV_HEADS,
        new_decoder_architecture=True, multi_query=False, parallel_attn=True,
        alibi=False, bias=False, max_position_embeddings=_MAX_POS,
        ffn_hidden_size=_FFN, hidden_dropout=0.0, attention_dropout=0.0, **_IDS,
    )


def _opt() -> PretrainedConfig:
    # OPT: MHA only, learned positions with offset 2, q pre-scaled by head_dim**-0.5.
    return transformers.OPTConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
        ffn_dim=_FFN, num_attention_heads=_HEADS, word_embed_proj_dim=_HIDDEN,
        max_position_embeddings=_MAX_POS, dropout=0.0, attention_dropout=0.0,
        layerdrop=0.0, **{**_IDS, "bos_token_id": 2},
    )


def _stablelm() -> PretrainedConfig:
    return transformers.StableLmConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
        hidden_dropout=0.0, attention_dropout=0.0, **_IDS,
    )


def _gpt_oss() -> PretrainedConfig:
    # gpt-oss: learned attention sinks, alternating sliding/full layers, MoE.
    return transformers.GptOssConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=_MAX_POS,
        sliding_window=_WINDOW, layer_types=["sliding_attention", "full_attention"],
        attention_dropout=0.0, **_IDS,
    )


def _bloom() -> PretrainedConfig:
    # BLOOM: ALiBi position bias (baddbmm) over heads folded into the batch.
    return transformers.BloomConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS,
        hidden_dropout=0.0, attention_dropout=0.0, **_IDS,
    )


def _deepseek_v3() -> PretrainedConfig:
    # DeepSeek-V3: multi-head latent attention (the cache holds the latent and
    # the rotary key, re-expanded into per-head keys every call), MoE after
    # the first dense layer.
    return transformers.DeepseekV3Config(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN, moe_intermediate_size=32,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_HEADS,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        head_dim=8, max_position_embeddings=_MAX_POS, attention_dropout=0.0, **_IDS,
    )


def _qwen3_next() -> PretrainedConfig:
    # Qwen3-Next: hybrid, a linear-attention (gated delta net) layer, then full attention.
    return transformers.Qwen3NextConfig(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS, num_experts=4, num_experts_per_tok=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=_MAX_POS, **_IDS,
    )


def _entry(name: str, family: str, make: Callable[[], PretrainedConfig],
           attn_impls: tuple[str, ...] = _BOTH, sliding: bool = False) -> ZooEntry:
    return ZooEntry(name=name, family=family, attn_impls=attn_impls, sliding=sliding,
                    make_config=make)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _entry("llama", "llama", _llama),
        _entry("mistral", "mistral", _mistral(None)),
        _entry("mistral_sliding", "mistral", _mistral(_WINDOW), sliding=True),
        _entry("qwen2", "qwen2", _qwen2),
        _entry("qwen3", "qwen3", _qwen3),
        _entry("gemma", "gemma", _gemma),
        # Gemma2 declares _supports_sdpa = False (SDPA cannot soft-cap logits).
        _entry("gemma2", "gemma2", _gemma2, attn_impls=("eager",), sliding=True),
        _entry("gemma3", "gemma3_text", _gemma3, sliding=True),
        _entry("phi", "phi", _phi),
        _entry("phi3", "phi3", _phi3),
        _entry("gpt2", "gpt2", _gpt2),
        _entry("gpt_neox", "gpt_neox", _gpt_neox),
        _entry("gptj", "gptj", _gptj),
        _entry("falcon", "falcon", _falcon),
        _entry("opt", "opt", _opt),
        _entry("stablelm", "stablelm", _stablelm),
        # Its 64-token window never binds in a test (prompt + new tokens < 64): compressed inside the window.
        _entry("mistral_wide_window", "mistral", _mistral(64)),
        _entry("gpt_oss", "gpt_oss", _gpt_oss, attn_impls=("eager",), sliding=True),
        _entry("bloom", "bloom", _bloom, attn_impls=("eager",)),
        _entry("deepseek_v3", "deepseek_v3", _deepseek_v3),
        _entry("qwen3_next", "qwen3_next", _qwen3_next),
    ]
}


def tiny_model(name: str, attn: str = "sdpa", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build zoo entry ``name`` with attention implementation ``attn``.

    Weights are deterministic (``torch.manual_seed(seed)`` right before
    construction); the model is returned in ``eval()`` mode.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo entry {name!r}; allowed: {sorted(ZOO)}")
    entry = ZOO[name]
    if attn not in entry.attn_impls:
        raise ValueError(
            f"zoo entry {name!r} does not support attn={attn!r}; allowed: {list(entry.attn_impls)}"
        )
    config = entry.make_config()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    # Random weights: make sure generate never stops early on an eos.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
