"""How many layers each site's stack has, read from the model's module tree.

Depth-dependent plans (PyramidKV's schedule, KVMerger's ``exempt_layers=(-1,)``)
need the model's layer count. One graph may hold only some layers (a graph
break splits them), so the count comes from the module that holds the
attention's layer: ``model.layers.3.self_attn`` -> ``len(model.layers)``.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from kvfx.passes.sites import Site


def stack_depth(root: nn.Module, path: str) -> Optional[int]:
    """Length of the module list holding the layer at ``path`` under ``root``."""
    parts = path.split(".") if path else []
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numbered:
        return None
    try:
        stack = root.get_submodule(".".join(parts[:numbered[-1]]))
        return len(stack)
    except (AttributeError, TypeError):
        return None


def assign_depths(sites: list[Site], root_of: Callable[[str], Optional[nn.Module]]) -> list[Site]:
    """Set ``site.depth`` from the root module of each site; sites whose root
    is unknown get the graph's own count (highest layer index + 1) and are returned."""
    unknown = []
    for site in sites:
        root = root_of(site.root)
        site.depth = stack_depth(root, site.module) if root is not None else None
        if site.depth is None:
            unknown.append(site)
    in_graph = max((s.layer for s in sites if s.layer is not None), default=0) + 1
    for site in unknown:
        site.depth = in_graph
    return unknown
