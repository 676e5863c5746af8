"""The kvfx command line."""

import importlib.util
import json

import pytest

from kvfx.cli import main


def test_inspect_prints_the_site_table_as_json(capsys):
    assert main(["inspect", "--model", "gemma3", "--prompt-len", "24", "--policy", "SnapKV(budget=0.5, window=4)",
                 "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    actions = [s["action"] for s in sites]
    assert any(a.startswith("rewritten -> kvfx.store_compress") for a in actions)
    assert any("sliding-window" in a for a in actions)


def test_demo_on_a_tiny_model_reports_bytes_and_agreement(capsys):
    assert main(["demo", "--model", "llama", "--prompt-len", "32", "--steps", "4", "--json",
                 "--policy", "KNorm(budget=8)"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_bytes_kvfx"] < result["kv_bytes_full"]
    assert 0.0 <= result["greedy_agreement_with_full_cache"] <= 1.0


@pytest.mark.parametrize("argv,message", [
    (["demo", "--policy", "SnapKV(budget=1.5)"], "SnapKV.budget=1.5"),
    (["demo", "--policy", "__import__('os')"], "policy '__import__' is unknown"),
    (["inspect", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "--attn", "flash"], "invalid choice"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_inspect_takes_a_local_transformers_folder(tmp_path, capsys):
    from kvfx.testing.zoo import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)                # no tokenizer: inspect needs none
    assert main(["inspect", "--model", str(tmp_path), "--prompt-len", "24", "--policy",
                 "SnapKV(budget=0.5, window=4)", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    prefill = [s for s in report["sites"] if s["phase"] == "prefill"]
    assert len(prefill) == 2 and all(s["action"].startswith("rewritten -> kvfx.store_compress") for s in prefill)
    assert 0 < report["cache_bytes_kvfx"] < report["cache_bytes_full"]


@pytest.mark.skipif(importlib.util.find_spec("gguf") is not None, reason="with gguf installed it would parse the file")
def test_inspect_routes_a_gguf_file_to_the_gguf_loader(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match=r"needs the Python package 'gguf'"):
        main(["inspect", "--model", str(path)])


def test_inspect_names_the_models_it_accepts():
    with pytest.raises(SystemExit, match=r"--model '/no/such/model' is neither a tiny model.*local .gguf file"):
        main(["inspect", "--model", "/no/such/model"])
