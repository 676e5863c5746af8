"""Triton kernels of the segment reductions and the fused gather agree with
their references, and the seed policies keep the same slots with either.

Like ``tests/test_kernels.py``: the ``device`` fixture forces
``KVFX_KERNELS=triton``; CPU tensors run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before the first ``import triton`` of the process. When
an earlier module imported triton without it, the CPU tests skip here and
``test_cpu_merge_kernels_in_a_fresh_interpreter_process`` reruns them in a
subprocess.

Segment layouts follow the seeds: contiguous runs covering every slot
(KVMerger), one segment of scattered members (RazorAttention), members split
into contiguous groups (ZeroMerge), and sparse, interleaved ids that leave
segments and whole heads empty.
"""

import os
import subprocess
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Only without CUDA: on a GPU the rest of the session must not be interpreted.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import kvfx  # noqa: E402
from kvfx.kernels import dispatch, gather, merge  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Merged keys/values are float32 sums rounded once to the input dtype; the
# kernels only sum in another order than the reference.
OUT_TOL = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=2e-3, rtol=2e-3), BF16: dict(atol=1.6e-2, rtol=1.6e-2)}

# (dtype, head_dim, kv_heads, length, batch): every value of every axis appears.
CASES = [
    (F32, 64, 1, 17, 1),
    (F16, 80, 2, 17, 3),
    (BF16, 128, 8, 17, 1),
    (F32, 80, 8, 1, 3),
    (F16, 128, 1, 1, 1),
    (BF16, 64, 2, 1, 1),
    (F32, 128, 2, 130, 1),
    (F16, 64, 1, 130, 3),
    (BF16, 80, 2, 130, 1),
]
LAYOUTS = ["runs", "scattered", "groups", "sparse"]


def case_id(case):
    dtype, dim, hkv, length, batch = case
    return f"{str(dtype)[6:]}-d{dim}-h{hkv}-s{length}-b{batch}"


grid = pytest.mark.parametrize("dtype,dim,hkv,length,batch", CASES, ids=list(map(case_id, CASES)))
layouts = pytest.mark.parametrize("layout", LAYOUTS)



def segments(layout: str, batch: int, hkv: int, length: int) -> tuple[torch.Tensor, int]:
    """(seg [B, Hkv, S] int64, n_seg) shaped like one seed's segments."""
    shape = (batch, hkv, length)
    if layout == "runs":  # KVMerger: joins of neighbours, n_seg = S, the tail segments empty
        join = torch.rand(shape) < 0.6
        join[..., 0] = False
        return (~join).long().cumsum(-1) - 1, length
    if layout == "scattered":  # RazorAttention: the dropped tokens, anywhere
        return torch.where(torch.rand(shape) < 0.5, 0, -1), 1
    if layout == "groups":  # ZeroMerge: members split into r contiguous groups
        member = torch.rand(shape) < 0.6
        rank = member.long().cumsum(-1) - 1
        group = torch.div(rank * 3, member.sum(-1, keepdim=True).clamp_min(1), rounding_mode="floor")
        return torch.where(member, group, -1), 3
    # Interleaved ids 1 and 4 of 6: segments 0, 2, 3, 5 stay empty, and so does a whole head.
    seg = torch.where(torch.rand(shape) < 0.5, 1, 4)
    seg = torch.where(torch.rand(shape) < 0.3, -1, seg)
    seg[0, -1] = -1
    return seg, 6


def merge_inputs(dtype, dim, hkv, length, batch, device):
    k = torch.randn(batch, hkv, length, dim).to(dtype)
    v = torch.randn(batch, hkv, length, dim).to(dtype)
    # Few distinct scores, so pivots are decided by "first on ties"; -inf as padding scores.
    score = torch.randint(0, 4, (batch, hkv, length)).float()
    score = score.masked_fill(torch.rand(batch, hkv, length) < 0.1, float("-inf"))
    return k.to(device), v.to(device), score.to(device)


def assert_close(actual, expected, **tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tol)


# -- gaussian_merge (KVMerger) -------------------------------------------------


@grid
@layouts
def test_gaussian_merge_matches_reference(device, dtype, dim, hkv, length, batch, layout):
    k, v, score = merge_inputs(dtype, dim, hkv, length, batch, device)
    seg, n_seg = segments(layout, batch, hkv, length)
    sigma = dim**0.5  # |k_p - k_i|^2 ~ 2 dim: weights well inside (0, 1)
    out_k, out_v, count, pivot = merge.gaussian_merge(k, v, score, seg.to(device), n_seg, sigma)
    ref_k, ref_v, ref_count, ref_pivot = merge.gaussian_merge_reference(k, v, score, seg.to(device), n_seg, sigma)
    assert pivot.dtype == torch.int64 and torch.equal(pivot, ref_pivot)
    assert count.dtype == torch.float32 and torch.equal(count, ref_count)
    assert_close(out_k, ref_k, **OUT_TOL[dtype])
    assert_close(out_v, ref_v, **OUT_TOL[dtype])


