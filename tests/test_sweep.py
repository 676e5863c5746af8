"""A fast subset of the causal-LM sweep (the whole of it: `python -m kvfx.testing.sweep`)."""

import pytest

from kvfx.testing.sweep import measure, summary, tiny_config


@pytest.mark.parametrize("family,status,why", [
    ("llama", "compressed", None),
    ("gpt_neo", "compressed", None),                       # where(causal, scores, lowest) + padding mask
    ("granite_swa", "compressed", None),                   # sinks applied as sigmoid(logsumexp - sink)
    ("bloom", "compressed", None),                         # baddbmm over [B*H, S, D] with an ALiBi bias
    ("doge", "compressed", None),                          # a per-head bias computed from the cached values
    ("mamba", "no kv cache", "keeps no attention keys"),
])
def test_family(family, status, why):
    row = measure(family)
    assert row["status"] == status, row
    if why is not None:
        assert any(why in reason for reason in row["reasons"]), row["reasons"]
    assert not any("no KV cache" in reason for reason in row.get("reasons", []))


def test_tiny_config_is_tiny_and_keeps_one_layer_of_each_kind():
    config = tiny_config("gemma3_text")
    assert config.hidden_size == 64 and config.num_hidden_layers == 2
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_summary_counts_only_families_that_run():
    rows = [dict(status="compressed"), dict(status="left alone"), dict(status="no build"), dict(status="wrong"),
            dict(status="no kv cache")]
    assert summary(rows) == dict(families=5, no_kv_cache=1, counted=3, compressed=1, share=0.333)
