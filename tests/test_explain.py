"""kvfx.explain: site table, memory formulas against measured bytes, logs, pictures."""

import os
import subprocess
import sys

import pytest
import torch

import kvfx
from kvfx.explain import S
from kvfx.testing.zoo import tiny_model

POLICIES = [
    kvfx.StreamingLLM(budget=0.5, sinks=2), kvfx.SnapKV(budget=0.5, window=4), kvfx.KNorm(budget=0.5),
    kvfx.H2O(budget=0.5, window=4), kvfx.TOVA(budget=0.5), kvfx.PyramidKV(budget=0.5, window=4),
    kvfx.KVMerger(budget=0.5), kvfx.ChunkKV(budget=0.5, window=4, chunk=4, reuse_every=2),
    kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=((1, 0),)),
    kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
]


# CI checks one preset of each memory formula's form (KVFX_SLOW=1 runs all of them).
FORMULAS_IN_CI = {"StreamingLLM", "KVMerger", "ChunkKV", "RazorAttention", "ZeroMerge"}


@pytest.mark.parametrize("policy", [
    pytest.param(p, id=type(p).__name__, marks=[] if type(p).__name__ in FORMULAS_IN_CI else [pytest.mark.slow])
    for p in POLICIES])
def test_memory_formula_at_prompt_length_equals_bytes_held(policy):
    model = tiny_model("gemma3")                 # a sliding layer and a global layer
    ids = torch.randint(2, 100, (1, 40))
    report = kvfx.explain(model, ids, policy=policy, use_cache=True)
    assert report.memory_at(40) == report.cache_bytes_kept
    assert report.memory_at(40, "full") == report.cache_bytes_full
    for layer in report.layers:
        assert int(layer.kvfx.subs(S, 40)) == layer.measured_kvfx
        assert layer.nominal_kvfx <= layer.measured_kvfx


def test_headwise_budget_holds_each_heads_own_slots_and_its_formula_says_so():
    from kvfx.explain import S

    model = tiny_model("llama")
    policy = kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=((1, 0),))
    report = kvfx.explain(model, torch.randint(2, 100, (1, 40)), policy=policy, use_cache=True)
    plain, retrieval = report.layers
    slot = 2 * 16 * 4 + 4                                                          # K, V (fp32, dim 16), bias

    def tables(width):       # int64 per KV head: `width` page ids, its length, its page count; tokens seen
        return 2 * (width + 2) * 8 + 8

    assert plain.measured_kvfx == 2 * 16 * slot + tables(1)                        # 7 slots a head: a page each
    assert retrieval.measured_kvfx == (3 + 1) * 16 * slot + tables(3)              # 40 slots in 3 pages + 7 in 1
    for layer in report.layers:
        assert int(layer.kvfx.subs(S, 40)) == layer.measured_kvfx                  # the formula is what is held
    assert retrieval.measured_kvfx < retrieval.measured_full                       # the other head frees its slots
    assert retrieval.nominal_kvfx == (40 + 7) * slot <= retrieval.measured_kvfx
    assert "valid slots" in str(report)


def test_site_table_matches_the_sites_rewritten():
    model = tiny_model("gemma2", attn="eager")
    report = kvfx.explain(model, torch.randint(2, 100, (1, 24)), policy=kvfx.SnapKV(budget=0.5, window=4),
                          use_cache=True)
    rows = report.rows()
    rewritten = [r for r in rows if r[-1].startswith("rewritten")]
    assert len(rewritten) == sum(len(rec.rewritten) for rec in report.records) > 0
    for record in report.records:
        marked = [line for line in report.graph_code(record.index).splitlines() if line.endswith("# <-- kvfx")]
        assert len([l for l in marked if "kvfx.store_compress.default(" in l or "kvfx.store_attend.default(" in l]) == \
            len(record.rewritten)


def test_torch_logs_show_one_line_per_rewritten_site():
    code = ("import torch, kvfx\n"
            "from kvfx.testing import generate\nfrom kvfx.testing.zoo import tiny_model\n"
            "m = tiny_model('llama')\n"
            "generate(m, torch.randint(2, 100, (1, 24)), policy=kvfx.SnapKV(budget=0.5, window=4), steps=3)\n")
    env = dict(os.environ, TORCH_LOGS="+kvfx")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if "rewritten to " in l]
    assert len(lines) == 2 * 2, "\n".join(lines)            # 2 layers x 2 graphs (prefill, decode)
    # on the CPU, decode attention over equal rows is plain tensor code in the graph, and says so
    assert sum("rewritten to paged_attention_uniform (decode attention in the graph" in l for l in lines) == 2


def test_save_writes_graphs_and_pictures(tmp_path):
    model = tiny_model("llama")
    report = kvfx.explain(model, torch.randint(2, 100, (1, 24)), policy=kvfx.SnapKV(budget=0.5, window=4),
                          use_cache=True)
    report.save(tmp_path)
    assert "kvfx.store_compress" in (tmp_path / "graph0_after.py").read_text()
    dot = (tmp_path / "graph0_layer0_prefill.dot").read_text()
    assert "cluster_before" in dot and "cluster_after" in dot and "kvfx.store_compress" in dot
    assert "<table>" in report._repr_html_()


def test_explain_leaves_the_model_and_other_compiled_code_as_they_were():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    policy = kvfx.SnapKV(budget=0.5, window=4)
    compiles = []
    other = torch.compile(lambda x: x.sin() + 1, backend=lambda gm, example: compiles.append(1) or gm.forward)
    other(torch.randn(4))

    plain = kvfx.explain(model, ids, policy=policy, use_cache=True)
    forward_code = type(model).forward.__code__
    assert "forward" not in model.__dict__ and not _debug_get_cache_entry_list(forward_code)

    kvfx.compile(model, policy, inner="aot_eager")
    installed = model.forward
    compiled = kvfx.explain(model, ids, use_cache=True)            # the README's order: compile, then explain
    assert compiled.cache_bytes_full == plain.cache_bytes_full
    assert compiled.cache_bytes_kept == plain.cache_bytes_kept < plain.cache_bytes_full
    assert [m.measured_kvfx for m in compiled.layers] == [m.measured_kvfx for m in plain.layers]
    assert compiled.records is not plain.records and compiled.records[0].rewritten

    other(torch.randn(4))
    assert len(compiles) == 1, "explain made another compiled function recompile"
    assert model.forward is installed and model._kvfx_backend.policy == policy
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 43
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert [layer.keys.shape[-2] for layer in cache.layers] == [20, 20], "the model no longer compresses"
    kvfx.restore(model)


def test_explain_with_another_policy_on_a_compiled_model_keeps_its_backend():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40))
    kvfx.compile(model, kvfx.SnapKV(budget=0.5, window=4), inner="aot_eager")
    backend = model._kvfx_backend
    report = kvfx.explain(model, ids, policy=kvfx.KNorm(budget=8), use_cache=True)
    assert report.policy == kvfx.KNorm(budget=8) and "KNorm" in str(report)
    assert model._kvfx_backend is backend and backend.policy == kvfx.SnapKV(budget=0.5, window=4)
    kvfx.restore(model)


def test_explain_needs_a_policy_for_a_model_kvfx_did_not_compile():
    with pytest.raises(TypeError, match="policy is required"):
        kvfx.explain(tiny_model("llama"), torch.ones(1, 4, dtype=torch.long))
