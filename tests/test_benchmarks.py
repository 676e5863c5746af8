"""The benchmark scripts run end to end in --quick mode on a tiny random model
and write what docs/results.md is built from. (No timing is asserted here.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvfx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
# Bytes held count kvfx's slot state too: a 4-byte bias per slot and KV head
# beside 2 x 16 x 4 of keys and values on the quick model (fp32, head dim 16);
# and a slot store's pages: less than one page (16 slots) per row more.
WITH_STATE = 1 + 4 / (2 * 16 * 4)
PAGE = 16


def _run(script: str, out: Path, *args: str, stem: str = "") -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{stem or script.replace('.py', '')}.json").read_text())


def test_quality_quick_writes_json_table_and_plot(tmp_path):
    data = _run("quality.py", tmp_path, "--policies", "SnapKV,PyramidKV,ZeroMerge", "--budgets", "0.5,0.25",
                "--sum-queries", "8")
    model = data["models"]["llama"]
    full = model["full"]
    assert full["asked"] == len(model["prompts"]) == 6 and 0 <= full["accuracy"] <= 1
    rows = {(r["policy"], r["budget"]): r for r in model["results"]}
    window = "ZeroMerge, last 8 queries"   # the attention-sum preset again, with the window approximation
    assert set(rows) == {(p, b) for p in ("SnapKV", "PyramidKV", "ZeroMerge", window) for b in (0.5, 0.25)}
    assert all("sum_queries=8" in rows[(window, b)]["spec"] and "sum_queries=0" in rows[("ZeroMerge", b)]["spec"]
               for b in (0.5, 0.25))
    for (policy, budget), r in rows.items():
        assert r["asked"] == full["asked"] and r["loss_delta"] == pytest.approx(r["loss"] - full["loss"])
    # uniform budgets hold their fraction of the cache, plus less than a page per row (prompts of >= 96 tokens)
    for budget in (0.25, 0.5):
        assert budget * WITH_STATE <= rows[("SnapKV", budget)]["kv_fraction"] <= budget * WITH_STATE + PAGE / 96
    table = (tmp_path / "quality.md").read_text()
    assert "| SnapKV |" in table and "Full cache:" in table
    assert (tmp_path / "quality_llama.png").read_bytes()[:8] == PNG


def test_quality_retrieval_suite_quick_asks_multi_key_and_variable_prompts_with_guided_merges(tmp_path):
    data = _run("quality.py", tmp_path, "--suite", "retrieval", "--policies", "ZeroMerge,ZeroMerge+SnapKV",
                "--budgets", "0.5", stem="quality_retrieval")
    model = data["models"]["llama"]
    assert [p["task"] for p in model["prompts"]] == ["multikey", "vars"] * 2     # 1 of each at 2 lengths
    rows = {r["policy"]: r for r in model["results"]}
    assert set(rows) == {"ZeroMerge", "ZeroMerge+SnapKV"}
    assert "scorer=SnapKV(" in rows["ZeroMerge+SnapKV"]["spec"] and "scorer=None" in rows["ZeroMerge"]["spec"]
    assert all(0.4 < r["kv_fraction"] < 0.7 for r in rows.values())           # half the prompt, state included
    table = (tmp_path / "quality_retrieval.md").read_text()
    assert f"({rows['ZeroMerge']['kv_fraction']:.0%})" in table     # bytes held beside every answer count
    assert (tmp_path / "quality_retrieval_llama.png").read_bytes()[:8] == PNG


def test_a_scorer_for_a_policy_without_one_is_refused():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--policies",
                           "SnapKV+H2O"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "SnapKV takes no scorer" in done.stderr


def test_a_wrapper_wraps_the_named_preset_at_the_grids_budget_and_is_refused_alone():
    policy = common.policy_grid(["CriticalKV+SnapKV"], 0.05, 512)["CriticalKV+SnapKV"]
    assert isinstance(policy, kvfx.CriticalKV) and isinstance(policy.policy, kvfx.SnapKV)
    assert policy.budget == 0.05 and policy.policy.sinks + policy.policy.window <= int(0.05 * 512)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--policies",
                           "CriticalKV"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "name it as CriticalKV+B" in done.stderr


def test_speed_quick_reports_ratios_to_the_full_cache(tmp_path):
    data = _run("speed.py", tmp_path, "--policies", "SnapKV", "--budgets", "0.25")
    rows = data["models"]["llama"]["rows"]
    assert set(rows) == {"full cache", "kvfx, budget >= prompt", "SnapKV@0.25"}
    for context in rows["kvfx, budget >= prompt"]["contexts"].values():   # the whole prompt, in whole pages
        assert context["ratio"]["kv_bytes_prompt"] == pytest.approx(WITH_STATE, abs=0.02)
    row = rows["SnapKV@0.25"]
    for n, context in row["contexts"].items():
        full = rows["full cache"]["contexts"][n]
        assert context["ratio"]["kv_bytes_prompt"] == pytest.approx(context["kv_bytes_prompt"] / full["kv_bytes_prompt"])
        assert context["ratio"]["kv_bytes_prompt"] == pytest.approx(0.25 * WITH_STATE, abs=0.02)
        assert context["kv_bytes_end"] < full["kv_bytes_end"]
    assert 1 <= row["graphs"] <= 4 and row["compile_s"] >= 0
    assert "| full cache |" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").read_bytes()[:8] == PNG


def test_speed_llama7b_path_switches_policies_stops_at_its_time_limit_and_renders(tmp_path):
    # The --llama7b code path on a toy shape: a static cache, one trace, later policies switched in.
    first, second = tmp_path / "run1", tmp_path / "run2"
    args = ("--llama7b", "--inner", "eager", "--policies", "SnapKV,H2O", "--budgets", "0.35")
    model = _run("speed.py", first, *args, stem="speed_llama7b")["models"]["llama-7b-shaped"]
    rows = model["rows"]
    assert set(rows) == {"full cache", "SnapKV@0.35", "H2O@0.35"} and model["static_cache"]
    assert "switch_s" not in rows["SnapKV@0.35"] and rows["H2O@0.35"]["switch_s"] >= 0
    assert model["copy_bytes_per_s"] > 0
    for key in ("SnapKV@0.35", "H2O@0.35"):
        for n, context in rows[key]["contexts"].items():
            # the static cache holds prompt + new tokens; the store its kept slots + the new tokens, in pages
            assert 0.35 < context["ratio"]["kv_bytes_prompt"] < 1
            assert context["ideal_s_per_token"] > 0
    for row in rows.values():                       # every row's largest batch was run, up to the cap of 4
        assert row["largest_batch"]["batch"] == 4 and row["largest_batch"]["tried"] == {"1": True, "2": True, "4": True}
    limited = _run("speed.py", second, *args, "--time-limit", "0.001", stem="speed_llama7b")["models"]["llama-7b-shaped"]
    assert set(limited["rows"]) == {"full cache"}
    assert limited["skipped"] == ["SnapKV@0.35", "H2O@0.35", "largest batch of full cache"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--out", str(tmp_path), "--render",
                           str(first / "speed_llama7b.json"), str(second / "speed_llama7b.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "speed_llama7b.md").read_text()
    assert "run 1" in table and "run 2" in table and "| H2O @ 0.35 |" in table and "s switch" in table
    assert "Not measured (the run's time limit was reached): SnapKV@0.35, H2O@0.35, largest batch of full cache." in table
    assert (tmp_path / "speed_llama7b.png").read_bytes()[:8] == PNG


def test_memory_quick_reports_what_the_stores_hold_against_the_full_cache(tmp_path):
    data = _run("memory.py", tmp_path)
    model = data["models"]["llama"]
    rows = model["rows"]
    assert set(rows) == {"full cache", "RazorAttention@0.2", "AdaKV@0.35", "SnapKV@0.35", "PyramidKV@0.35",
                         "ZeroMerge@0.05"}
    full = rows["full cache"]["prompt"]
    assert full["slots"] == 2 * 2 * 128 and full["bytes"] == full["slots"] * 2 * 16 * 4
    for key, row in rows.items():
        prompt = row["prompt"]
        # less than a page (16 slots) more than the kept slots for each of the 4 (layer, KV head) rows
        assert prompt["slots"] <= prompt["page_slots"] < prompt["slots"] + 4 * 16 or key == "full cache"
        assert prompt["ratio"] == pytest.approx(prompt["bytes"] / full["bytes"])
    razor = rows["RazorAttention@0.2"]["prompt"]
    assert razor["rectangle_ratio"] > razor["slot_ratio"], "the store frees what a rectangle pads"
    text = (tmp_path / "memory.md").read_text()
    assert "| AdaKV @ 0.35 |" in text and "RazorAttention @ 20%" in text


def test_results_doc_blocks_are_replaced_between_markers(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- quality:begin -->\nold\n<!-- quality:end -->\nafter\n")
    assert common.update_doc("quality", "new table\n", doc)
    assert doc.read_text() == "intro\n<!-- quality:begin -->\nnew table\n<!-- quality:end -->\nafter\n"
    assert not common.update_doc("speed", "x", doc)


def test_policy_grid_fits_the_always_kept_tokens_in_the_budget():
    grid = common.policy_grid(["SnapKV", "RazorAttention", "StreamingLLM"], 0.05, 512, ((1, 0),))
    for policy in grid.values():
        assert policy.sinks + policy.window <= int(0.05 * 512)
    assert grid["RazorAttention"].retrieval_heads == ((1, 0),)


def test_decode_step_quick_times_the_attention_alone_with_each_step_and_the_full_cache(tmp_path):
    data = _run("decode_step.py", tmp_path)
    us = data["us_per_call"]
    width = kvfx.policies.budget_tokens(0.35, 256)
    assert list(us) == [f"attention over {width} slots", "TOVA: attention + step", "ZeroMerge: attention + step",
                        "full cache: SDPA over 256"]
    assert all(t > 0 for t in us.values())
    assert data["keys_moved"] == {"TOVA: attention + step": True, "ZeroMerge: attention + step": True}
    assert "| ZeroMerge: attention + step |" in (tmp_path / "decode_step.md").read_text()


def test_decode_quality_quick_recompresses_each_policy_and_compares_the_loss_with_the_full_cache(tmp_path):
    data = _run("decode_quality.py", tmp_path, "--policies", "KNorm,H2O,CriticalKV+SnapKV")
    s = data["settings"]
    assert (s["context"], s["tokens"], s["every"], s["target"]) == (64, 24, 8, 16)
    rows = data["rows"]
    assert list(rows) == ["full cache", "KNorm", "H2O", "CriticalKV+SnapKV"]
    assert rows["H2O"]["spec"].startswith("Recompress(policy=H2O(")
    assert "CriticalKV(policy=SnapKV(" in rows["CriticalKV+SnapKV"]["spec"]
    # the full cache ends with 64 + 24 - 1 slots; a recompressed one with at most target + every - 1 = 23
    # (pages of 16 slots: under one more page per row), each slot with its bias and running score beside it
    most = (23 + PAGE) * (1 + 8 / (2 * 16 * 4)) / 87
    for name in ("KNorm", "H2O", "CriticalKV+SnapKV"):
        row = rows[name]
        assert 16 / 87 < row["kv_bytes_end_vs_full"] < most
        assert row["loss_vs_full"] == round(row["loss"] - rows["full cache"]["loss"], 4)
    assert "| H2O |" in (tmp_path / "decode_quality.md").read_text()


def test_decode_quality_refuses_a_name_that_is_no_preset(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_quality.py"), "--quick", "--out",
                           str(tmp_path), "--policies", "Snap"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--policies: 'Snap' is not a preset" in done.stderr
