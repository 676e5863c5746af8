"""``kvfx.explain``: what kvfx found in a model, what it rewrote and why."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvfx.api import GraphRecord, compile as kvfx_compile, restore
from kvfx.policies import Policy

COLUMNS = ("graph", "layer", "module", "attention", "cache", "phase", "heads", "action")


def _cache_bytes(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "layers"):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for pair in cache for t in pair)


@dataclasses.dataclass
class Report:
    policy: Policy
    records: list[GraphRecord]
    cache_bytes_full: int
    cache_bytes_kept: int

    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for r in self.records:
            for s in r.sites:
                heads = f"{s.heads}/{s.kv_heads}x{s.head_dim}" if s.heads else "?"
                action = f"rewritten -> {'kvfx.compress' if s.phase == 'prefill' else 'kvfx.attend'}" \
                    if s.compressible else f"left alone: {s.reason}"
                rows.append((str(r.index), str(s.layer), s.module or "?", s.attention, s.cache, s.phase, heads, action))
        return rows

    def table(self) -> str:
        rows = [COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * min(120, len(lines[0])))
        return "\n".join(lines)

    def __str__(self) -> str:
        saved = 1 - self.cache_bytes_kept / self.cache_bytes_full if self.cache_bytes_full else 0.0
        return (f"kvfx report for {self.policy!r}\n{self.table()}\n\n"
                f"KV cache after prefill: {self.cache_bytes_kept:,} bytes held vs {self.cache_bytes_full:,} "
                f"for the full cache ({saved:.0%} saved)")

    def graph_code(self, index: int, after: bool = True) -> str:
        record = self.records[index]
        return record.code_after if after else record.code_before

    def save(self, directory) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(str(self) + "\n")
        for r in self.records:
            (out / f"graph{r.index}_before.py").write_text(r.code_before)
            (out / f"graph{r.index}_after.py").write_text(r.code_after)
        return out


def explain(model: torch.nn.Module, *args, policy: Policy, inner: str = "aot_eager", **kwargs) -> Report:
    """Run ``model(*args, **kwargs)`` (a prefill) and one decode step through
    kvfx with ``policy``; report every attention site and the cache bytes held,
    compared with the same calls without kvfx. The model is left as it was."""
    import torch._dynamo

    with torch.no_grad():
        full = model(*args, **kwargs)
        torch._dynamo.reset()
        kvfx_compile(model, policy, inner=inner)
        backend = model._kvfx_backend
        try:
            out = model(*args, **kwargs)
            cache = getattr(out, "past_key_values", None)
            kept = _cache_bytes(cache)
            if cache is not None and hasattr(out, "logits"):
                nxt = out.logits[:, -1:].argmax(-1)
                model(input_ids=nxt, past_key_values=cache, use_cache=True)
        finally:
            restore(model)
    return Report(policy, backend.records, _cache_bytes(getattr(full, "past_key_values", None)), kept)
