"""kvfx: compress the KV cache of any traced PyTorch model through torch.compile.

    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(budget=0.35)))
    kvfx.compile(model, kvfx.SnapKV(budget=0.35))       # the same, and keeps positions right
"""

from kvfx.api import Backend, GraphRecord, backend, compile, restore, set_policy
from kvfx.explain import Report, explain
from kvfx.heads import find_retrieval_heads, load_head_map, save_head_map
from kvfx.policies import H2O, PRESETS, TOVA, KNorm, Policy, PyramidKV, SnapKV, StreamingLLM, parse_policy
from kvfx.seeds import ChunkKV, KVMerger, RazorAttention, ZeroMerge
from kvfx.runtime import PositionError, tokens_seen

__all__ = [
    "Backend", "ChunkKV", "GraphRecord", "H2O", "KNorm", "KVMerger", "PyramidKV", "RazorAttention", "TOVA",
    "ZeroMerge", "PRESETS", "Policy", "PositionError", "SnapKV", "StreamingLLM",
    "Report", "backend", "compile", "explain", "find_retrieval_heads", "load_head_map", "save_head_map", "parse_policy", "restore", "set_policy", "tokens_seen",
]
