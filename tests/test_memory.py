"""What kvfx keeps alive: after a generation, the only tensors left beyond the
model's weights are the returned cache: its slot stores (pages, state, tables)."""

import gc

import pytest
import torch

import kvfx
from kvfx.integrations.transformers import cache_bytes, cache_entries, entry_tensors
from kvfx.testing.zoo import tiny_model

POLICIES = {
    "StreamingLLM": kvfx.StreamingLLM(budget=0.2, sinks=2),
    "SnapKV": kvfx.SnapKV(budget=0.2, window=4),
    "KNorm": kvfx.KNorm(budget=0.2),
    "H2O": kvfx.H2O(budget=0.2, window=4),
    "TOVA": kvfx.TOVA(budget=0.2),
    "PyramidKV": kvfx.PyramidKV(budget=0.2, window=4),
    "KVMerger": kvfx.KVMerger(budget=0.2, exempt_layers=()),
    "ChunkKV": kvfx.ChunkKV(budget=0.2, window=4, chunk=4),
    "RazorAttention": kvfx.RazorAttention(budget=0.1, sinks=2, window=4, retrieval_heads=((0, 0), (1, 1))),
    "AdaKV": kvfx.AdaKV(budget=0.2, window=4),
    "ZeroMerge": kvfx.ZeroMerge(budget=0.25, residual=2, window=3),
}


def live_storages() -> dict:
    """data_ptr -> (bytes, a tensor on that storage) of every live CPU tensor."""
    gc.collect()
    found = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = (storage.nbytes(), obj)
    return found


# CI checks one preset of each kind of store (KVFX_SLOW=1 runs all of them).
IN_CI = {"SnapKV", "KVMerger", "RazorAttention", "AdaKV", "ZeroMerge"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in IN_CI else [pytest.mark.slow])
                                  for n in POLICIES])
def test_after_a_generation_only_the_returned_cache_stays_alive(name):
    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    before = live_storages()            # held here, so no address is reused by a new tensor
    kvfx.compile(model, POLICIES[name], inner="aot_eager")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    del out
    grown = {ptr: nbytes for ptr, (nbytes, _) in live_storages().items() if ptr not in before}
    cache_ptrs = {t.untyped_storage().data_ptr() for entry in cache_entries(cache) for t in entry_tensors(entry)}
    kept = {ptr: nbytes for ptr, nbytes in grown.items() if ptr not in cache_ptrs}
    assert sum(grown.values()) - sum(kept.values()) == cache_bytes(cache)
    assert not kept, f"{sum(kept.values())} bytes in {len(kept)} tensors outlive the generation beside its cache"
    kvfx.restore(model)
