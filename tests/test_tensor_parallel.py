"""kvfx under tensor parallelism: ``torchrun`` launches ranks (gloo, CPU) that
split a tiny Llama's KV heads with transformers' ``tp_plan="auto"``; on every
rank each preset must keep, head by head, what one process keeps, and give
the same tokens (``kvfx.testing.tensor_parallel``)."""

import json
import subprocess
import sys

import pytest
import torch

import kvfx
from kvfx.testing.tensor_parallel import SMALL

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed to launch ranks")


def _launch(tmp_path, ranks: int, presets: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "kvfx.testing.tensor_parallel", "--presets", ",".join(presets), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    files = sorted(tmp_path.glob("rank*.json"))
    assert len(files) == ranks, f"{len(files)} of {ranks} ranks reported; stderr:\n{done.stderr[-4000:]}"
    reports = [r for f in files for r in json.loads(f.read_text())]
    assert done.returncode == 0 or not all(r["ok"] for r in reports), done.stderr[-4000:]
    return reports


# One preset of each way a rank splits a policy: per token, across heads, whole
# heads, continuous merging, lent rotary inputs (KVFX_SLOW=1 runs every preset).
TWO_RANKS_IN_CI = ["SnapKV", "AdaKV", "ChunkKV", "RazorAttention", "ZeroMerge", "ExpectedAttention"]


@pytest.mark.parametrize("presets", [
    pytest.param(TWO_RANKS_IN_CI, id="one-of-each-kind"),
    pytest.param(sorted(kvfx.PRESETS), id="every-preset", marks=pytest.mark.slow)])
def test_every_preset_on_two_ranks_keeps_what_one_process_keeps(tmp_path, presets):
    assert set(SMALL) == set(kvfx.PRESETS)   # a new preset joins this check
    reports = _launch(tmp_path, 2, presets)
    checked = {(r["policy"], r["rank"]) for r in reports if "policy" in r}
    assert checked == {(name, rank) for name in presets for rank in (0, 1)}
    bad = [r for r in reports if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    for r in reports:
        if "explain" in r:   # kvfx.explain on a rank: its heads, and half of one process's full cache
            assert r["explain"].startswith(f"tensor parallel: rank {r['rank']} of 2 holds KV heads {2 * r['rank']}..")
            assert 2 * r["bytes_full"] == r["one_process_bytes_full"]


@pytest.mark.parametrize("presets", [
    pytest.param(["AdaKV"], id="AdaKV"),
    pytest.param(["ChunkKV", "AdaKV", "RazorAttention"], id="every-cross-head-preset", marks=pytest.mark.slow)])
def test_cross_head_presets_on_four_ranks_one_kv_head_each(tmp_path, presets):
    reports = _launch(tmp_path, 4, presets)
    assert {r["rank"] for r in reports} == {0, 1, 2, 3}
    bad = [r for r in reports if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    assert all(r["kv_heads_held"] == [1] for r in reports if "policy" in r)


def test_a_rank_numbers_the_retrieval_heads_it_holds_from_its_first():
    from kvfx.distributed import TensorParallel

    razor = kvfx.RazorAttention(budget=0.5, sinks=2, window=4, retrieval_heads=((0, 1), (0, 2), (1, 3)))
    ranks = [TensorParallel(razor, rank=r, world=2, kv_heads=4) for r in (0, 1)]
    assert [p.full_heads(0) for p in ranks] == [(1,), (0,)]
    assert [p.full_heads(1) for p in ranks] == [(), (1,)]
    assert ranks[1].head_slots(100, 1, 2, 2)[1] == 100 > ranks[1].head_slots(100, 1, 2, 2)[0]


def test_a_shared_budget_leaves_a_rank_room_for_the_whole_layers_share():
    from kvfx.distributed import TensorParallel

    ada = kvfx.AdaKV(budget=0.25, window=4)
    alone, rank = ada.store_pages(64, 0, 1, 2, 16), TensorParallel(ada, rank=0, world=2, kv_heads=4)
    # one process of 4 heads: 4 x 16 slots; a rank's 2 heads may take all 64 of them
    assert rank.store_pages(64, 0, 1, 2, 16)[0] >= 64 // 16 > alone[0]


@pytest.mark.parametrize("rank, world, heads", [(2, 2, 4), (0, 3, 4), (0, 0, 4)])
def test_a_split_that_does_not_divide_the_heads_is_refused(rank, world, heads):
    from kvfx.distributed import TensorParallel

    with pytest.raises(ValueError, match="KV heads to split evenly"):
        TensorParallel(kvfx.SnapKV(budget=0.5), rank=rank, world=world, kv_heads=heads)
