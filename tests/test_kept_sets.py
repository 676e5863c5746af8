"""The restructure into keep/fold primitives kept every preset's kept set:
each preset on each zoo model keeps the positions (and merges the keys)
recorded in tests/data/kept_sets.json before it (see tests/kept_sets.py).

An entry ``"<model>-<attn>|transformers>=X.Y"`` is a later recording for a
model whose cache transformers itself changed from that version on (Falcon's
cache holds its 2 true KV heads from 5.25, its 4 query heads' repeated copies
before; the model's outputs are the same), made with kvfx after the
restructure: there it guards against regressions only.

TOVA's decode step moves the newest slot into the evicted slot's place
rather than shifting every later slot down (issue 16): its slots' order
changed, not what they hold, and attention over slots does not depend on
their order, so its decode sets are compared head by head as sets."""

import json

import pytest
import transformers
from packaging.version import Version

from kept_sets import PATH, record_model, models

RECORDED = json.loads(PATH.read_text())
# The zoo entries recorded before the restructure (later entries are checked by the matrix tests).
CASES = [(name, attn, False) for name, attn in models() if f"{name}-{attn}" in RECORDED] + [("llama", "sdpa", True)]


def recorded(key: str) -> dict:
    """The recording of ``key`` for the installed transformers (see the module's docstring)."""
    installed, best, since = Version(transformers.__version__).release, RECORDED[key], ()
    for entry, value in RECORDED.items():
        if entry.startswith(key + "|transformers>="):
            version = Version(entry.split(">=")[1]).release
            if since < version <= installed:
                best, since = value, version
    return best


# Policies whose slot order after decode steps is not part of what they keep (see the module's docstring).
ORDER_FREE = {("TOVA", "decode")}


def _head_sets(kept: list, order_free: bool) -> list:
    """``kept`` ([layer][batch][head] -> slot positions), each head's positions sorted where order is free."""
    return [[[sorted(head) for head in batch] for batch in layer] for layer in kept] if order_free else kept


@pytest.mark.parametrize("name,attn,padded", CASES, ids=[f"{n}-{'padded' if p else a}" for n, a, p in CASES])
def test_every_preset_keeps_the_recorded_positions(name, attn, padded):
    got = record_model(name, attn, padded)
    want = recorded(f"{name}-{'padded' if padded else attn}")
    assert sorted(got) == sorted(want)
    changed = []
    for policy, phases in want.items():
        for phase, expected in phases.items():
            order_free = (policy, phase) in ORDER_FREE
            if _head_sets(got[policy][phase]["kept"], order_free) != _head_sets(expected["kept"], order_free):
                changed.append(f"{policy} {phase}: kept positions")
            for layer, (a, b) in enumerate(zip(got[policy][phase]["merged"], expected["merged"])):
                if a != pytest.approx(b, abs=2e-4):
                    changed.append(f"{policy} {phase} layer {layer}: merged keys")
    assert not changed, changed
