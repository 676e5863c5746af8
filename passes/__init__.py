"""FX passes: find attention + KV-cache sites, rewrite them to kvfx ops."""

from kvfx.passes.depth import assign_depths
from kvfx.passes.rewrite import StatePlan, rewrite
from kvfx.passes.sites import Site, find_sites, lend_policy_inputs, stray_stores

__all__ = ["Site", "StatePlan", "assign_depths", "find_sites", "lend_policy_inputs", "rewrite", "stray_stores"]
