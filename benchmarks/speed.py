"""What compression costs or saves in time and memory, as ratios to the full cache measured in the same run.

    python benchmarks/speed.py                 # CPU: Gemma-3-270M and SmolLM2-135M, 1k and 2k tokens
    python benchmarks/speed.py --quick         # a tiny random model: checks the script runs
    python benchmarks/speed.py --llama7b       # CUDA: a Llama-7B-shaped model with random bf16 weights, 8k and 32k
    python benchmarks/speed.py --render a.json b.json   # redraw tables and plot from earlier runs

Per model, policy and context length: prefill time, decode time per token, KV bytes held after the
prompt and after decoding, peak memory (CPU: the process's peak resident set, reset before each
measurement; CUDA: torch.cuda.max_memory_allocated), compile time and the number of graphs. The
full cache is the same model compiled with the same inner compiler but without kvfx, so each ratio
isolates what kvfx adds; the row "kvfx, budget >= prompt" is kvfx's slot store at the full cache's
length (no compression): its decode ratio is what the store itself costs. Compile time = the first
pass over every shape (tracing and compiling) minus the same pass once warm. ``--llama7b`` follows
HF's compiled-generation recipe (``generate(cache_implementation="static")``, Inductor with
``mode="reduce-overhead"``: CUDA graphs), traces once and switches each policy in with
``kvfx.set_policy`` (its compile column is the switch), sets the full cache's time per token against
reading its weights and cache once at the measured copy bandwidth, runs the largest batch that fits
at the longest context for every row (no prediction), and stops starting rows after
``--time-limit`` seconds.
Writes ``speed.json``, ``speed.md`` and ``speed.png`` (``speed_llama7b.*``) to ``--out`` (default
docs/results/) and refreshes the tables in docs/results.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kvfx  # noqa: E402
from kvfx.api import compile_inner  # noqa: E402

FULL = "full cache"
#: kvfx with a budget above every prompt: the slot store's own cost at equal cache length
SAME = "kvfx, budget >= prompt"


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    policies: tuple[str, ...]
    budgets: tuple[float, ...]
    contexts: tuple[int, ...]
    decode_tokens: int
    repeats: int
    inner: str
    batch: int = 1
    dtype: str = "float32"
    static: bool = False          # generate(cache_implementation="static"), timed token by token
    mode: Optional[str] = None    # torch.compile's mode (Inductor), e.g. "reduce-overhead": CUDA graphs
    sum_queries: int = 0          # > 0: each attention-sum preset also with its sums from the last n queries only


# -- memory -------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the process's resident-set
    high-water mark (Linux VmHWM), reset by writing 5 to /proc/self/clear_refs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _reset_hwm()
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


def _reset_hwm() -> None:
    # Give freed heap pages back first (glibc keeps them resident): otherwise a
    # block that reuses them would not raise the high-water mark at all.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- one measurement ------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TokenClock:
    """A ``generate`` streamer that notes the time of every token it is handed
    (the device synchronised first): the prompt, then each new token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_static(model, ids: torch.Tensor, decode_tokens: int) -> dict[str, float]:
    """HF's compiled-generation recipe: ``generate(cache_implementation="static")``;
    prefill = prompt to first token, decode = the median time between tokens."""
    device = ids.device
    clock = TokenClock(device)
    with PeakMemory(device) as memory:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_tokens + 1,
                             min_new_tokens=decode_tokens + 1, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True, streamer=clock, pad_token_id=0)
        held = common.cache_bytes(out.past_key_values)
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    del out
    return {"prefill_s": clock.times[1] - clock.times[0], "decode_s_per_token": statistics.median(steps),
            "kv_bytes_prompt": held, "kv_bytes_end": held, "peak_bytes": memory.peak}


@torch.no_grad()
def generate_once(model, ids: torch.Tensor, decode_tokens: int, static: bool = False) -> dict[str, float]:
    """Prefill ``ids`` then decode greedily; times, cache bytes and peak memory.
    ``static``: through ``generate`` with a static cache (``generate_static``)."""
    if static:
        return generate_static(model, ids, decode_tokens)
    device = ids.device
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - start
        held_prompt = common.cache_bytes(out.past_key_values)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - start
        held_end = common.cache_bytes(out.past_key_values)
    del out
    return {"prefill_s": prefill, "decode_s_per_token": decode / max(decode_tokens, 1), "kv_bytes_prompt": held_prompt,
            "kv_bytes_end": held_end, "peak_bytes": memory.peak}


