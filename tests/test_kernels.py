"""Triton kernels agree with their plain-torch references.

Each test forces ``KVFX_KERNELS=triton`` through the ``device`` fixture: on CPU
tensors the kernels run in Triton's interpreter, and on CUDA (when there is
one) compiled, against the same references.

The interpreter needs ``TRITON_INTERPRET=1`` before the first ``import triton``
of the process (triton.language's own helpers are built then). This module
sets it when it is imported first; in a pytest session where an earlier module
already imported triton (``import kvfx`` does), the CPU tests skip here and
``test_cpu_kernels_in_a_fresh_interpreter_process`` runs them in a subprocess
instead. Setting the variable at the top of ``tests/conftest.py`` avoids that
detour.

The interpreter runs every program in Python, so shapes are small and each
axis (dtype, head dim, GQA ratio, length, batch) is covered by a hand-picked
set of cases rather than the full product.
"""

import importlib
import math
import os
import subprocess
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Only without CUDA: on a GPU the rest of the session must not be interpreted.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvfx.kernels import attention, column_sums, cosine, dispatch, gather, window_scores  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Low-precision outputs may differ from the reference by one rounding of the
# float32 result; float32 outputs differ only by summation order.
OUT_TOL = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=2e-3, rtol=2e-3), BF16: dict(atol=1.6e-2, rtol=1.6e-2)}
# Score kernels return float32 whatever the input: products of upcast fp16/bf16
# values are exact in float32, so every dtype meets a float32 tolerance.
SCORE_TOL = dict(atol=1e-5, rtol=1e-5)

# (dtype, head_dim, groups, length, batch): every value of every axis appears.
CASES = [
    (F32, 64, 1, 17, 1),
    (F16, 80, 2, 17, 3),
    (BF16, 128, 4, 17, 1),
    (F32, 80, 8, 1, 3),
    (F16, 128, 1, 1, 1),
    (BF16, 64, 8, 17, 3),
    (F32, 128, 2, 130, 1),
    (F16, 64, 4, 130, 1),
    (BF16, 80, 1, 130, 3),
    (BF16, 128, 8, 1, 1),
]
# A realistic length, for the kernels whose cost is linear in it; the
# quadratic score kernels take ~10 s each there in the interpreter.
LONG_CASES = CASES + [(F16, 80, 2, 1000, 1)]


def case_id(case):
    dtype, dim, groups, length, batch = case
    return f"{str(dtype)[6:]}-d{dim}-g{groups}-s{length}-b{batch}"


grid = pytest.mark.parametrize("dtype,dim,groups,length,batch", CASES, ids=list(map(case_id, CASES)))
long_grid = pytest.mark.parametrize("dtype,dim,groups,length,batch", LONG_CASES, ids=list(map(case_id, LONG_CASES)))



def kv_heads(batch: int) -> int:
    # Two KV heads exercise the head offsets; one keeps batch-3 cases quick.
    return 2 if batch == 1 else 1


def randn(*size, dtype=F32, device="cpu"):
    # Drawn on the CPU so that both devices test the same numbers.
    return torch.randn(*size, dtype=dtype).to(device)


