"""Time each kvfx kernel: Triton against its plain-torch reference, same device,
same run.

    python benchmarks/kernel_timings.py            # Llama-7B-shaped layer on CUDA (small on CPU)
    python benchmarks/kernel_timings.py --quick    # tiny shapes, a smoke run

Defaults on CUDA: 32 query heads, 32 KV heads and a GQA-8 variant (4 KV heads),
head dim 128, 32k tokens, bf16. Without CUDA the Triton side runs in Triton's
interpreter (TRITON_INTERPRET=1 is set here), so CPU timings only show that
everything runs; they say nothing about kernel speed.

GB/s counts the bytes a kernel must move at least (inputs read once, outputs
written once), for both implementations, so the reference's figure is an
"effective" bandwidth. Column sums and the window score are quadratic in the
length: their GB/s shows how far from memory-bound they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Callable

import torch

if not torch.cuda.is_available():
    # Read when a kernel is decorated: must precede the first kernel import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvfx.kernels import attention, column_sums, cosine, gather, merge, window_scores  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    length: int
    dim: int
    dtype: torch.dtype
    chunk: int  # queries of a column-sums prompt chunk (the reference holds [chunk, length] per head)
    window: int = 32  # SnapKV's observation window
    kernel: int = 5  # SnapKV's pooling

    def label(self) -> str:
        return f"B{self.batch} H{self.heads}/{self.kv_heads} S{self.length} D{self.dim} {str(self.dtype)[6:]}"


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        length, chunk, dtype, dim = (1024, 256, torch.bfloat16, 128) if quick else (32768, 1024, torch.bfloat16, 128)
        return [Shape(1, 32, kv, length, dim, dtype, chunk) for kv in (32, 4)]
    # The interpreter runs every Triton program in Python: keep it small.
    length, chunk = (48, 16) if quick else (256, 32)  # longer than the window: the prefix is pooled
    return [Shape(1, 4, kv, length, 64, torch.float32, chunk) for kv in (4, 1)]


@dataclasses.dataclass
class Case:
    kernel: str
    shape: Shape
    run: Callable[[], torch.Tensor]  # the public dispatcher
    reference: Callable[[], torch.Tensor]
    bytes: int


def cases(shape: Shape, device: torch.device) -> list[Case]:
    b, h, hkv, s, d, dt = shape.batch, shape.heads, shape.kv_heads, shape.length, shape.dim, shape.dtype
    e = torch.finfo(dt).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *size: torch.randn(*size, device=device, dtype=dt, generator=g)  # noqa: E731
    q_window, q_chunk, q_decode = rand(b, h, shape.window, d), rand(b, h, shape.chunk, d), rand(b, h, 1, d)
    k, v = rand(b, hkv, s, d), rand(b, hkv, s, d)
    valid = torch.ones(b, s, dtype=torch.bool, device=device)
    scale = d**-0.5
    kept = s // 2
    index = torch.rand(b, hkv, s, device=device, generator=g).argsort(-1)[..., :kept].sort(-1).values
    bias = torch.zeros(b, hkv, s - 1, device=device)
    scores_out = b * hkv * s * 4
    score = torch.rand(b, hkv, s, device=device, generator=g)
    # KVMerger-like sets: runs of 4 consecutive tokens; one residual group in 4 tokens for ZeroMerge-like means
    runs = (torch.arange(s, device=device) // 4).expand(b, hkv, s).contiguous()
    n_runs = (s + 3) // 4
    kept_bias = torch.zeros(b, hkv, s, device=device)
    return [
        Case(
            "window_attention", shape,
            lambda: window_scores.window_attention(q_window, k, valid, scale, shape.window, shape.kernel),
            lambda: window_scores.window_attention_reference(q_window, k, valid, scale, shape.window, shape.kernel),
            q_window.numel() * e + k.numel() * e + valid.numel() + scores_out,
        ),
        Case(
            "column_sums", shape,
            lambda: column_sums.column_sums(q_chunk, k, valid, scale, 0.99),
            lambda: column_sums.column_sums_reference(q_chunk, k, valid, scale, 0.99),
            q_chunk.numel() * e + k.numel() * e + valid.numel() + scores_out,
        ),
        Case(
            "adjacent_cosine", shape,
            lambda: cosine.adjacent_cosine(k),
            lambda: cosine.adjacent_cosine_reference(k),
            k.numel() * e + scores_out,
        ),
        Case(
            "gather_slots", shape,
            lambda: gather.gather_slots(k, index),
            lambda: gather.gather_slots_reference(k, index),
            2 * b * hkv * kept * d * e + index.numel() * 8,
        ),
        Case(
            "gaussian_merge (KVMerger)", shape,
            lambda: merge.gaussian_merge(k, v, score, runs, n_runs, 5.0)[0],
            lambda: merge.gaussian_merge_reference(k, v, score, runs, n_runs, 5.0)[0],
            2 * k.numel() * e + score.numel() * 4 + runs.numel() * 8 + 2 * b * hkv * n_runs * d * e,
        ),
        Case(
            "segment_mean (compensation / residual)", shape,
            lambda: merge.segment_mean(k, v, runs, n_runs)[0],
            lambda: merge.segment_mean_reference(k, v, runs, n_runs)[0],
            2 * k.numel() * e + runs.numel() * 8 + 2 * b * hkv * n_runs * d * e,
        ),
        Case(
            "gather_kv_bias (fused)", shape,
            lambda: gather.gather_kv_bias(k, v, kept_bias, index)[0],
            lambda: gather.gather_kv_bias_reference(k, v, kept_bias, index)[0],
            2 * 2 * b * hkv * kept * d * e + 2 * b * hkv * kept * 4 + index.numel() * 8,
        ),
        Case(
            "slot_attention (decode)", shape,
            lambda: attention.slot_attention(q_decode, k, v, bias, scale, 0.0),
            lambda: attention.slot_attention_reference(q_decode, k, v, bias, scale, 0.0),
            2 * q_decode.numel() * e + 2 * k.numel() * e + bias.numel() * 4,
        ),
    ]


def seconds(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3  # median, in ms
    fn()  # warm-up (first interpreter call decorates and caches)
    reps = 3
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def measure(case: Case, device: torch.device) -> dict:
    saved = os.environ.get("KVFX_KERNELS")
    os.environ["KVFX_KERNELS"] = "triton"
    out = case.run()
    t_triton = seconds(case.run, device)
    os.environ["KVFX_KERNELS"] = "reference"
    try:
        expected = case.reference()
        t_ref = seconds(case.reference, device)
        err = (out.float() - expected.float()).abs().max().item()
    except torch.OutOfMemoryError:  # the reference materialises what the kernel does not
        t_ref, err = math.nan, math.nan
    finally:
        os.environ.pop("KVFX_KERNELS")
        if saved is not None:
            os.environ["KVFX_KERNELS"] = saved
    return dict(t_triton=t_triton, t_ref=t_ref, err=err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--only", default="", help="run kernels whose name contains this")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = "compiled" if device.type == "cuda" else "interpreter: timings not meaningful"
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} (triton {mode})\n")
    print("| kernel | shape | triton ms | GB/s | reference ms | GB/s | speed-up | max abs err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes(device, args.quick):
        for case in cases(shape, device):
            if args.only not in case.kernel:
                continue
            r = measure(case, device)
            gbs = lambda t: case.bytes / t / 1e9  # noqa: E731
            print(
                f"| {case.kernel} | {shape.label()} | {r['t_triton'] * 1e3:.3f} | {gbs(r['t_triton']):.1f} "
                f"| {r['t_ref'] * 1e3:.3f} | {gbs(r['t_ref']):.1f} | {r['t_ref'] / r['t_triton']:.2f}x | {r['err']:.2e} |",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