class GraphCounter:
    """An inner backend that counts the graphs it compiles (for the full-cache baseline)."""

    def __init__(self, inner: str) -> None:
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs, **compile_options):
        self.graphs += 1
        return compile_inner(self.inner, gm, example_inputs, **compile_options)


def install(model, policy: Optional[kvfx.Policy], inner: str, mode: Optional[str] = None) -> Any:
    """Compile ``model`` afresh: kvfx with ``policy``, or plain torch.compile for the full cache."""
    torch._dynamo.reset()
    kvfx.restore(model)
    options = dict(common.COMPILE_OPTIONS, **({"mode": mode} if mode else {}))
    if policy is None:
        counter = GraphCounter(inner)
        model._kvfx_original_forward = model.forward
        model.forward = torch.compile(model.forward, backend=counter, **options)
        return counter
    kvfx.compile(model, policy, inner=inner, **options)
    return model._kvfx_backend


def graphs_of(handle) -> int:
    return handle.graphs if isinstance(handle, GraphCounter) else len(handle.records)


def measure(model, policy: Optional[kvfx.Policy], prompts: dict[int, torch.Tensor], settings: Settings,
            keep: bool = False) -> dict[str, Any]:
    """Compile afresh, then time: compile time = the first pass over every context
    (which traces and compiles each shape) minus a warm pass. ``keep`` leaves
    the compiled model installed (for ``kvfx.set_policy``)."""
    handle = install(model, policy, settings.inner, settings.mode)
    first = time.perf_counter()
    for ids in prompts.values():
        generate_once(model, ids, 2, settings.static)
    first = time.perf_counter() - first
    result = timed(model, prompts, settings)
    result.update(compile_s=max(first - result.pop("timed_s"), 0.0), graphs=graphs_of(handle))
    if not keep:
        kvfx.restore(model)
        torch._dynamo.reset()
    return result


def timed(model, prompts: dict[int, torch.Tensor], settings: Settings) -> dict[str, Any]:
    """A warm pass over every context (compiling any shape not seen yet; its time is
    ``timed_s``), then ``settings.repeats`` timed runs of each, medians kept."""
    warm = time.perf_counter()
    for ids in prompts.values():
        generate_once(model, ids, 2, settings.static)
    warm = time.perf_counter() - warm
    by_context = {}
    for length, ids in prompts.items():
        runs = [generate_once(model, ids, settings.decode_tokens, settings.static) for _ in range(settings.repeats)]
        by_context[str(length)] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {"timed_s": warm, "contexts": by_context}


# -- runs ------------------------------------------------------------------------

