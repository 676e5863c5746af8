"""Every GPU check of a device session in one run, each step in its own process with a time limit,
one JSON at the end (a failing or timed-out step does not cost the others).

    python benchmarks/gpu_checks.py --out OUT             # on the device: kernels, prompt scores, Llama-7B speed
    python benchmarks/gpu_checks.py --out OUT --quick     # the same code paths on toy shapes (CPU: a rehearsal)

Steps:
  1. ``tests``: the kernel tests on CUDA (every kernel against its plain-torch reference);
  2. ``prompt_scores``: one Llama-7B-shaped layer (32 heads of 128, bf16) at 8k and 32k tokens:
     the model's causal attention (SDPA), ``kvfx::attention_lse`` (the same attention returning
     each query's log-sum-exp), and the column sums of H2O/KVMerger/ZeroMerge in two passes and in
     one pass from that log-sum-exp -- what the attention-sum scorers add to a prefill;
  3. ``speed``: ``benchmarks/speed.py --llama7b`` at 32k with the policies the acceptance names
     (window scorers, attention-sum scorers, ZeroMerge and TOVA at 5%), Inductor + CUDA graphs.
Writes OUT/gpu_checks.json (each step's exit status, seconds and output tail; prompt_scores'
timings) and OUT/speed_llama7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_step(name: str, argv: list[str], limit: float, results: dict, env: dict | None = None) -> None:
    started = time.perf_counter()
    print(f"[gpu_checks] {name}: {' '.join(argv)} (limit {limit:.0f}s)", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, **(env or {})})
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        out += (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    seconds = round(time.perf_counter() - started, 1)
    results[name] = {"rc": rc, "seconds": seconds, "tail": out[-4000:]}
    print(f"[gpu_checks] {name}: rc={rc} in {seconds}s\n{out[-1500:]}", file=sys.stderr, flush=True)


def prompt_scores(quick: bool) -> dict:
    """Time the prompt's attention and the column sums on one layer (run in a child process)."""
    import torch

    import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx)
    from kvfx.kernels.column_sums import column_sums

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, dim = (32, 128) if not quick else (4, 32)
    lengths = (8192, 32768) if not quick else (128, 256)

    def timed(fn, reps: int = 5) -> float:
        fn()  # warm (autotuning, compilation)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    rows = {}
    for kv_heads in (heads, heads // 4):
        for n in lengths:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, heads, n, dim, device=device, dtype=dtype, generator=g)
            k = torch.randn(1, kv_heads, n, dim, device=device, dtype=dtype, generator=g)
            v = torch.randn_like(k)
            valid = torch.ones(1, n, dtype=torch.bool, device=device)
            scale = dim ** -0.5
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=True, scale=scale, enable_gqa=kv_heads != heads)
            _, lse = torch.ops.kvfx.attention_lse(q, k, v, scale)
            two = column_sums(q, k, valid, scale)
            one = column_sums(q, k, valid, scale, lse=lse)
            row = {
                "attention_s": timed(sdpa),
                "attention_lse_s": timed(lambda: torch.ops.kvfx.attention_lse(q, k, v, scale)),
                "column_sums_two_pass_s": timed(lambda: column_sums(q, k, valid, scale)),
                "column_sums_one_pass_s": timed(lambda: column_sums(q, k, valid, scale, lse=lse)),
                "max_rel_diff": float(((one - two).abs().max() / two.abs().max()).item()),
                "lse_empty": lse.numel() == 0,
            }
            row["prefill_attention_ratio_two_pass"] = (row["attention_s"] + row["column_sums_two_pass_s"]) / row["attention_s"]
            row["prefill_attention_ratio_one_pass"] = (row["attention_lse_s"] + row["column_sums_one_pass_s"]) / row["attention_s"]
            rows[f"H{heads}/{kv_heads} S{n} D{dim} {str(dtype)[6:]}"] = row
            print(json.dumps({k2: rows[k2] for k2 in list(rows)[-1:]}), file=sys.stderr, flush=True)
            del q, k, v, lse, one, two
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="toy shapes: the code paths only")
    parser.add_argument("--speed-limit", type=float, default=330.0, help="seconds for the speed step")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip (tests, prompt_scores, speed)")
    parser.add_argument("--scores-only", action="store_true", help=argparse.SUPPRESS)  # the child of step 2
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scores_only:
        (args.out / "prompt_scores.json").write_text(json.dumps(prompt_scores(args.quick), indent=1) + "\n")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {}
    py = sys.executable
    if "tests" not in skip:
        tests = ["tests/test_kernels.py", "tests/test_kernels_merge.py"]
        select = ["-k", "cuda"] if not args.quick else ["-k", "lse"]
        run_step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *select], 120, results)
    if "prompt_scores" not in skip:
        run_step("prompt_scores", [py, str(Path(__file__)), "--out", str(args.out), "--scores-only"]
                 + (["--quick"] if args.quick else []), 90, results)
        scores = args.out / "prompt_scores.json"
        if scores.exists():
            results["prompt_scores"]["result"] = json.loads(scores.read_text())
    if "speed" not in skip:
        speed = [py, "benchmarks/speed.py", "--llama7b", "--out", str(args.out), "--max-batch", "1",
                 "--policies", "StreamingLLM,SnapKV,H2O,KVMerger,TOVA,ZeroMerge", "--budgets", "0.05",
                 "--time-limit", str(max(args.speed_limit - 90, 30))]
        speed += ["--quick"] if args.quick else ["--contexts", "32768"]
        run_step("speed", speed, args.speed_limit, results)
    (args.out / "gpu_checks.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
