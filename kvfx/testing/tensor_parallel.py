"""Check kvfx under tensor parallelism: every preset on a model split over the
ranks (transformers' ``tp_plan="auto"``) against the same model in one
process, on every rank of a ``torchrun`` launch:

    torchrun --standalone --nproc-per-node 2 -m kvfx.testing.tensor_parallel            # gloo on the CPU
    torchrun --standalone --nproc-per-node 2 -m kvfx.testing.tensor_parallel --device cuda   # NCCL, one GPU per rank

Each rank loads a tiny random Llama (4 KV heads) twice, whole and split,
generates greedily through ``kvfx.compile`` with both, and compares the
tokens and, layer by layer, what each of its KV heads kept (how many slots,
and their keys) with the same heads of the whole model. Prints one JSON line
per preset and rank (``--out DIR``: a file per rank); exits 1 when any differs. ``--model DIR`` uses a saved
model instead (``--save DIR`` writes the tiny one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

import kvfx
from kvfx import store as slot_store
from kvfx.integrations.transformers_store import KvfxLayer
from kvfx.testing import generate

#: tiny-model fields of each preset (a 40-token prompt, 4 KV heads, 2 layers)
SMALL = {
    "StreamingLLM": dict(sinks=2), "SnapKV": dict(window=4), "KNorm": {}, "H2O": dict(window=4), "TOVA": {},
    "PyramidKV": dict(window=4, beta=2.0), "AdaKV": dict(window=4), "KVMerger": dict(exempt_layers=()),
    "ChunkKV": dict(window=4, chunk=4), "ZeroMerge": dict(residual=2, window=4),
    "KeyDiff": {}, "LagKV": dict(sinks=2, lag=8), "CUR": dict(sinks=2, local_window=8),
    "ExpectedAttention": dict(sinks=2, n_future_positions=16),
    # retrieval heads on both ranks of a 2-way split (rank 0 holds heads 0-1, rank 1 heads 2-3)
    "RazorAttention": dict(sinks=2, window=4, retrieval_heads=((0, 1), (1, 2), (1, 3))),
}


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False)


def save_tiny(directory: str) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(directory)


def kept(cache) -> list[list[torch.Tensor]]:
    """Per layer, per (batch row, KV head): the keys of the slots it holds."""
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, KvfxLayer) or not layer.is_initialized:
            layers.append([])
            continue
        store = layer.store
        width = int(store.lengths.max())
        keys = slot_store.gather(store, width)[0]
        rows = [(b, h) for b in range(keys.shape[0]) for h in range(keys.shape[1])]
        layers.append([keys[b, h, :int(store.lengths[b, h])] for b, h in rows])
    return layers


def compare(policy, whole, split, ids, steps: int, rank: int, world: int) -> dict:
    reference = generate(whole, ids, policy=policy, steps=steps)
    run = generate(split, ids, policy=policy, steps=steps)
    report = {"policy": type(policy).__name__, "rank": rank, "tokens": torch.equal(run.tokens, reference.tokens),
              "graph_breaks": run.graph_breaks, "differences": []}
    for layer, (mine, theirs) in enumerate(zip(kept(run.cache), kept(reference.cache))):
        local = len(mine)   # batch 1: one row per local KV head
        for h, keys in enumerate(mine):
            want = theirs[rank * local + h]
            if keys.shape != want.shape or not torch.allclose(keys, want, atol=1e-4, rtol=1e-4):
                report["differences"].append(f"layer {layer}, KV head {rank * local + h}: kept {keys.shape[0]} "
                                             f"slots, one process kept {want.shape[0]}"
                                             + ("" if keys.shape != want.shape else " (other keys)"))
    held = {len(layer) for layer in kept(run.cache) if layer}
    report["kv_heads_held"] = sorted(held)
    # Each rank must really hold its slice of the heads (else the check would compare one process with itself).
    report["ok"] = (report["tokens"] and not report["differences"] and run.graph_breaks == 0
                    and held == {whole.config.num_key_value_heads // world})
    return report


def explain_check(whole, split, ids, rank: int, world: int) -> dict:
    """``kvfx.explain`` on this rank: it names the rank's heads, and its bytes are the rank's share."""
    policy = kvfx.SnapKV(budget=0.5, window=4)
    mine, theirs = kvfx.explain(split, ids, policy=policy), kvfx.explain(whole, ids, policy=policy)
    line = mine.shard
    first = rank * whole.config.num_key_value_heads // world
    report = {"explain": line, "rank": rank, "bytes_full": mine.cache_bytes_full, "bytes_kept": mine.cache_bytes_kept,
              "one_process_bytes_full": theirs.cache_bytes_full, "one_process_bytes_kept": theirs.cache_bytes_kept}
    report["ok"] = (f"rank {rank} of {world} holds KV heads {first}.." in line
                    and mine.cache_bytes_full * world == theirs.cache_bytes_full
                    and 0 < mine.cache_bytes_kept < mine.cache_bytes_full)
    return report


def split_over_ranks() -> dict:
    """``from_pretrained`` arguments for transformers' own head split: ``distributed_config`` where
    transformers has it (``tp_plan=`` alone is deprecated there), ``tp_plan`` before."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(SMALL), help="comma-separated presets; default: all")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=6, help="greedy tokens after the prompt")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, the rank's GPU)")
    parser.add_argument("--model", help="a saved transformers model directory (default: the tiny Llama)")
    parser.add_argument("--save", help="write the tiny Llama to this directory and exit (no torchrun needed)")
    parser.add_argument("--out", help="also write each rank's reports to DIR/rank<r>.json")
    args = parser.parse_args(argv)
    if args.save:
        save_tiny(args.save)
        return 0
    from transformers import AutoModelForCausalLM

    cuda = args.device == "cuda"
    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.model
        if directory is None:   # every rank writes the same seeded model to its own folder, before the group exists
            directory = os.path.join(scratch, "tiny")
            save_tiny(directory)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        whole = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        split = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **split_over_ranks()).eval()
        ids = torch.randint(2, whole.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1)).to(device)
        for name in args.presets.split(","):
            policy = kvfx.PRESETS[name](budget=args.budget, **SMALL.get(name, {}))
            report = compare(policy, whole, split, ids, args.steps, rank, world)
            reports.append(report)
            print(json.dumps(report), flush=True)
        reports.append(explain_check(whole, split, ids, rank, world))
        print(json.dumps(reports[-1]), flush=True)
        failed = not all(r["ok"] for r in reports)
    if args.out:
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(reports, f, indent=1)
    torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
