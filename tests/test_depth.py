"""Depth-dependent plans read the layer count from the model, never from one
graph: a graph break that splits the layers changes nothing."""

import warnings

import pytest
import torch

import kvfx
from kvfx.testing.handwritten import TinyGPT

PROMPT, LAYERS = 40, 4
POLICIES = {
    "PyramidKV": kvfx.PyramidKV(budget=0.5, window=4, beta=2.0),
    "KVMerger": kvfx.KVMerger(budget=0.5, exempt_layers=(-1,)),   # the model's last layer, not the graph's
}


def prefill(model, how, policy):
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    if how == "kvfx.compile":
        kvfx.compile(model, policy, inner="aot_eager")
        backend = model._kvfx_backend
    else:   # the bare backend finds the model in the compiled frame
        backend = kvfx.backend(policy, inner="aot_eager")
        model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, past = model(ids)
    assert not [w for w in caught if "layer count" in str(w.message)]
    return [k.shape[-2] for k, _ in past], backend


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("how", ["kvfx.compile", "kvfx.backend"])
def test_a_graph_break_between_layers_keeps_the_models_depth(name, how):
    policy = POLICIES[name]
    lengths, backend = prefill(TinyGPT(n_layers=LAYERS, break_after=1).eval(), how, policy)
    assert len(backend.records) == 2, "the graph break splits the layers over two graphs"
    assert {s.layer for s in backend.records[0].sites} == {0, 1}
    assert all(s.depth == LAYERS for r in backend.records for s in r.sites)
    assert lengths == [policy.kept_length(PROMPT, layer, LAYERS) for layer in range(LAYERS)]
    if name == "KVMerger":
        assert lengths == [20, 20, 20, PROMPT]                   # only the model's last layer is exempt
    else:
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def test_an_unknown_depth_is_warned_about_for_a_depth_dependent_policy():
    model = TinyGPT(n_layers=LAYERS, break_after=1).eval()
    backend = kvfx.backend(POLICIES["PyramidKV"], inner="aot_eager")
    backend._root_module = lambda source: None        # as if no module were reachable from the frame
    compiled = torch.compile(model.forward, backend=backend)
    with pytest.warns(UserWarning, match=r"layer count of .* could not be read from the model.*model=model"):
        compiled(torch.randint(0, 128, (1, PROMPT)))
