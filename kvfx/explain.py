"""``kvfx.explain``: what kvfx found in a model, what it rewrote and why, and
what the KV cache costs before and after, as a formula of sequence length."""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
import subprocess
import types
from pathlib import Path
from typing import Optional

import sympy
import torch

from kvfx.api import Backend, GraphRecord, compiled_forward
from kvfx.integrations.transformers import (cache_argument, cache_bytes, cache_entries, entry_bytes, is_store,
                                            is_transformers_model, kv_pairs, output_cache)
from kvfx.policies import Policy, StreamingLLM
from kvfx.store import prefill_bytes
from kvfx.runtime import state_of

COLUMNS = ("graph", "layer", "module", "attention", "cache", "phase", "heads", "action")
#: the sequence length the memory formulas are written in
S = sympy.Symbol("S", integer=True, positive=True)


# Per-slot state kvfx keeps beside a compressed layer's K/V: slot_bias and
# slot_score (float32 each) per (batch, KV head, slot) -- a slot store keeps
# the score for continuous policies only -- and one int64 count of tokens seen
# per layer.
STATE_BYTES_PER_SLOT = 4 + 4
SEEN_BYTES = 8


@dataclasses.dataclass
class LayerMemory:
    """KV bytes of one layer: formulas in S and what was measured after prefill."""

    layer: int
    action: str                  # "compressed" | why not
    full: sympy.Expr             # bytes with the full cache
    kvfx: sympy.Expr             # bytes held with kvfx, slot state included (a rectangular cache: the longest head)
    measured_full: int
    measured_kvfx: int           # everything the layer holds, as measured: K, V, slot state (a store: all its pages, tables)
    nominal_kvfx: int            # K, V and slot state of the valid slots only