def test_gaussian_merge_reads_strided_inputs_and_narrower_values(device):
    k = torch.randn(2, 17, 3, 64).transpose(1, 2).to(device)  # [B, Hkv, S, D], not contiguous
    v = torch.randn(2, 3, 17, 80).to(device)[..., :48]         # Dv != D, row stride 80
    score = torch.randn(2, 17, 3).transpose(1, 2).to(device)
    seg, n_seg = segments("runs", 2, 3, 17)
    expected = merge.gaussian_merge_reference(k, v, score, seg.to(device), n_seg, 5.0)
    actual = merge.gaussian_merge(k, v, score, seg.to(device), n_seg, 5.0)
    for a, e in zip(actual, expected):
        assert_close(a, e, **OUT_TOL[F32])


# -- segment_mean (RazorAttention, ZeroMerge) ------------------------------------


@grid
@layouts
def test_segment_mean_matches_reference(device, dtype, dim, hkv, length, batch, layout):
    k, v, _ = merge_inputs(dtype, dim, hkv, length, batch, device)
    seg, n_seg = segments(layout, batch, hkv, length)
    out_k, out_v, count = merge.segment_mean(k, v, seg.to(device), n_seg)
    ref_k, ref_v, ref_count = merge.segment_mean_reference(k, v, seg.to(device), n_seg)
    assert count.dtype == torch.float32 and torch.equal(count, ref_count)
    assert_close(out_k, ref_k, **OUT_TOL[dtype])
    assert_close(out_v, ref_v, **OUT_TOL[dtype])


def test_segment_mean_of_empty_segments_is_zero(device):
    k, v, _ = merge_inputs(F16, 64, 2, 17, 1, device)
    seg = torch.full((1, 2, 17), -1, device=device)
    seg[0, 1, 3:6] = 2
    out_k, out_v, count = merge.segment_mean(k, v, seg, 4)
    assert torch.equal(count[0, 0], torch.zeros(4, device=device))
    assert torch.equal(count[0, 1], torch.tensor([0.0, 0.0, 3.0, 0.0], device=device))
    assert not out_k[0, 0].any() and not out_v[0, 1, [0, 1, 3]].any()


# -- gather_kv_bias ----------------------------------------------------------


