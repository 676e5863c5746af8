"""FX passes: find attention + KV-cache sites, rewrite them to kvfx ops."""

from kvfx.passes.rewrite import StatePlan, rewrite
from kvfx.passes.sites import Site, find_sites

__all__ = ["Site", "StatePlan", "find_sites", "rewrite"]
