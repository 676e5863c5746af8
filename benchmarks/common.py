"""What quality.py and speed.py share: loading a model, the policy grid, cache
bytes, timing, and writing JSON, markdown and the generated parts of docs/results.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import kvfx
from kvfx.integrations.transformers import cache_bytes  # noqa: F401  (K, V and kvfx's slot state)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
RESULTS_DOC = ROOT / "docs" / "results.md"
REAL_MODELS = ("gemma3-270m", "smollm2-135m")
QUICK_MODEL = "llama"  # a kvfx.testing.zoo entry: random weights, byte tokenizer
BUDGETS = (0.5, 0.35, 0.2, 0.1, 0.05)


class ByteTokenizer:
    """Enough of a tokenizer for the tiny random zoo models (vocab 128): one token per ASCII byte."""

    bos_token = None
    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str = "pt"):
        ids = [min(b, 127) for b in text.encode("ascii", "replace")]
        return {"input_ids": torch.tensor([ids])}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("ascii", "replace")


def load(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """(model, tokenizer, one-line description) for a kvfx.models name, a local folder or GGUF, or a zoo name."""
    from kvfx.testing import zoo

    if name in zoo.ZOO:
        model = zoo.tiny_model(name, dtype=dtype)
        return model, ByteTokenizer(), f"{name}: tiny random kvfx.testing.zoo model (answers are noise)"
    from kvfx.models import load_model

    return load_model(name, dtype=dtype)


# Wrappers a benchmark's "A+B" names: A(B(...)), B a preset at the grid's budget.
WRAPPERS = {"CriticalKV": kvfx.CriticalKV, "ThinK": kvfx.ThinK}


# Policies built for the model's tokenizer (KVzip's repeat instruction is token ids).
FOR_TOKENIZER = {"KVzip": kvfx.KVzip}


def policy_grid(names: list[str], budget: float, shortest: int, retrieval_heads: tuple = (),
                sum_queries: int = 0, tokenizer=None) -> dict[str, kvfx.Policy]:
    """Each preset at ``budget``, its always-kept tokens (sinks, window) shrunk so
    they fit in the budget of the shortest prompt: a 256-token window would
    otherwise hold a 5% budget at 25% of a 1k prompt. ``sum_queries`` > 0: after
    each preset that sums the prompt's attention (H2O, KVMerger, ZeroMerge),
    the same preset again with its sums from the last ``sum_queries`` queries."""
    tokens = max(2, int(budget * shortest))
    grid = {}

    def shrunk(name: str) -> dict[str, Any]:
        defaults = kvfx.PRESETS[name]()
        return {"budget": budget, "sinks": min(defaults.sinks, tokens // 8),
                "window": max(1, min(defaults.window, tokens // 2)) if defaults.window else 0}

    for name in names:
        if name in FOR_TOKENIZER:               # kvpress's defaults (4 sinks), the instruction from the tokenizer
            grid[name] = FOR_TOKENIZER[name].for_tokenizer(tokenizer, budget=budget)
            continue
        base, _, scorer = name.partition("+")   # "KVMerger+SnapKV": KVMerger's merges guided by SnapKV's score
        if base in WRAPPERS:                    # "CriticalKV+SnapKV": SnapKV's score corrected by CriticalKV;
            # "ThinK+SnapKV": SnapKV's tokens, then half of each head's key channels zeroed (ThinK's defaults)
            grid[name] = WRAPPERS[base](kvfx.PRESETS[scorer](**shrunk(scorer)))
            continue
        defaults = kvfx.PRESETS[base]()
        fields: dict[str, Any] = shrunk(base)
        if scorer:
            fields["scorer"] = kvfx.PRESETS[scorer](**shrunk(scorer))
        if base == "RazorAttention":
            fields["retrieval_heads"] = tuple(retrieval_heads)
        grid[name] = type(defaults)(**fields)
        if sum_queries and hasattr(defaults, "sum_queries") and not scorer:
            grid[f"{name}, last {sum_queries} queries"] = type(defaults)(**fields, sum_queries=sum_queries)
    return grid


def add_sum_queries_argument(parser) -> None:
    parser.add_argument("--sum-queries", type=int, default=0, metavar="N",
                        help="also run each attention-sum preset (H2O, KVMerger, ZeroMerge) with its sums from the "
                             "last N queries only (the window approximation), beside the exact one")


def check_sum_queries(parser, args) -> None:
    if args.sum_queries < 0:
        parser.error(f"--sum-queries: {args.sum_queries} must be >= 0 (0: exact sums only)")


# Prompts of several lengths, decode steps, multi-token continuations and (Gemma) sliding-window
# layers filling up each add graph variants: allow more of them than dynamo's default 8, past
# which it would run the model's own forward, uncompressed. (dynamic=True would need fewer, but
# traces Gemma's attention scale as a value, which kvfx cannot rewrite.)
COMPILE_OPTIONS: dict = {}
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def fresh_compile(model, policy: kvfx.Policy, inner: str) -> None:
    torch._dynamo.reset()
    kvfx.restore(model)
    kvfx.compile(model, policy, inner=inner, **COMPILE_OPTIONS)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "kvfx_commit": _commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_doc(section: str, text: str, doc: Path = RESULTS_DOC) -> bool:
    """Replace the block between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->``
    in docs/results.md, so every table there comes from a run. False when the markers are absent."""
    if not doc.is_file():
        return False
    content = doc.read_text()
    pattern = re.compile(rf"(<!-- {section}:begin -->\n).*?(<!-- {section}:end -->)", re.S)
    if not pattern.search(content):
        return False
    doc.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), content))
    return True


def first_number(text: str) -> str:
    """The first run of digits in ``text`` ("" when none): a retrieval answer."""
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def list_of(kind):
    """An argparse type: comma-separated values of ``kind``."""
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_common_arguments(parser: argparse.ArgumentParser, budgets_help: str, inner: Optional[str]) -> None:
    """The options quality.py and speed.py share (``inner``: its default; None: the script decides)."""
    parser.add_argument("--models", type=list_of(str), help=f"comma-separated; default {','.join(REAL_MODELS)}")
    parser.add_argument("--policies", type=list_of(str), default=list(kvfx.PRESETS),
                        help="comma-separated presets; A+B: preset A guided by preset B's score (KVMerger+SnapKV), "
                             "or B wrapped by A (CriticalKV+SnapKV, ThinK+SnapKV)")
    parser.add_argument("--budgets", type=list_of(float), help=budgets_help)
    parser.add_argument("--inner", default=inner, choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--out", type=Path, default=RESULTS)


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    for p in args.policies:
        if p in FOR_TOKENIZER:
            continue
        base, plus, scorer = p.partition("+")
        if base in WRAPPERS and not plus:
            parser.error(f"--policies: {p!r}: {base} wraps a preset; name it as {base}+B (e.g. {base}+SnapKV)")
        for name in (scorer,) if base in WRAPPERS else (base, scorer) if plus else (base,):
            if name not in kvfx.PRESETS:
                parser.error(f"--policies: {name!r} is not a preset; presets are: {', '.join(kvfx.PRESETS)} "
                             "(A+B: preset A guided by preset B's score, for KVMerger, ZeroMerge and ChunkKV; "
                             f"or B wrapped by {', '.join(WRAPPERS)})")
        if plus and base not in WRAPPERS and "scorer" not in {f.name for f in dataclasses.fields(kvfx.PRESETS[base])}:
            parser.error(f"--policies: {p!r}: {base} takes no scorer (A+B works for KVMerger, ZeroMerge, ChunkKV)")
    for b in args.budgets or ():
        if not 0 < b < 1:
            parser.error(f"--budgets: {b} is not a fraction in (0, 1)")