def make_prompts(model, contexts, batch: int, device, seed: int = 0) -> dict[int, torch.Tensor]:
    """Random token ids: time and memory do not depend on what the tokens say."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {n: torch.randint(3, vocab, (batch, n), generator=gen).to(device) for n in contexts}


def run_model(name: str, settings: Settings) -> dict[str, Any]:
    model, tokenizer, description = common.load(name, dtype=getattr(torch, settings.dtype))
    device = next(model.parameters()).device
    common.progress(f"[speed] {description}")
    prompts = make_prompts(model, settings.contexts, settings.batch, device)
    rows = {FULL: measure(model, None, prompts, settings)}
    common.progress(f"[speed] {name} {FULL}: {_summary(rows[FULL])}")
    rows[SAME] = dict(measure(model, kvfx.StreamingLLM(budget=1 << 30), prompts, settings), spec="no compression")
    common.progress(f"[speed] {name} {SAME}: {_summary(rows[SAME])}")
    for budget in settings.budgets:
        for pname, policy in common.policy_grid(list(settings.policies), budget, min(settings.contexts),
                                                sum_queries=settings.sum_queries, tokenizer=tokenizer).items():
            row = measure(model, policy, prompts, settings)
            row.update(policy=pname, budget=budget, spec=repr(policy))
            rows[f"{pname}@{budget:g}"] = row
            common.progress(f"[speed] {name} {policy!r}: {_summary(row)}")
    _add_ratios(rows)
    return {"description": description, "device": str(device), "rows": rows}


def _summary(row: dict[str, Any]) -> str:
    parts = [f"compile {row['compile_s']:.1f}s, {row['graphs']} graphs"]
    for n, c in row["contexts"].items():
        parts.append(f"{n}: prefill {c['prefill_s']:.2f}s, decode {1000 * c['decode_s_per_token']:.1f}ms/token, "
                     f"KV {c['kv_bytes_prompt'] / 2**20:.1f}MiB, peak {c['peak_bytes'] / 2**20:.0f}MiB")
    return "; ".join(parts)


def _add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    full = rows[FULL]
    for row in rows.values():
        row["compile_ratio"] = row["compile_s"] / full["compile_s"] if full["compile_s"] > 0 else None
        for n, c in row["contexts"].items():
            base = full["contexts"][n]
            c["ratio"] = {key: (c[key] / base[key] if base[key] else None)
                          for key in ("prefill_s", "decode_s_per_token", "kv_bytes_prompt", "kv_bytes_end", "peak_bytes")}


# -- Llama-7B on CUDA ------------------------------------------------------------

def llama7b(device: torch.device, small: bool = False):
    """A Llama-2-7B-shaped model with random bf16 weights (``small``: the same code on a toy shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768 + 1024)
    if small:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=128, max_position_embeddings=4096)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 on the GPU: a float32 7B would need 27 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def copy_bandwidth(device: torch.device, gib: float = 4.0) -> float:
    """Bytes per second a device copy moves (read + written), the best of 5:
    decode at its limit reads the weights and the cache once per token."""
    n = int(gib * 2**30) // 2 if device.type == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / best


def _fits(model, length: int, batch: int, tokens: int, static: bool) -> Optional[dict]:
    """One generation at ``batch`` rows, or None when it runs out of GPU memory."""
    device = next(model.parameters()).device
    try:
        return generate_once(model, make_prompts(model, (length,), batch, device)[length], tokens, static)
    except torch.cuda.OutOfMemoryError:
        return None
    except RuntimeError as err:  # an allocation that fails inside a custom op or a CUDA graph
        if "out of memory" not in str(err).lower():
            raise
        return None
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(model, length: int, settings: Settings, cap: int, deadline: Optional[float]) -> dict[str, Any]:
    """The largest batch that runs at ``length`` tokens, found by running it
    (doubling, then bisecting; no prediction), and its decode tokens/s."""
    good, bad, runs = 0, cap + 1, {}
    batch = 1
    while good + 1 < bad and (deadline is None or time.perf_counter() < deadline):
        result = _fits(model, length, batch, 8, settings.static)
        runs[batch] = result is not None
        if result is not None:
            good, best = batch, result
        else:
            bad = batch
        batch = min(batch * 2, cap) if bad > cap else (good + bad) // 2
        if batch in runs:
            break
    if not good:
        return {"batch": 0, "tried": runs}
    return {"batch": good, "tried": runs, "tokens_per_s": good / best["decode_s_per_token"],
            "decode_s_per_token": best["decode_s_per_token"], "complete": good + 1 == bad}


