"""Compression policies: frozen dataclasses holding a paper's hyperparameters,
built from score / keep / fold / schedule / plan primitives (see ``base``).

    kvfx.SnapKV(budget=0.35)                               # a preset
    kvfx.ChunkKV(budget=0.3, scorer=kvfx.KNorm())          # chunks ranked by any policy's score
    kvfx.Compose(kvfx.SnapKV(budget=0.3), fold_rule=kvfx.GaussianMerge())   # SnapKV's keep, KVMerger's merge
    kvfx.CriticalKV(kvfx.SnapKV(budget=0.3))               # any score weighed by what values do to the output
    kvfx.Recompress(kvfx.KNorm(budget=0.5), every=64, target=512)   # compressed again while decoding
    kvfx.ThinK(kvfx.SnapKV(budget=0.5), key_channels=0.5)  # and half of each head's key channels zeroed
"""

from kvfx.policies.agnostic import CUR, KeyDiff, LagKV
from kvfx.policies.base import Policy
from kvfx.policies.budgets import Budget, budget_tokens, check_budget, smax, smin
from kvfx.policies.compose import Compose
from kvfx.policies.critical import CriticalKV
from kvfx.policies.expected import ExpectedAttention
from kvfx.policies.fold import (Compensate, Compressed, Evict, Fold, GaussianMerge, ResidualMerge, bias_of,
                                evict_to)
from kvfx.policies.kvzip import KVzip
from kvfx.policies.keep import Keep, Kept, TopChunks, TopTokens, TopTokensAcrossHeads, protect, top_sorted
from kvfx.policies.presets import H2O, TOVA, AdaKV, KNorm, PyramidKV, SnapKV, StreamingLLM
from kvfx.policies.recompress import Recompress
from kvfx.policies.registry import PRESETS, key_of, parse_policy, policy_of, rule
from kvfx.policies.seeds import ChunkKV, KVMerger, RazorAttention, ZeroMerge
from kvfx.policies.think import ThinK

for _rule in (TopTokens, TopChunks, TopTokensAcrossHeads, Evict, Compensate, ResidualMerge, GaussianMerge):
    rule(_rule)

__all__ = [
    "AdaKV", "bias_of", "Budget", "budget_tokens", "check_budget", "ChunkKV", "Compensate", "Compose", "Compressed",
    "CriticalKV", "CUR", "Evict", "evict_to", "ExpectedAttention", "Fold", "GaussianMerge", "H2O", "Keep", "Kept", "key_of", "KeyDiff",
    "KNorm", "KVMerger", "KVzip", "LagKV", "parse_policy", "Policy", "policy_of", "PRESETS", "protect", "PyramidKV",
    "RazorAttention", "Recompress", "ResidualMerge", "smax", "smin", "SnapKV", "StreamingLLM", "top_sorted",
    "ThinK", "TopChunks", "TopTokens", "TopTokensAcrossHeads", "TOVA", "ZeroMerge",
]