@dataclasses.dataclass
class Report:
    policy: Policy
    records: list[GraphRecord]
    cache_bytes_full: int
    cache_bytes_kept: int
    prompt_length: int = 0
    layers: list[LayerMemory] = dataclasses.field(default_factory=list)

    # -- sites --------------------------------------------------------------
    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for r in self.records:
            for s in r.sites:
                heads = f"{s.heads}/{s.kv_heads}x{s.head_dim}" if s.heads else "?"
                if s.compressible:
                    action = f"rewritten -> {s.op}"
                    if s.phase == "decode" and self.policy.schedule == "continuous":
                        action += " + " + s.op.replace("attend", "step")
                    action += f" ({s.note})" if s.note else ""
                else:
                    action = f"left alone: {s.reason}"
                rows.append((str(r.index), str(s.layer), s.module or "?", s.attention, s.cache, s.phase, heads, action))
        return rows

    def table(self) -> str:
        rows = [COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * min(120, len(lines[0])))
        return "\n".join(lines)

    # -- memory -------------------------------------------------------------
    def memory(self, which: str = "kvfx") -> sympy.Expr:
        """Total KV bytes as a formula of the sequence length ``S``."""
        return sympy.Add(*[getattr(m, which) for m in self.layers])

    def memory_at(self, length: int, which: str = "kvfx") -> int:
        return int(self.memory(which).subs(S, length))

    def memory_table(self) -> str:
        lines = [f"{'layer':>5}  {'full (bytes, S = seq length)':<34}{'kvfx':<44}{'held now':>10}  "
                 f"{'valid slots':>11}  action"]
        for m in self.layers:
            lines.append(f"{m.layer:>5}  {str(m.full):<34}{str(m.kvfx):<44}{m.measured_kvfx:>10,}  "
                         f"{m.nominal_kvfx:>11,}  {m.action}")
        return "\n".join(lines)

    def __str__(self) -> str:
        saved = 1 - self.cache_bytes_kept / self.cache_bytes_full if self.cache_bytes_full else 0.0
        text = [f"kvfx report for {self.policy!r}"]
        shard = self.shard
        if shard:
            text.append(shard)
        text += [self.table(), ""]
        if self.layers:
            text += [f"KV cache per layer after a {self.prompt_length}-token prefill "
                     "('held now' = every byte the layer holds: a slot store's pages (used or not), slot state and "
                     "tables; 'valid slots' = K, V and slot state of the real slots only):", self.memory_table(), "",
                     f"total: full {self.memory('full')}  ->  kvfx {sympy.simplify(self.memory('kvfx'))}"]
        text.append(f"KV cache after prefill: {self.cache_bytes_kept:,} bytes held vs {self.cache_bytes_full:,} "
                    f"for the full cache ({saved:.0%} saved)")
        return "\n".join(text)

    @property
    def shard(self) -> str:
        """Under tensor parallelism, which KV heads this rank holds (the heads
        and bytes in the report are this rank's); else ""."""
        p = self.policy
        if not getattr(type(p), "splits_heads", False) or p.world == 1:
            return ""
        last = p.first_head + p.local_heads - 1
        return (f"tensor parallel: rank {p.rank} of {p.world} holds KV heads {p.first_head}..{last}"
                f" of {p.kv_heads} in every layer; the heads and bytes below are this rank's")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        return (f"<p><b>kvfx report</b> for <code>{html.escape(repr(self.policy))}</code>: "
                f"{self.cache_bytes_kept:,} / {self.cache_bytes_full:,} KV bytes after prefill</p>"
                f"<table><tr>{head}</tr>{body}</table>")

    # -- graphs -------------------------------------------------------------
    def graph_code(self, index: int, after: bool = True) -> str:
        """The graph's code; after the rewrite, kvfx lines are marked."""
        record = self.records[index]
        if not after:
            return record.code_before
        return "\n".join(line + ("    # <-- kvfx" if "torch.ops.kvfx" in line else "")
                         for line in record.code_after.splitlines())

    def save(self, directory) -> Path:
        """Write report.txt, report.json, each graph before/after, and a picture
        (SVG via graphviz's ``dot``, else the .dot source) of each rewritten site."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(str(self) + "\n")
        (out / "report.json").write_text(json.dumps(self.to_json(), indent=1))
        dot = shutil.which("dot")
        for r in self.records:
            (out / f"graph{r.index}_before.py").write_text(self.graph_code(r.index, after=False))
            (out / f"graph{r.index}_after.py").write_text(self.graph_code(r.index))
            for site in r.rewritten:
                source = site_picture(r, site)
                stem = out / f"graph{r.index}_layer{site.layer}_{site.phase}"
                stem.with_suffix(".dot").write_text(source)
                if dot:
                    subprocess.run([dot, "-Tsvg", "-o", str(stem.with_suffix(".svg"))], input=source.encode(),
                                   check=True)
        if not dot:
            print("kvfx: graphviz's `dot` is not installed: wrote .dot files instead of SVG pictures")
        return out

    def to_json(self) -> dict:
        return {"policy": repr(self.policy), "prompt_length": self.prompt_length,
                "sites": [dict(zip(COLUMNS, row)) for row in self.rows()],
                "layers": [{"layer": m.layer, "action": m.action, "full": str(m.full), "kvfx": str(m.kvfx),
                            "measured_full": m.measured_full, "measured_kvfx": m.measured_kvfx,
                            "nominal_kvfx": m.nominal_kvfx} for m in self.layers],
                "cache_bytes_full": self.cache_bytes_full, "cache_bytes_kvfx": self.cache_bytes_kept}


def site_picture(record: GraphRecord, site) -> str:
    """DOT source: the attention subgraph as traced (left) and what replaced it (right)."""

    def cluster(graph, name: str, label: str, roots: list[str], stop: set[str], color: str) -> list[str]:
        nodes = {n.name: n for n in graph.nodes}
        keep, todo = set(), [r for r in roots if r in nodes]
        while todo and len(keep) < 40:
            n = nodes[todo.pop()]
            if n.name in keep:
                continue
            keep.add(n.name)
            if n.name not in stop and n.op != "placeholder":
                todo += [a.name for a in n.all_input_nodes]
        lines = [f'subgraph cluster_{name} {{ label="{label}"; color="{color}";']
        for n_name in keep:
            n = nodes[n_name]
            target = str(n.target) if "kvfx" in str(n.target) else getattr(n.target, "__name__", str(n.target))
            target = target.replace('"', "'")
            fill = ', style=filled, fillcolor="#ffe9a8"' if "kvfx" in str(n.target) else ""
            lines.append(f'  "{name}_{n_name}" [label="{n_name}\\n{target}"{fill}];')
            lines += [f'  "{name}_{a.name}" -> "{name}_{n_name}";' for a in n.all_input_nodes if a.name in keep]
        return lines + ["}"]

    stop = {x.name for x in (site.q, site.k, site.v, site.mask) if x is not None}
    before = cluster(record.graph_before, "before", f"layer {site.layer}: traced attention ({site.attention})",
                     [site.node.name], stop, "gray")
    after_roots = [n.name for n in record.graph_after.nodes
                   if "kvfx" in str(n.target) and any(a.name == site.k.name for a in n.all_input_nodes)]
    after = cluster(record.graph_after, "after", f"layer {site.layer}: rewritten ({site.phase})",
                    after_roots, stop, "orange")
    return "\n".join(['digraph kvfx {', 'rankdir=TB; node [shape=box, fontname="monospace", fontsize=10];',
                      *before, *after, "}"])


def _layer_memory(report: Report, full_cache, kept_cache, policy: Policy) -> list[LayerMemory]:
    prefill = next((r for r in report.records if any(s.phase == "prefill" for s in r.sites)), None)
    if prefill is None:
        return []
    by_layer = {s.layer: s for s in prefill.sites}
    rows = []
    for layer, ((fk, fv), kept) in enumerate(zip(kv_pairs(full_cache), cache_entries(kept_cache))):
        site = by_layer.get(layer)
        batch, kv_heads = fk.shape[:2]
        slot_bytes = fk.shape[3] * fk.element_size() + fv.shape[3] * fv.element_size()
        full = batch * kv_heads * slot_bytes * (sympy.Min(S, site.bounded) if site is not None and site.bounded else S)
        measured = entry_bytes(kept)                           # everything the layer holds, slot state included
        if site is not None and site.compressible and is_store(kept) and policy.reconstructs:
            # KVzip ranks every layer's slots together: a layer's share depends on the scores. The
            # formula is an even share of the budget; 'held now' is what this prompt left.
            even = StreamingLLM(budget=policy.budget, sinks=0)
            kvfx = prefill_bytes(even, S, layer, site.depth or 1, batch, kv_heads, slot_bytes, kept.page)
            action = "compressed (slot store; its share of a budget over all layers: formula = an even share)"
            nominal = int(kept.lengths.sum()) * (slot_bytes + kept.store.state_bytes_per_slot)
        elif site is not None and site.compressible and is_store(kept):
            kvfx = prefill_bytes(policy, S, layer, site.depth or 1, batch, kv_heads, slot_bytes, kept.page)
            action = "compressed (slot store)"
            nominal = int(kept.lengths.sum()) * (slot_bytes + kept.store.state_bytes_per_slot)
        elif site is not None and site.compressible:
            slots = policy.kept_length(S, layer, site.depth or 1)
            per_slot = batch * kv_heads * (slot_bytes + STATE_BYTES_PER_SLOT)
            kvfx, action = per_slot * slots + SEEN_BYTES, "compressed"
            state = state_of(kept[0])
            valid = int(torch.isfinite(state.slot_bias).sum()) if state is not None else batch * kv_heads * kept[0].shape[2]
            nominal = valid * (slot_bytes + STATE_BYTES_PER_SLOT) + SEEN_BYTES
        else:
            kvfx, action = full, (site.reason if site is not None else "no attention site found for this layer")
            nominal = measured
        rows.append(LayerMemory(layer, action, full, kvfx, cache_bytes([(fk, fv)], state=False), measured, nominal))
    return rows


def _cache_argument(model) -> str:
    return cache_argument(model) if is_transformers_model(model) else "past_key_values"


def _fresh_code(fn):
    """``fn`` with a copy of its code object. Dynamo caches compiled frames on
    the code object, so compiling the copy leaves no cache entry, guard or
    recompile count on the model's own forward."""
    func, owner = (fn.__func__, fn.__self__) if isinstance(fn, types.MethodType) else (fn, None)
    if not isinstance(func, types.FunctionType):
        return fn
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__dict__ = func.__kwdefaults__, dict(func.__dict__)
    return types.MethodType(copy, owner) if owner is not None else copy


