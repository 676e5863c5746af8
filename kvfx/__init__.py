"""kvfx: compress the KV cache of any traced PyTorch model through torch.compile.

    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(budget=0.35)))
    kvfx.compile(model, kvfx.SnapKV(budget=0.35))       # the same, and keeps positions right
"""

from kvfx.api import Backend, GraphRecord, backend, compile, restore, set_policy
from kvfx.explain import Report, explain
from kvfx.heads import find_retrieval_heads, load_head_map, save_head_map
from kvfx.policies import (H2O, PRESETS, TOVA, AdaKV, ChunkKV, Compensate, Compose, Evict, GaussianMerge, KNorm, KVMerger,
                           Policy, PyramidKV, RazorAttention, ResidualMerge, SnapKV, StreamingLLM, TopChunks, TopTokens,
                           TopTokensAcrossHeads, ZeroMerge, parse_policy)
from kvfx.runtime import PositionError, tokens_seen

__all__ = [
    "AdaKV", "Backend", "ChunkKV", "Compensate", "Compose", "Evict", "GaussianMerge", "GraphRecord", "H2O", "KNorm",
    "KVMerger", "PRESETS", "Policy", "PositionError", "PyramidKV", "RazorAttention", "Report", "ResidualMerge",
    "SnapKV", "StreamingLLM", "TOVA", "TopChunks", "TopTokens", "TopTokensAcrossHeads", "ZeroMerge", "backend", "compile", "explain",
    "find_retrieval_heads", "load_head_map", "parse_policy", "restore", "save_head_map", "set_policy", "tokens_seen",
]
