"""Public API: errors, warnings, the generate() trap, explain."""

import warnings

import pytest
import torch
from torch import nn

import kvfx
from kvfx.testing.zoo import tiny_model


def test_backend_rejects_unknown_inner_and_non_policies():
    with pytest.raises(ValueError, match=r"inner='tvm' is invalid.*inductor"):
        kvfx.backend(kvfx.SnapKV(), inner="tvm")
    with pytest.raises(TypeError, match="policy must be a kvfx policy"):
        kvfx.backend(0.5)


def test_compiling_the_module_then_generate_is_an_error():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=kvfx.backend(kvfx.SnapKV(), inner="eager"))
    with pytest.raises(AttributeError, match=r"kvfx\.compile\(model, policy\)"):
        compiled.generate(torch.ones(1, 4, dtype=torch.long))


def test_plain_torch_compile_generate_is_untouched():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="eager")
    assert callable(compiled.generate)


def test_model_without_attention_warns_why_nothing_was_rewritten():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    fn = torch.compile(mlp, backend=kvfx.backend(kvfx.SnapKV(), inner="eager"))
    with pytest.warns(UserWarning, match="kvfx: graph left untouched, no attention call was found"):
        fn(torch.randn(2, 8))


def test_model_without_cache_warns_and_still_runs():
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 12))
    expected = model(ids, use_cache=False).logits
    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(), inner="eager"))
    with pytest.warns(UserWarning, match="no KV cache"):
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)


def test_a_static_buffer_written_in_place_is_left_alone_with_a_reason():
    """The bare backend sees the static cache's index_copy_ into its buffer (kvfx.compile
    puts its slot store there instead: tests/test_store.py)."""
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 12))
    model.forward = torch.compile(model.forward, backend=kvfx.backend(kvfx.SnapKV(budget=0.5, window=4), inner="eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                       attention_mask=torch.ones_like(ids))
    assert any("preallocated cache buffer [1, 2, 14, 16] written in place by index_copy_" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def test_explain_reports_each_site_and_the_bytes_held():
    model = tiny_model("gemma2", attn="eager")
    ids = torch.randint(2, 100, (1, 24))
    report = kvfx.explain(model, ids, policy=kvfx.SnapKV(budget=0.5, window=4), use_cache=True)
    text = str(report)
    rewritten = [s for r in report.records for s in r.rewritten]
    alone = [s for r in report.records for s in r.sites if not s.compressible]
    assert rewritten and alone
    assert text.count("rewritten -> kvfx.store_compress") == sum(s.phase == "prefill" for s in rewritten)
    assert "sliding-window layer" in text
    assert 0 < report.cache_bytes_kept < report.cache_bytes_full
    before = report.graph_code(0, after=False)          # the cache layer marks its store's birth; kvfx compresses it
    assert "kvfx.store_compress" in report.graph_code(0) and "store_mark" in before and "store_compress" not in before


def _greedy(model, ids, steps=5):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits), [layer.keys.shape[-2] for layer in out.past_key_values.layers]


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_set_policy_rewrites_again_without_tracing_and_equals_a_fresh_compile(inner):
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    # A switch keeps the traced graphs when the store keeps the same tensors: between policies
    # with or without a running score (continuous ones) its shapes differ, and dynamo retraces.
    # Head-wise first: a graph traced for equal rows decodes through a view guarded on the page
    # count (passes.rewrite._inline_decode), which a head-wise store may fail.
    first, second = kvfx.AdaKV(budget=0.25, window=8), kvfx.SnapKV(budget=0.5, window=8)
    torch._dynamo.reset()
    kvfx.compile(model, second, inner=inner)
    expected = _greedy(model, ids)
    kvfx.restore(model)
    torch._dynamo.reset()
    kvfx.compile(model, first, inner=inner)
    before = _greedy(model, ids)
    n_graphs = len(model._kvfx_backend.records)
    kvfx.set_policy(model, second)
    got = _greedy(model, ids)
    assert len(model._kvfx_backend.records) == n_graphs  # no new trace
    assert before[2] != got[2]  # the first policy's cache lengths differ, so the switch is visible
    assert torch.equal(got[0], expected[0]) and got[2] == expected[2]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
    kvfx.restore(model)


def test_set_policy_needs_a_kvfx_model_and_a_policy():
    with pytest.raises(TypeError, match="model must be a model compiled with kvfx.compile"):
        kvfx.set_policy(nn.Linear(2, 2), kvfx.SnapKV())
    with pytest.raises(TypeError, match="policy must be a kvfx policy"):
        kvfx.backend(kvfx.SnapKV(), inner="eager").set_policy(0.3)