def make_valid(batch: int, length: int, device) -> torch.Tensor:
    """Left padding in row 0, a hole in row 1: both masks the model produces."""
    valid = torch.ones(batch, length, dtype=torch.bool)
    if length > 4:
        valid[0, :3] = False
        if batch > 1:
            valid[1, length // 2 : length // 2 + 2] = False
    return valid.to(device)


def make_qk(dtype, dim, groups, length, batch, q_len, device):
    hkv = kv_heads(batch)
    return randn(batch, hkv * groups, q_len, dim, dtype=dtype, device=device), randn(
        batch, hkv, length, dim, dtype=dtype, device=device
    )


def assert_close(actual, expected, **tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tol)


# -- window_attention (SnapKV) -------------------------------------------------


@grid
def test_window_attention_matches_reference(device, dtype, dim, groups, length, batch):
    # Windows shorter and longer than the prompt; pooling off, and wider than
    # a short prompt.
    window, kernel = {64: (8, 5), 80: (32, 1), 128: (3, 7)}[dim]
    q, k = make_qk(dtype, dim, groups, length, batch, min(length, 16), device)
    valid = make_valid(batch, length, device)
    expected = window_scores.window_attention_reference(q, k, valid, dim**-0.5, window, kernel)
    assert_close(window_scores.window_attention(q, k, valid, dim**-0.5, window, kernel), expected, **SCORE_TOL)


def test_window_attention_split_keys_match_reference(device):
    q, k = make_qk(F32, 64, 2, 130, 1, 8, device)
    valid = make_valid(1, 130, device)
    expected = window_scores.window_attention_reference(q, k, valid, 0.125, 8, 5)
    actual = dispatch.triton_module("window_scores").window_attention(q, k, valid, 0.125, 8, 5, splits=3)
    assert_close(actual, expected, **SCORE_TOL)


def snapkv_by_hand(q, k, window, kernel, scale):
    """The SnapKV authors' scoring, written out: softmax of the last ``window``
    queries, summed over them, the prefix pooled with zero padding, GQA mean."""
    b, h, s, _ = q.shape
    hkv = k.shape[1]
    kk = k.repeat_interleave(h // hkv, dim=1)
    logits = q[:, :, -window:] @ kk.transpose(-1, -2) * scale
    causal = torch.arange(s)[None, :] <= torch.arange(s - window, s)[:, None]
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    prefix = torch.nn.functional.avg_pool1d(attn[..., : s - window].sum(-2), kernel, 1, kernel // 2,
                                            count_include_pad=True)
    return prefix.view(b, hkv, h // hkv, s - window).mean(2)


@pytest.mark.parametrize("groups,kernel", [(1, 5), (4, 7), (2, 1)])
def test_window_attention_reference_pools_the_prefix_as_snapkv_does(groups, kernel):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2 * groups, 30, 16), torch.randn(1, 2, 30, 16)
    got = window_scores.window_attention_reference(q, k, torch.ones(1, 30, dtype=torch.bool), 0.25, 8, kernel)
    assert_close(got[..., :22], snapkv_by_hand(q, k, 8, kernel, 0.25), **SCORE_TOL)


def test_window_attention_of_a_left_padded_row_equals_the_row_alone():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[:, :6] = False
    padded = window_scores.window_attention_reference(q, k, valid, 0.25, 8, 5)
    alone = window_scores.window_attention_reference(q[:, :, 6:], k[:, :, 6:], valid[:, 6:], 0.25, 8, 5)
    assert_close(padded[..., 6:], alone, **SCORE_TOL)


# -- column_sums (H2O) ---------------------------------------------------------


@grid
def test_column_sums_matches_reference(device, dtype, dim, groups, length, batch):
    # Whole prompts when short; the last few queries of a long one, which
    # keeps the interpreter quick and exercises the query offset.
    q, k = make_qk(dtype, dim, groups, length, batch, length if length <= 17 else 6, device)
    valid = make_valid(batch, length, device)
    for decay in (1.0, 0.9):
        expected = column_sums.column_sums_reference(q, k, valid, dim**-0.5, decay)
        assert_close(column_sums.column_sums(q, k, valid, dim**-0.5, decay), expected, **SCORE_TOL)


def test_column_sums_reference_is_the_same_in_query_chunks():
    # Long prompts are summed a few query rows at a time; the rows are independent.
    q, k = make_qk(F32, 16, 2, 40, 2, 30, "cpu")  # the last 30 queries of 40 keys
    valid = make_valid(2, 40, "cpu")
    whole = column_sums.column_sums_reference(q, k, valid, 0.25, 0.9, chunk_rows=30)
    for rows in (1, 3, 7):
        assert_close(column_sums.column_sums_reference(q, k, valid, 0.25, 0.9, chunk_rows=rows), whole, **SCORE_TOL)


def dense_column_sums(q, k, valid, scale, decay):
    """The definition, on the whole attention matrix at once: causal softmax
    over the valid keys, rows weighted by decay^age, summed per KV head."""
    h, hkv, s, sq = q.shape[1], k.shape[1], k.shape[2], q.shape[2]
    logits = q.double() @ k.double().repeat_interleave(h // hkv, 1).transpose(-1, -2) * scale
    pos = torch.arange(s)
    visible = (pos[None, :] <= pos[s - sq:, None]) & valid[:, None, None, :]
    attn = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # a row seeing nothing: 0
    age = decay ** torch.arange(sq - 1, -1, -1, dtype=torch.float64)
    sums = (attn * age[:, None]).sum(-2)  # [B, H, S]
    return sums.view(q.shape[0], hkv, h // hkv, s).sum(2).float()


@pytest.mark.parametrize("groups", [1, 3])
def test_column_sums_reference_equals_the_dense_definition(groups):
    # Both paths of the chunked reference (softmax per chunk; one pass from the
    # attention's lse) against the whole matrix, with left padding and chunks
    # that cut the causal diagonal at odd places.
    q, k = make_qk(F32, 16, groups, 37, 2, 29, "cpu")  # the last 29 queries of 37 keys
    valid = make_valid(2, 37, "cpu")
    valid[1, :11] = False
    expected = dense_column_sums(q, k, valid, 0.3, 0.95)
    lse = causal_lse(q, k, valid, 0.3)
    for rows in (0, 1, 4, 29):
        assert_close(column_sums.column_sums_reference(q, k, valid, 0.3, 0.95, chunk_rows=rows), expected, **SCORE_TOL)
        actual = column_sums.column_sums_reference(q, k, valid, 0.3, 0.95, chunk_rows=rows, lse=lse)
        assert_close(actual, expected, **SCORE_TOL)


def test_column_sums_split_keys_match_reference(device):
    q, k = make_qk(F16, 80, 4, 130, 1, 5, device)
    valid = make_valid(1, 130, device)
    expected = column_sums.column_sums_reference(q, k, valid, 0.1, 0.5)
    actual = dispatch.triton_module("column_sums").column_sums(q, k, valid, 0.1, 0.5, splits=4)
    assert_close(actual, expected, **SCORE_TOL)


def test_column_sums_queries_seeing_only_padding_contribute_nothing(device):
    q, k = make_qk(F32, 64, 1, 8, 1, 8, device)
    valid = torch.tensor([[False] * 5 + [True] * 3], device=device)
    expected = column_sums.column_sums_reference(q, k, valid, 0.125)
    assert_close(column_sums.column_sums(q, k, valid, 0.125), expected, **SCORE_TOL)


def causal_lse(q, k, valid, scale):
    """Each query's log-sum-exp over the keys it sees (causal, valid), -inf where none."""
    h, s, sq = q.shape[1], k.shape[2], q.shape[2]
    logits = q.float() @ k.float().repeat_interleave(h // k.shape[1], 1).transpose(-1, -2) * scale
    pos = torch.arange(s, device=k.device)
    visible = (pos[None, :] <= pos[s - sq:, None]) & valid[:, None, None, :]
    return logits.masked_fill(~visible, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_column_sums_in_one_pass_from_the_attention_lse_equal_the_two_pass_sums(device, dtype):
    q, k = make_qk(dtype, 32, 2, 21, 2, 21, device)
    valid = make_valid(2, 21, device)
    valid[1, :4] = False  # left padding: those queries see nothing (lse -inf) and must add nothing
    lse = causal_lse(q, k, valid, 0.2)
    assert torch.isinf(lse[1, :, :4]).all()
    for decay in (1.0, 0.9):
        expected = column_sums.column_sums_reference(q, k, valid, 0.2, decay)
        assert_close(column_sums.column_sums_reference(q, k, valid, 0.2, decay, lse=lse), expected, **SCORE_TOL)
        assert_close(column_sums.column_sums(q, k, valid, 0.2, decay, lse=lse), expected, **SCORE_TOL)
    # The sums do read the given normaliser: a wrong one scales them.
    shifted = column_sums.column_sums(q, k, valid, 0.2, lse=lse + math.log(2.0))
    assert_close(shifted * 2, column_sums.column_sums_reference(q, k, valid, 0.2), **SCORE_TOL)


@pytest.mark.parametrize("groups", [1, 3])
def test_attention_lse_op_is_causal_sdpa_and_its_log_sum_exp(device, groups):
    import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx)

    dtype = torch.bfloat16 if device.type == "cuda" else F32
    q, k = make_qk(dtype, 64, groups, 33, 2, 33, device)
    v = torch.randn_like(k)
    out, lse = torch.ops.kvfx.attention_lse(q, k, v, 0.15)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.15,
                                                                enable_gqa=groups > 1)
    assert_close(out.float(), expected.float(), atol=2e-2 if dtype != F32 else 1e-5, rtol=0)
    valid = torch.ones(2, 33, dtype=torch.bool, device=device)
    assert_close(lse, causal_lse(q, k, valid, 0.15), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("decay, queries", [(1.0, 0), (0.9, 0), (1.0, 5), (0.95, 40)])
def test_attention_with_column_sums_is_causal_sdpa_and_the_dense_column_sums(groups, decay, queries):
    """The CPU's one-pass prompt attention (``kvfx::attention_column_sums``):
    its output is SDPA's, its sums the dense definition's for the same
    (decay, queries), whatever the chunking (chunks cutting the diagonal, one
    chunk, one query per chunk)."""
    import kvfx.ops  # noqa: F401  (registers torch.ops.kvfx)

    q, k = make_qk(F32, 16, groups, 33, 2, 33, torch.device("cpu"))
    v = torch.randn(2, k.shape[1], 33, 24)   # values wider than keys
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.15,
                                                                enable_gqa=groups > 1)
    valid = torch.ones(2, 33, dtype=torch.bool)
    scored = q[:, :, -queries:] if 0 < queries < 33 else q
    dense = dense_column_sums(scored, k, valid, 0.15, decay)
    for rows in (0, 1, 7, 64):
        out, sums = column_sums.attention_with_column_sums(q, k, v, 0.15, decay, queries, chunk_rows=rows)
        assert_close(out, expected, atol=1e-5, rtol=0)
        assert_close(sums, dense, **SCORE_TOL)
    out, sums = torch.ops.kvfx.attention_column_sums(q, k, v, 0.15, decay, queries)
    assert_close(out, expected, atol=1e-5, rtol=0)
    assert_close(sums, dense, **SCORE_TOL)


# -- adjacent_cosine (KVMerger) ------------------------------------------------


@long_grid
def test_adjacent_cosine_matches_reference(device, dtype, dim, groups, length, batch):
    k = randn(batch, kv_heads(batch) * groups, length, dim, dtype=dtype, device=device)
    if length > 3:
        k[..., 2, :] = 0  # a zero key: the eps clamp decides its cosine
    assert_close(cosine.adjacent_cosine(k), cosine.adjacent_cosine_reference(k), **SCORE_TOL)


def test_adjacent_cosine_reads_strided_keys(device):
    k = randn(2, 17, 3, 64, device=device).transpose(1, 2)  # [B, Hkv, S, D], not contiguous
    assert_close(cosine.adjacent_cosine(k), cosine.adjacent_cosine_reference(k), **SCORE_TOL)


# -- gather_slots --------------------------------------------------------------


@long_grid
def test_gather_slots_matches_reference(device, dtype, dim, groups, length, batch):
    x = randn(batch, kv_heads(batch) * groups, length, dim, dtype=dtype, device=device)
    kept = length // 2 + 1
    index = torch.rand(batch, x.shape[1], length).argsort(-1)[..., :kept].sort(-1).values.to(device)
    out = gather.gather_slots(x, index)
    assert out.is_contiguous()
    assert torch.equal(out, gather.gather_slots_reference(x, index))  # a copy: exact


# -- slot_attention ------------------------------------------------------------


def make_slot_bias(batch, hkv, past, device):
    """0 for plain slots, -inf for padding, log(count) for merged slots."""
    bias = torch.zeros(batch, hkv, past)
    if past > 4:
        bias[0, :, :2] = float("-inf")
        bias[..., -3] = math.log(3.0)
    return bias.to(device)


@long_grid
@pytest.mark.parametrize("q_len", [1, 3], ids=["decode", "chunk"])
def test_slot_attention_matches_reference(device, dtype, dim, groups, length, batch, q_len):
    q_len = min(q_len, length)
    softcap = 30.0 if groups % 2 == 0 else 0.0  # Gemma-2 caps attention logits at 50
    hkv = kv_heads(batch)
    q = randn(batch, hkv * groups, q_len, dim, dtype=dtype, device=device)
    k, v = randn(2, batch, hkv, length, dim, dtype=dtype, device=device).unbind(0)
    bias = make_slot_bias(batch, hkv, length - q_len, device)
    expected = attention.slot_attention_reference(q, k, v, bias, dim**-0.5, softcap)
    assert_close(attention.slot_attention(q, k, v, bias, dim**-0.5, softcap), expected, **OUT_TOL[dtype])


def test_slot_attention_split_slots_match_reference(device):
    q = randn(1, 4, 2, 64, dtype=BF16, device=device)
    k = randn(1, 2, 130, 64, dtype=BF16, device=device)
    v = randn(1, 2, 130, 80, dtype=BF16, device=device)  # Dv != D
    bias = make_slot_bias(1, 2, 128, device)
    bias[..., 40:90] = float("-inf")  # a whole split sees only masked slots
    expected = attention.slot_attention_reference(q, k, v, bias, 0.125, 5.0)
    actual = dispatch.triton_module("attention").slot_attention(q, k, v, bias, 0.125, 5.0, splits=5)
    assert_close(actual, expected, **OUT_TOL[BF16])


def test_slot_attention_chunk_of_many_queries_matches_reference(device):
    # Prefill-sized Sq: the query rows span several row blocks.
    q = randn(1, 2, 40, 64, device=device)
    k, v = randn(2, 1, 1, 50, 64, device=device).unbind(0)
    bias = make_slot_bias(1, 1, 10, device)
    expected = attention.slot_attention_reference(q, k, v, bias, 0.125)
    assert_close(attention.slot_attention(q, k, v, bias, 0.125), expected, **OUT_TOL[F32])


# -- dispatch ------------------------------------------------------------------


def test_unknown_kernel_mode_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("KVFX_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"KVFX_KERNELS='bogus'.*reference, triton"):
        gather.gather_slots(torch.randn(1, 1, 4, 8), torch.zeros(1, 1, 2, dtype=torch.long))


def test_forced_triton_on_cpu_without_interpreter_says_to_set_it(monkeypatch):
    monkeypatch.setenv("KVFX_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.zeros(1))


def test_cpu_tensors_default_to_the_reference(monkeypatch):
    monkeypatch.delenv("KVFX_KERNELS", raising=False)
    assert not dispatch.use_triton(torch.zeros(1))


def test_forced_reference_never_uses_triton(monkeypatch):
    monkeypatch.setenv("KVFX_KERNELS", "reference")
    assert not dispatch.use_triton(torch.zeros(1))


def test_the_dispatcher_runs_the_reference_on_cpu_and_triton_when_forced(device, monkeypatch):
    calls = []
    kernel = dispatch.triton_module("cosine").adjacent_cosine
    monkeypatch.setattr(dispatch.triton_module("cosine"), "adjacent_cosine",
                        lambda k: calls.append(k.device.type) or kernel(k))
    k = randn(1, 2, 5, 16, device=device)
    cosine.adjacent_cosine(k)                                   # the device fixture forces Triton
    assert calls == [device.type]
    monkeypatch.setenv("KVFX_KERNELS", "reference")
    assert_close(cosine.adjacent_cosine(k), cosine.adjacent_cosine_reference(k), rtol=0, atol=0)
    assert calls == [device.type]


def test_kernel_module_built_for_the_other_mode_is_rebuilt(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the interpreter side of the switch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = importlib.reload(importlib.import_module("kvfx.kernels.cosine.triton"))
    assert not module.INTERPRETED  # compiled-mode kernels: unusable on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_module("cosine").INTERPRETED


def test_kvfx_imports_and_runs_references_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, kvfx\n"
        "from kvfx.kernels import gather\n"
        "x = torch.randn(1, 1, 4, 8)\n"
        "assert torch.equal(gather.gather_slots(x, torch.tensor([[[1, 3]]])), x[:, :, [1, 3]])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KVFX_KERNELS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.skipif(
    dispatch.language_interpreted(), reason="triton is interpreted in this process: the CPU tests ran here"
)
def test_cpu_kernels_in_a_fresh_interpreter_process():
    env = {k: v for k, v in os.environ.items() if k != "KVFX_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# -- paged_attention -----------------------------------------------------------

from kvfx.kernels import paged_attention  # noqa: E402

GARBAGE = 8.0  # fills every slot no row holds (page 0, tails of last pages, spare pages)


def paged_lengths(q_len, page):
    """[B=2, Hkv=2] rows of very different lengths: exactly the queries' own
    tokens, an exact multiple of the page size, several pages and a ragged tail,
    just over one page."""
    return [[q_len, 3 * page], [5 * page + 3, page + 4]]


def make_paged_store(lengths, q_len, page, dim, dim_v, dtype, device, spare_pages=3):
    """(k_pages, v_pages, slot_bias, page_table, lengths) for rows holding
    ``lengths`` [B][Hkv] slots. Pages are handed out from a random permutation,
    so a row's pages are not contiguous; page 0 is never handed out, so the
    table's 0 entries past a row's pages point at garbage, as do the slots past
    each row's length and the new tokens' bias (which the kernel must ignore).
    Past slots get bias 0, a few -inf, and log(3) for a merged slot."""
    lengths = torch.tensor(lengths, dtype=torch.long)
    batch, hkv = lengths.shape
    n_pages = (lengths + page - 1) // page
    m = int(n_pages.max()) + 1  # capacity beyond the longest row: every row ends in 0 entries
    total = int(n_pages.sum())
    ids = torch.randperm(total + spare_pages)[:total] + 1
    k = torch.full((total + spare_pages + 1, page, dim), GARBAGE)
    v = torch.full((total + spare_pages + 1, page, dim_v), -GARBAGE)
    bias = torch.full((total + spare_pages + 1, page), 5.0)
    table = torch.zeros(batch, hkv, m, dtype=torch.long)
    used = 0
    for bi in range(batch):
        for hi in range(hkv):
            length, count = int(lengths[bi, hi]), int(n_pages[bi, hi])
            pages = ids[used : used + count]
            used += count
            table[bi, hi, :count] = pages
            slot = torch.arange(length)
            flat = pages[slot // page] * page + slot % page
            k.view(-1, dim)[flat] = torch.randn(length, dim)
            v.view(-1, dim_v)[flat] = torch.randn(length, dim_v)
            past = length - q_len
            row_bias = torch.zeros(past)
            if past > 4:
                row_bias[torch.randperm(past)[:2]] = float("-inf")
                row_bias[-3] = math.log(3.0)
            bias.view(-1)[flat[:past]] = row_bias
    return (k.to(dtype).to(device), v.to(dtype).to(device), bias.to(device), table.to(device),
            lengths.to(device))


def paged_by_hand(q, k_pages, v_pages, slot_bias, page_table, lengths, scale, softcap):
    """Each (batch, KV head) row's slots gathered through its page table, then
    ``slot_attention_reference`` on that row alone."""
    hkv, page = page_table.shape[1], k_pages.shape[1]
    groups = q.shape[1] // hkv
    out = torch.empty(*q.shape[:3], v_pages.shape[-1], dtype=q.dtype)
    for bi in range(q.shape[0]):
        for hi in range(hkv):
            slot = torch.arange(int(lengths[bi, hi]))
            pages = page_table[bi, hi, slot // page]
            k, v = k_pages[pages, slot % page], v_pages[pages, slot % page]
            bias = slot_bias[pages, slot % page][: len(slot) - q.shape[2]]
            heads = slice(hi * groups, (hi + 1) * groups)
            out[bi, heads] = attention.slot_attention_reference(
                q[bi : bi + 1, heads], k[None, None], v[None, None], bias[None, None], scale, softcap
            )[0]
    return out


@pytest.mark.parametrize("groups,q_len,softcap", [(1, 1, 0.0), (2, 3, 30.0), (4, 3, 0.0), (8, 1, 5.0)])
def test_paged_attention_reference_is_slot_attention_on_each_row(groups, q_len, softcap):
    k, v, bias, table, lengths = make_paged_store(paged_lengths(q_len, 8), q_len, 8, 32, 24, F32, "cpu")
    q = randn(2, 2 * groups, q_len, 32)
    expected = paged_by_hand(q, k, v, bias, table, lengths, 32**-0.5, softcap)
    actual = paged_attention.paged_attention_reference(q, k, v, bias, table, lengths, 32**-0.5, softcap)
    assert_close(actual, expected, **OUT_TOL[F32])


# (dtype, head_dim, groups, q_len, softcap, page): every value of every axis appears.
PAGED_CASES = [
    (F32, 64, 1, 1, 0.0, 16),
    (F16, 80, 2, 3, 30.0, 8),
    (BF16, 128, 4, 1, 0.0, 8),
    (F32, 128, 8, 3, 5.0, 16),
    (F16, 64, 8, 1, 30.0, 16),
    (BF16, 80, 2, 3, 0.0, 16),
]


def paged_case_id(case):
    dtype, dim, groups, q_len, softcap, page = case
    return f"{str(dtype)[6:]}-d{dim}-g{groups}-q{q_len}-cap{softcap:g}-p{page}"


@pytest.mark.parametrize("dtype,dim,groups,q_len,softcap,page", PAGED_CASES, ids=list(map(paged_case_id, PAGED_CASES)))
def test_paged_attention_matches_reference(device, dtype, dim, groups, q_len, softcap, page):
    k, v, bias, table, lengths = make_paged_store(paged_lengths(q_len, page), q_len, page, dim, dim, dtype, device)
    q = randn(2, 2 * groups, q_len, dim, dtype=dtype, device=device)
    expected = paged_attention.paged_attention_reference(q, k, v, bias, table, lengths, dim**-0.5, softcap)
    # The public function: the device fixture forces Triton.
    actual = paged_attention.paged_attention(q, k, v, bias, table, lengths, dim**-0.5, softcap)
    assert_close(actual, expected, **OUT_TOL[dtype])


@pytest.mark.parametrize("splits", [3, 100], ids=["3-splits", "a-split-per-page"])
def test_paged_attention_split_slots_match_reference(device, splits):
    # Page 8, capacity 10 pages: 3 splits of 4 pages (32 slots) or one per page.
    # Row (0, 0) ends before the second split starts; row (0, 1) has a whole
    # split of -inf bias (it sees only masked slots). Dv != D; q is strided.
    k, v, bias, table, lengths = make_paged_store([[2, 70], [40, 24]], 2, 8, 64, 80, BF16, device)
    slot = torch.arange(32, 64, device=device)
    bias[table[0, 1, slot // 8], slot % 8] = float("-inf")
    q = randn(2, 2, 8, 64, dtype=BF16, device=device).transpose(1, 2)  # [B, H=8, Sq=2, D]
    expected = paged_attention.paged_attention_reference(q, k, v, bias, table, lengths, 0.125, 5.0)
    module = dispatch.triton_module("paged_attention")
    actual = module.paged_attention(q, k, v, bias, table, lengths, 0.125, 5.0, splits=splits)
    assert_close(actual, expected, **OUT_TOL[BF16])


def test_paged_attention_reads_strided_stores(device):
    # K and V interleaved in one [N, P, 2, D] buffer, the bias a column of a
    # wider one, the table and lengths views of larger tensors.
    k, v, bias, table, lengths = make_paged_store(paged_lengths(1, 16), 1, 16, 64, 64, F32, device)
    kv = torch.stack([k, v], dim=2)
    wide_bias = torch.stack([torch.zeros_like(bias), bias], dim=-1)
    wide_table = torch.stack([table, torch.zeros_like(table)], dim=-1)
    wide_lengths = torch.stack([lengths, torch.zeros_like(lengths)], dim=0)
    args = (kv[:, :, 0], kv[:, :, 1], wide_bias[..., 1], wide_table[..., 0], wide_lengths[0])
    q = randn(2, 4, 1, 64, device=device)
    expected = paged_attention.paged_attention_reference(q, k, v, bias, table, lengths, 0.125)
    assert_close(paged_attention.paged_attention(q, *args, 0.125), expected, **OUT_TOL[F32])


def test_paged_attention_of_a_long_row_matches_reference(device):
    # A realistic length: one row of 600 slots among short ones. The capacity
    # (39 pages of 16) gets more than one split by default even in the interpreter.
    k, v, bias, table, lengths = make_paged_store([[600, 1]], 1, 16, 80, 80, F16, device)
    q = randn(1, 8, 1, 80, dtype=F16, device=device)
    expected = paged_attention.paged_attention_reference(q, k, v, bias, table, lengths, 80**-0.5, 30.0)
    actual = paged_attention.paged_attention(q, k, v, bias, table, lengths, 80**-0.5, 30.0)
    assert_close(actual, expected, **OUT_TOL[F16])


def test_a_checkout_on_sys_path_does_not_shadow_the_pypi_kernels_package():
    # `python -m pytest` from the checkout puts its root on sys.path, where the kernels/ folder
    # (installed as kvfx.kernels) would shadow the PyPI package `kernels` that transformers imports.
    from importlib import metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, kvfx.kernels.attention, transformers.integrations.hub_kernels; "
            "print(kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        return   # nothing to shadow: the folder itself answers `import kernels`
    assert os.path.abspath(run.stdout.strip().splitlines()[-1]) != os.path.join(root, "kernels", "__init__.py")


def test_no_script_folder_holds_a_module_named_kernels():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a kernels.py there would
    # shadow the PyPI `kernels` that transformers imports, and every benchmark would fail.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("benchmarks", "tests", "examples"):
        assert not os.path.exists(os.path.join(root, folder, "kernels.py")), folder
