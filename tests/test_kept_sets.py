"""The restructure into keep/fold primitives kept every preset's kept set:
each preset on each zoo model keeps the positions (and merges the keys)
recorded in tests/data/kept_sets.json before it (see tests/kept_sets.py)."""

import json

import pytest

from kept_sets import PATH, record_model, models

RECORDED = json.loads(PATH.read_text())
# The zoo entries recorded before the restructure (later entries are checked by the matrix tests).
CASES = [(name, attn, False) for name, attn in models() if f"{name}-{attn}" in RECORDED] + [("llama", "sdpa", True)]


@pytest.mark.parametrize("name,attn,padded", CASES, ids=[f"{n}-{'padded' if p else a}" for n, a, p in CASES])
def test_every_preset_keeps_the_recorded_positions(name, attn, padded):
    got = record_model(name, attn, padded)
    want = RECORDED[f"{name}-{'padded' if padded else attn}"]
    assert sorted(got) == sorted(want)
    changed = []
    for policy, phases in want.items():
        for phase, expected in phases.items():
            if got[policy][phase]["kept"] != expected["kept"]:
                changed.append(f"{policy} {phase}: kept positions")
            for layer, (a, b) in enumerate(zip(got[policy][phase]["merged"], expected["merged"])):
                if a != pytest.approx(b, abs=2e-4):
                    changed.append(f"{policy} {phase} layer {layer}: merged keys")
    assert not changed, changed