@grid
def test_gather_kv_bias_matches_reference(device, dtype, dim, hkv, length, batch):
    k, v, _ = merge_inputs(dtype, dim, hkv, length, batch, device)
    v = v[..., : dim // 2]  # Dv != D
    bias = torch.randn(batch, hkv, length).masked_fill(torch.rand(batch, hkv, length) < 0.2, float("-inf"))
    index = torch.rand(batch, hkv, length).argsort(-1)[..., : length // 2 + 1].sort(-1).values
    actual = gather.gather_kv_bias(k, v, bias.to(device), index.to(device))
    expected = gather.gather_kv_bias_reference(k, v, bias.to(device), index.to(device))
    for a, e in zip(actual, expected):
        assert a.is_contiguous() and a.dtype == e.dtype
        assert torch.equal(a, e)  # a copy: exact


def test_gather_kv_bias_reads_an_index_shared_by_heads(device):
    # ChunkKV keeps the same positions in every head: an expanded index (head stride 0).
    k, v, _ = merge_inputs(F32, 64, 4, 40, 2, device)
    bias = torch.randn(2, 1, 40).expand(2, 4, 40).to(device)
    index = torch.tensor([[0, 3, 4, 5, 20, 39], [1, 2, 3, 7, 8, 9]]).to(device)[:, None].expand(2, 4, 6)
    actual = gather.gather_kv_bias(k, v, bias, index)
    for a, e in zip(actual, gather.gather_kv_bias_reference(k, v, bias, index)):
        assert torch.equal(a, e)


# -- end to end: the seed policies ---------------------------------------------

POLICIES = {
    "kvmerger": kvfx.KVMerger(budget=0.5, exempt_layers=(), count_bias=True),
    "chunkkv": kvfx.ChunkKV(budget=0.5, window=4, chunk=4),
    "razor": kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((1, 0),)),
    "zeromerge": kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
    "snapkv": kvfx.SnapKV(budget=0.5, window=4),
}
policies = pytest.mark.parametrize("name", list(POLICIES))


def prompt(batch: int, device, length: int = 40, dim: int = 16):
    """q [B, 4, S, D], k/v [B, 2, S, D], valid [B, S] with left padding in row 0.
    Keys share a direction per head, so some neighbours pass KVMerger's cosine threshold."""
    q = torch.randn(batch, 4, length, dim)
    k = torch.randn(batch, 2, 1, dim) + 0.6 * torch.randn(batch, 2, length, dim)
    v = torch.randn(batch, 2, length, dim)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[0, :3] = False
    return q.to(device), k.to(device), v.to(device), valid.to(device)


def assert_same_cache(triton_out, reference_out):
    for a, e in zip(triton_out, reference_out):
        if a.dtype == torch.int64:
            assert torch.equal(a, e)
        else:
            assert_close(a, e, atol=1e-5, rtol=1e-5)


def compress_both(policy, monkeypatch, q, k, v, valid):
    scale = q.shape[-1] ** -0.5
    monkeypatch.setenv("KVFX_KERNELS", "reference")
    expected = policy.compress(q, k, v, valid, scale, layer=1, n_layers=2)
    monkeypatch.setenv("KVFX_KERNELS", "triton")
    actual = policy.compress(q, k, v, valid, scale, layer=1, n_layers=2)
    return actual, expected


@policies
@pytest.mark.parametrize("batch", [1, 2])
def test_seed_policy_keeps_the_same_slots_with_triton_kernels(device, monkeypatch, name, batch):
    q, k, v, valid = prompt(batch, device)
    actual, expected = compress_both(POLICIES[name], monkeypatch, q, k, v, valid)
    assert torch.equal(actual.index, expected.index)
    assert_same_cache((actual.k, actual.v, actual.slot_bias, actual.slot_score),
                      (expected.k, expected.v, expected.slot_bias, expected.slot_score))


def test_kvmerger_test_prompt_merges_sets(device, monkeypatch):
    # Guards the end-to-end test above: it must see merged slots, not only evictions.
    q, k, v, valid = prompt(2, device)
    actual, _ = compress_both(POLICIES["kvmerger"], monkeypatch, q, k, v, valid)
    assert (actual.slot_bias > 0).any()


def test_zeromerge_steps_match_with_triton_kernels(device, monkeypatch):
    policy = POLICIES["zeromerge"]
    q, k, v, valid = prompt(2, device)
    scale = q.shape[-1] ** -0.5
    states = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("KVFX_KERNELS", mode)
        torch.manual_seed(1)
        out = policy.compress(q, k, v, valid, scale, layer=1, n_layers=2)
        state = (out.k, out.v, out.slot_bias, out.slot_score)
        history = []
        for _ in range(4):
            new_q, new_k, new_v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
            cache_k, cache_v, bias, score = state
            state = policy.step(new_q.to(device), torch.cat([cache_k, new_k.to(device)], 2),
                                torch.cat([cache_v, new_v.to(device)], 2), torch.nn.functional.pad(bias, (0, 1)),
                                torch.nn.functional.pad(score, (0, 1)), scale, layer=1, n_layers=2)
            history.append(state)
        states[mode] = history
    for actual, expected in zip(states["triton"], states["reference"]):
        assert_same_cache(actual, expected)


def test_compiled_generation_is_the_same_with_triton_kernels(device, monkeypatch):
    # One policy keeps the interpreter quick: ZeroMerge runs the most kernels
    # (segment_mean and column_sums at prefill, query_attention and gather every
    # step, slot_attention throughout); the tiny model's keys are too dissimilar
    # for KVMerger to merge anything here.
    from kvfx.testing import generate
    from kvfx.testing.zoo import tiny_model

    ids = torch.randint(2, 100, (1, 24))
    runs = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("KVFX_KERNELS", mode)
        runs[mode] = generate(tiny_model("llama").to(device), ids.to(device), policy=POLICIES["zeromerge"], steps=4)
    assert torch.equal(runs["triton"].tokens, runs["reference"].tokens)
    for actual, expected in zip(runs["triton"].cache.layers, runs["reference"].cache.layers):
        assert_close(actual.keys, expected.keys, atol=1e-5, rtol=1e-5)
        assert_close(actual.values, expected.values, atol=1e-5, rtol=1e-5)
        (*_, bias, score), (*_, expected_bias, expected_score) = actual.dense(), expected.dense()
        assert (bias > 0).any()  # merged slots: the check is not vacuous
        assert torch.equal(bias, expected_bias)
        assert_close(score, expected_score, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    dispatch.language_interpreted(), reason="triton is interpreted in this process: the CPU tests ran here"
)
def test_cpu_merge_kernels_in_a_fresh_interpreter_process():
    env = {k: v for k, v in os.environ.items() if k != "KVFX_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
