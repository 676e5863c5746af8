"""kvfx: compress the KV cache of any traced PyTorch model through torch.compile.

    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(budget=0.35)))
    kvfx.compile(model, kvfx.SnapKV(budget=0.35))       # the same, and keeps positions right
"""

from kvfx.api import Backend, GraphRecord, backend, compile, restore, set_policy
from kvfx.explain import Report, explain
from kvfx.heads import find_retrieval_heads, load_head_map, save_head_map
from kvfx.policies import (CUR, H2O, PRESETS, TOVA, AdaKV, ChunkKV, Compensate, Compose, CriticalKV, Evict,
                           ExpectedAttention, GaussianMerge, KeyDiff, KNorm, KVMerger, KVzip, LagKV, Policy, PyramidKV, RazorAttention,
                           Recompress, ResidualMerge, SnapKV, StreamingLLM, ThinK, TopChunks, TopTokens, TopTokensAcrossHeads,
                           ZeroMerge, parse_policy)
from kvfx.runtime import PositionError, tokens_seen

__all__ = [
    "AdaKV", "backend", "Backend", "ChunkKV", "Compensate", "compile", "Compose", "CriticalKV", "CUR", "Evict",
    "ExpectedAttention", "explain", "find_retrieval_heads", "GaussianMerge", "GraphRecord", "H2O", "KeyDiff", "KNorm", "KVMerger", "KVzip", "LagKV",
    "load_head_map", "parse_policy", "Policy", "PositionError", "PRESETS", "PyramidKV", "RazorAttention", "Recompress",
    "Report", "ResidualMerge", "restore", "save_head_map", "set_policy", "SnapKV", "StreamingLLM", "ThinK", "tokens_seen",
    "TopChunks", "TopTokens", "TopTokensAcrossHeads", "TOVA", "ZeroMerge",
]