def run_llama7b(settings: Settings, small: bool = False, time_limit: Optional[float] = None,
                partial: Optional[Path] = None, max_batch: int = 64) -> dict[str, Any]:
    """HF's compiled-generation recipe (a static cache; Inductor, CUDA graphs
    with mode="reduce-overhead"): the full cache (plain torch.compile), then
    every policy × budget switched in with ``kvfx.set_policy`` on one trace
    (tracing a 32-layer model per policy would take most of a GPU session).
    The full cache's time per token is set against reading its weights and
    cache once at the measured copy bandwidth. Then, per row, the largest
    batch that runs at the longest context (run, up to ``max_batch``) and its
    tokens/s. Stops starting new rows after ``time_limit`` seconds (the full
    cache always runs: every ratio needs it); ``partial`` gets the JSON after
    every row."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama7b(device, small=small)
    description = ("Llama-2-7B-shaped (32 layers, 32 heads of 128, random bf16 weights)" if not small
                   else "toy Llama shape (the --llama7b code path on CPU)")
    common.progress(f"[speed] {description}")
    prompts = make_prompts(model, settings.contexts, settings.batch, device)
    longest = max(settings.contexts)
    data: dict[str, Any] = {"description": description + "; policies switched with kvfx.set_policy on one trace",
                            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else str(device),
                            "rows": {}, "skipped": []}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    data["weights_bytes"] = weights
    data["copy_bytes_per_s"] = copy_bandwidth(device)
    data["mode"], data["static_cache"] = settings.mode, settings.static
    grid = [(budget, pname, policy) for budget in settings.budgets
            for pname, policy in common.policy_grid(list(settings.policies), budget, min(settings.contexts),
                                                    sum_queries=settings.sum_queries).items()]
    todo = [(None, FULL, None)] + grid
    traced = False
    for budget, pname, policy in todo:
        key = pname if policy is None else f"{pname}@{budget:g}"
        if policy is not None and time_limit is not None and time.perf_counter() - started > time_limit:
            data["skipped"].append(key)
            continue
        try:
            if policy is None or not traced:
                row = measure(model, policy, prompts, settings, keep=policy is not None)
                traced = policy is not None
            else:
                switch = time.perf_counter()
                kvfx.set_policy(model, policy)
                switch = time.perf_counter() - switch
                row = timed(model, prompts, settings)
                # Any shape first seen under this policy is traced in the warm pass.
                row.update(switch_s=switch, compile_s=switch + row.pop("timed_s"),
                           graphs=graphs_of(model._kvfx_backend))
        except Exception as err:  # one failing row must not cost the GPU session the others
            common.progress(f"[speed] llama-7b-shaped {key} failed: {type(err).__name__}: {err}")
            traceback.print_exc()
            data.setdefault("failed", {})[key] = f"{type(err).__name__}: {str(err)[:500]}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            kvfx.restore(model)
            torch._dynamo.reset()
            traced = False
            continue
        if policy is not None:
            row.update(policy=pname, budget=budget, spec=repr(policy))
        for n, c in row["contexts"].items():
            # What one token costs at the memory's limit: the weights and the cache read once.
            c["ideal_s_per_token"] = (weights + c["kv_bytes_prompt"]) / data["copy_bytes_per_s"]
        data["rows"][key] = row
        common.progress(f"[speed] llama-7b-shaped {key}: {_summary(row)}")
        if partial is not None:
            common.write_json(partial, data)
    kvfx.restore(model)
    torch._dynamo.reset()
    if FULL in data["rows"]:
        _add_ratios(data["rows"])
    deadline = None if time_limit is None else started + time_limit
    for key, row in data["rows"].items():
        if deadline is not None and time.perf_counter() > deadline:
            data["skipped"].append(f"largest batch of {key}")
            continue
        install(model, None if key == FULL else kvfx.parse_policy(row["spec"]), settings.inner, settings.mode)
        row["largest_batch"] = largest_batch(model, longest, settings, max_batch, deadline)
        common.progress(f"[speed] llama-7b-shaped {key}: largest batch at {longest} tokens {row['largest_batch']}")
        kvfx.restore(model)
        torch._dynamo.reset()
        if partial is not None:
            common.write_json(partial, data)
    data["largest_batch_context"] = longest
    return data


# -- reporting -----------------------------------------------------------------------

def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}×"


def tables(data: dict[str, Any]) -> str:
    parts = []
    for name, m in data["models"].items():
        rows = m["rows"]
        for n in next(iter(rows.values()))["contexts"]:
            full = rows[FULL]["contexts"][n]
            header = ["policy", "prefill", "decode / token", "KV after prompt", "KV after decode", "peak memory",
                      "compile", "graphs"]
            table = [[FULL, f"{full['prefill_s']:.2f} s", f"{1000 * full['decode_s_per_token']:.1f} ms",
                      f"{full['kv_bytes_prompt'] / 2**20:.1f} MiB", f"{full['kv_bytes_end'] / 2**20:.1f} MiB",
                      f"{full['peak_bytes'] / 2**20:.0f} MiB", f"{rows[FULL]['compile_s']:.1f} s", rows[FULL]["graphs"]]]
            for key, row in rows.items():
                if key == FULL:
                    continue
                c = row["contexts"][n]["ratio"]
                table.append([key.replace("@", " @ "), _ratio(c["prefill_s"]), _ratio(c["decode_s_per_token"]),
                              _ratio(c["kv_bytes_prompt"]), _ratio(c["kv_bytes_end"]), _ratio(c["peak_bytes"]),
                              f"{row['switch_s']:.2f} s switch" if "switch_s" in row else _ratio(row["compile_ratio"]),
                              row["graphs"]])
            how = ""
            if m.get("static_cache"):
                how = (f" Generation with a static cache (`cache_implementation=\"static\"`), Inductor mode "
                       f"{m.get('mode')!r}; decode = the median time between tokens.")
            parts.append(f"### {name}, {n} tokens\n\n{m['description']} on {m['device']}.{how} First row: the full "
                         "cache's absolute numbers; other rows: ratios to it (below 1× = less time or memory).\n\n"
                         + common.markdown_table(header, table) + "\n")
            if "ideal_s_per_token" in full:
                parts.append(f"The full cache's decode at {n} tokens: {1000 * full['decode_s_per_token']:.2f} ms/token "
                             f"= {full['decode_s_per_token'] / full['ideal_s_per_token']:.2f}× the time to read its "
                             f"weights and cache once ({1000 * full['ideal_s_per_token']:.2f} ms at the measured copy "
                             f"bandwidth, {m['copy_bytes_per_s'] / 1e12:.2f} TB/s).\n")
        if any("largest_batch" in row for row in rows.values()):
            n = m["largest_batch_context"]
            table = [[key.replace("@", " @ "), row["largest_batch"]["batch"],
                      f"{row['largest_batch'].get('tokens_per_s', 0):.1f}",
                      "" if row["largest_batch"].get("complete", True) else "search cut by the time limit"]
                     for key, row in rows.items() if "largest_batch" in row]
            parts.append(f"Largest batch that runs at {n} tokens (each size run: doubled until one fails, then "
                         "bisected), and its decode tokens/s.\n\n"
                         + common.markdown_table(["policy", "largest batch", "tokens/s", ""], table) + "\n")
        for key, error in m.get("failed", {}).items():
            parts.append(f"{key} failed: {error}\n")
        if m.get("skipped"):
            parts.append(f"Not measured (the run's time limit was reached): {', '.join(m['skipped'])}.\n")
    parts.append("![speed](results/speed.png)\n")
    return "\n".join(parts)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"])
    metrics = (("prefill_s", "prefill time"), ("decode_s_per_token", "decode time per token"),
               ("kv_bytes_prompt", "KV bytes after prompt"))
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(15, 0.6 + 3.8 * len(models)), squeeze=False)
    for r, name in enumerate(models):
        rows = {k: v for k, v in data["models"][name]["rows"].items() if k != FULL}
        contexts = list(data["models"][name]["rows"][FULL]["contexts"])
        labels = [k.replace("@", " @ ") for k in rows]
        width = 0.8 / len(contexts)
        for c_i, (metric, title) in enumerate(metrics):
            ax = axes[r][c_i]
            for j, n in enumerate(contexts):
                values = [row["contexts"][n]["ratio"][metric] or 0 for row in rows.values()]
                ax.barh([i + j * width for i in range(len(rows))], values, height=width, label=f"{n} tokens")
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
            ax.set_yticks([i + width * (len(contexts) - 1) / 2 for i in range(len(rows))])
            ax.set_yticklabels(labels if c_i == 0 else [], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{name}: {title}\n(ratio to full cache)", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
        axes[r][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(paths: list[Path], out: Path) -> int:
    """Tables and plot from earlier runs' JSON; each run keeps its own full-cache baseline."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    data: dict[str, Any] = {"models": {}}
    for i, run in enumerate(runs, 1):
        for name, m in run["models"].items():
            label = name if len(runs) == 1 else f"{name}, run {i}"
            data["models"][label] = m
    stem = "speed_llama7b" if all("llama-7b-shaped" in r["models"] for r in runs) else "speed"
    _write_report(data, out, stem, refresh_doc=True)
    return 0


