"""Kept positions of every preset on the tiny-model zoo, for regression tests.

``tests/data/kept_sets.json`` was written by ``python tests/kept_sets.py``
before kvfx's policies were restructured into keep/fold primitives (issue
13), so ``test_kept_sets.py`` can show the restructure kept every kept set.
A kept slot is named by the prompt position whose key it holds exactly, -1
for a slot that holds no single prompt key (merged, compensation), and -2 for
an invalid (padding) slot.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import kvfx
from kvfx.integrations.transformers import is_store
from kvfx.testing.zoo import ZOO, tiny_model

PATH = Path(__file__).parent / "data" / "kept_sets.json"
PROMPT, PAD, DECODE = 40, 10, 8

POLICIES = {
    "StreamingLLM": kvfx.StreamingLLM(budget=0.3, sinks=2),
    "SnapKV": kvfx.SnapKV(budget=0.3, window=4, kernel=5),
    "KNorm": kvfx.KNorm(budget=0.3),
    "H2O": kvfx.H2O(budget=0.3, window=4),
    "TOVA": kvfx.TOVA(budget=0.3),
    "PyramidKV": kvfx.PyramidKV(budget=0.3, window=4, beta=2.0),
    "KVMerger": kvfx.KVMerger(budget=0.3, exempt_layers=(), count_bias=True),
    "KVMerger-merging": kvfx.KVMerger(budget=0.5, epsilon=0.0, exempt_layers=(), count_bias=True),
    "ChunkKV": kvfx.ChunkKV(budget=0.3, window=4, chunk=4, reuse_every=2),
    "RazorAttention": kvfx.RazorAttention(budget=0.2, sinks=2, window=4, retrieval_heads=((1, 0),)),
    "ZeroMerge": kvfx.ZeroMerge(budget=0.3, residual=2, window=3),
}
CONTINUOUS = ("TOVA", "ZeroMerge")
# Left-padded batch on llama: ChunkKV refuses padding; PyramidKV was left out when these sets were recorded
# (its uneven layers then refused a padded mask: the slot store lifted that, tests/test_store.py checks it).
PADDED = [name for name in POLICIES if name not in ("ChunkKV", "PyramidKV")]


def models():
    for name, entry in ZOO.items():
        yield name, entry.attn_impls[0]


def prompt(vocab: int, padded: bool):
    ids = torch.randint(2, vocab, (2 if padded else 1, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


def positions(kept: torch.Tensor, full: torch.Tensor, bias) -> tuple[list, list]:
    """Prompt position of each kept key slot ([B, Hkv, n] nested lists), and
    the sum of each slot's key where it holds no single prompt key (-1), so a
    merge's arithmetic is pinned too."""
    # A tolerance, not equality: a decode step's key can differ from the same
    # token's key in a full forward by a rounding of its rotary angle.
    same = (kept[:, :, :, None, :] - full[:, :, None, :, :]).abs().amax(-1) <= 1e-5   # [B, Hkv, n, S]
    pos = torch.where(same.any(-1), same.float().argmax(-1), -1)
    if bias is not None:
        pos = torch.where(torch.isfinite(bias), pos, -2)
    return pos.tolist(), [round(x, 4) for x in kept.sum(-1)[pos == -1].tolist()]


def generate(model, ids, mask, steps):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True, pad_token_id=0)


def layer_sets(model, ids, mask, steps: int) -> list:
    out = generate(model, ids, mask, steps)
    seen = out.sequences[:, :PROMPT + steps - 1]
    seen_mask = torch.cat([mask, torch.ones_like(seen[:, PROMPT:])], 1)
    position_ids = (seen_mask.cumsum(-1) - 1).masked_fill(seen_mask == 0, 1)   # as generate() numbers them
    with torch.no_grad():
        full = model._kvfx_original_forward(input_ids=seen, attention_mask=seen_mask, position_ids=position_ids,
                                            use_cache=True).past_key_values
    sets, merged = [], []
    for layer, full_layer in zip(out.past_key_values.layers, full.layers):
        if is_store(layer):
            keys, _, bias, _ = layer.dense()
        else:
            keys, bias = layer.keys, None
        kept, sums = positions(keys, full_layer.keys, bias)
        sets.append(kept)
        merged.append(sums)
    return {"kept": sets, "merged": merged}


def record_model(name: str, attn: str, padded: bool = False) -> dict:
    torch._dynamo.reset()
    model = tiny_model(name, attn=attn)
    ids, mask = prompt(model.config.vocab_size, padded)
    names = PADDED if padded else list(POLICIES)
    kvfx.compile(model, POLICIES[names[0]], inner="eager")
    result = {}
    for policy_name in names:
        kvfx.set_policy(model, POLICIES[policy_name])
        entry = {"prefill": layer_sets(model, ids, mask, 1)}
        if policy_name in CONTINUOUS:
            decode = layer_sets(model, ids, mask, DECODE)   # layer 0 only: its keys depend on no cache
            entry["decode"] = {part: value[:1] for part, value in decode.items()}
        result[policy_name] = entry
    kvfx.restore(model)
    return result


def record_all() -> dict:
    data = {f"{name}-{attn}": record_model(name, attn) for name, attn in models()}
    data["llama-padded"] = record_model("llama", "sdpa", padded=True)
    return data


if __name__ == "__main__":
    data = record_all()
    old = json.loads(PATH.read_text()) if PATH.exists() else {}
    data.update({key: value for key, value in old.items() if "|transformers>=" in key})   # test_kept_sets.py
    PATH.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {PATH} ({PATH.stat().st_size:,} bytes)", file=sys.stderr)
