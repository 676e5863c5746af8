"""kvfx: compress the KV cache of any traced PyTorch model through torch.compile.

    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(budget=0.35)))
    kvfx.compile(model, kvfx.SnapKV(budget=0.35))       # the same, and keeps positions right
"""

from kvfx.api import Backend, GraphRecord, backend, compile, restore
from kvfx.explain import Report, explain
from kvfx.policies import PRESETS, KNorm, Policy, SnapKV, StreamingLLM, parse_policy
from kvfx.runtime import PositionError, tokens_seen

__all__ = [
    "Backend", "GraphRecord", "KNorm", "PRESETS", "Policy", "PositionError", "SnapKV", "StreamingLLM",
    "Report", "backend", "compile", "explain", "parse_policy", "restore", "tokens_seen",
]