def _write_report(data: dict[str, Any], out: Path, stem: str, refresh_doc: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = tables(data).replace("results/speed.png", f"results/{stem}.png")
    (out / f"{stem}.md").write_text(text)
    plot(data, out / f"{stem}.png")
    if refresh_doc and out.resolve() == common.RESULTS.resolve():
        common.update_doc(stem, text)


# -- command line -----------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, short contexts (a smoke run)")
    parser.add_argument("--llama7b", action="store_true", help="the Llama-7B-shaped bf16 model on CUDA at 8k and 32k")
    common.add_common_arguments(parser, "comma-separated fractions in (0, 1); default 0.35 (--llama7b: 0.35,0.05)",
                                None)
    parser.add_argument("--contexts", type=common.list_of(int), help="prompt lengths in tokens; default 1024,2048")
    parser.add_argument("--decode-tokens", type=int, help="greedy tokens timed after each prompt; default 16 (--llama7b: 32)")
    parser.add_argument("--repeats", type=int, help="timed runs per context, median kept; default 2 (--llama7b: 1)")
    parser.add_argument("--mode", help="torch.compile mode for Inductor; --llama7b default: reduce-overhead "
                        "(CUDA graphs) when --inner is inductor (its default there)")
    parser.add_argument("--max-batch", type=int, help="--llama7b: the largest batch tried at the longest context; "
                        "default 64 (--quick: 4)")
    parser.add_argument("--time-limit", type=float,
                        help="--llama7b: seconds after which no new row starts (the rest are listed as skipped)")
    parser.add_argument("--section", help="the file stem and docs/results.md block to write; default speed "
                        "(--llama7b: speed_llama7b)")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: redraw the tables and plot from JSON files this script wrote "
                             "(several --llama7b runs are shown one after another)")
    common.add_sum_queries_argument(parser)
    args = parser.parse_args(argv)
    common.check_arguments(parser, args)
    common.check_sum_queries(parser, args)
    if args.render:
        return render(args.render, args.out)
    for name in ("decode_tokens", "repeats", "time_limit", "max_batch"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: {value} must be positive")
    if args.llama7b and not torch.cuda.is_available() and not args.quick:
        parser.error("--llama7b needs a CUDA GPU (add --quick to run its code path on a toy shape on CPU)")
    if args.llama7b:
        inner = args.inner or "inductor"
        policies = ("SnapKV",) if args.policies == list(kvfx.PRESETS) else tuple(args.policies)
        settings = Settings(models=("llama-7b-shaped",), policies=policies,
                            budgets=tuple(args.budgets or (0.35, 0.05)), contexts=tuple(args.contexts or (8192, 32768)),
                            decode_tokens=args.decode_tokens or 32, repeats=args.repeats or 1, inner=inner,
                            dtype="bfloat16", static=True,
                            mode=args.mode or ("reduce-overhead" if inner == "inductor" else None))
        if args.quick:
            settings = dataclasses.replace(settings, contexts=(64, 128), decode_tokens=4, repeats=1, dtype="float32")
    elif args.quick:
        settings = Settings(models=tuple(args.models or [common.QUICK_MODEL]), policies=tuple(args.policies),
                            budgets=tuple(args.budgets or (0.35,)), contexts=tuple(args.contexts or (64, 128)),
                            decode_tokens=4, repeats=1, inner=args.inner or "aot_eager", mode=args.mode)
    else:
        settings = Settings(models=tuple(args.models or common.REAL_MODELS), policies=tuple(args.policies),
                            budgets=tuple(args.budgets or (0.35,)), contexts=tuple(args.contexts or (1024, 2048)),
                            decode_tokens=args.decode_tokens or 16, repeats=args.repeats or 2,
                            inner=args.inner or "aot_eager", mode=args.mode)
    settings = dataclasses.replace(settings, sum_queries=args.sum_queries)
    started = time.perf_counter()
    data: dict[str, Any] = {"settings": dataclasses.asdict(settings), "machine": common.machine(), "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.llama7b:
        data["models"]["llama-7b-shaped"] = run_llama7b(settings, small=args.quick, time_limit=args.time_limit,
                                                        partial=args.out / "speed_llama7b.partial.json",
                                                        max_batch=args.max_batch or (4 if args.quick else 64))
    else:
        for name in settings.models:
            data["models"][name] = run_model(name, settings)
    data["seconds"] = round(time.perf_counter() - started, 1)
    stem = args.section or ("speed_llama7b" if args.llama7b else "speed")
    common.write_json(args.out / f"{stem}.json", data)
    _write_report(data, args.out, stem, refresh_doc=not args.quick)
    common.progress(f"[speed] done in {data['seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