def explain(model: torch.nn.Module, *args, policy: Optional[Policy] = None, inner: str = "aot_eager",
            **kwargs) -> Report:
    """Run ``model(*args, **kwargs)`` (a prefill) and one decode step through
    kvfx; report every attention site, the KV bytes per layer (formulas in S
    and measured, slot state included), and the graphs.

    On a model ``kvfx.compile`` d with ``policy`` (or with ``policy`` omitted)
    the report is what that model's backend does: its own compiled forward
    runs and its records are reported. Otherwise ``policy`` is compiled on the
    side. Either way nothing is left changed: the model keeps its forward, and
    no other compiled function is reset or recompiled."""
    own: Optional[Backend] = getattr(model, "_kvfx_backend", None)
    if policy is None and own is None:
        raise TypeError("kvfx.explain: policy is required for a model that is not kvfx.compile'd "
                        "(e.g. policy=kvfx.SnapKV(budget=0.35))")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"kvfx.explain: policy must be a kvfx policy (e.g. kvfx.SnapKV(budget=0.5)), got {policy!r}")
    with torch.no_grad():
        if own is not None and policy in (None, own.policy):
            backend, forward = own, model.forward
            original = model._kvfx_original_forward
        else:
            original = getattr(model, "_kvfx_original_forward", None) or model.forward
            backend = Backend(policy, inner, model, forwards_prompts=is_transformers_model(model))
            forward = compiled_forward(model, backend, _fresh_code(original))
        full = original(*args, **kwargs)
        out = forward(*args, **kwargs)
        cache, full_cache = output_cache(out), output_cache(full)
        pairs = kv_pairs(full_cache)
        report = Report(backend.policy, backend.records, cache_bytes(full_cache, state=False), cache_bytes(cache),
                        prompt_length=max((k.shape[-2] for k, _ in pairs), default=0))
        report.layers = _layer_memory(report, full_cache, cache, backend.policy)
        if cache is not None and hasattr(out, "logits"):
            forward(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{_cache_argument(model): cache})
    report.records = list(backend.records)
    return report
