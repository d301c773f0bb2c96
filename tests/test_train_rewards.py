"""benchmarks/train_rewards.py (the reward-transfer chapter's `gpu`-scale run: stronger reward models, best-of-n over the
whole source x target matrix, RL for every pair, the two ablations) on its CPU --smoke path, without the `datasets`
package (as on the GPU image): the JSON has provenance, per-phase times, RM held-out accuracies, the per-prompt win
rates the chapter bootstraps over, the ablations and RL for every pair; and its policy is the chapter's `book` policy."""
import json
from pathlib import Path

import pytest
from script_runs import chapter_presets, load_script, run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_rewards.py"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("rewards") / "rewards_train_smoke.json"
    assert "datasets stand-in" in run_script(SCRIPT, "--smoke", "--threads", 1, "--out", out)
    assert out.stat().st_size < 16 * 2**20
    return json.loads(out.read_text())


def test_provenance_and_phases(record):
    for key in ("device", "torch", "triton", "transformers", "date", "commit", "args", "preset", "phases", "rm_training"):
        assert key in record, key
    assert record["commit"] == "abc123" and record["args"]["smoke"] and record["datasets"] == "stand-in"
    assert record["complete"]
    for phase in ("policy", "rm_base", "rms", "best_of_n", "rl", "ablation_mono", "na_models", "na_rms",
                  "ablation_no_anchors", "total"):
        assert record["phases"][phase] >= 0, phase
    assert "Bradley-Terry" in record["rm_training"]
    assert record["rm_base"]["params"] > record["policy"]["params"]        # the RM is larger than the policy


def test_matrix_ablations_and_rl(record):
    cfg = record["preset"]
    names = [f"L{i}" for i in range(cfg["n_langs"])]
    assert record["ns"][-1] == cfg["N"]
    for t in names:
        assert set(record["win_matrix"][t]) == set(names)
        for s in names:
            w = record["wins_at_max"][t][s]
            assert len(w) == cfg["eval_prompts"] and all(0 <= v <= 1 for v in w)
            assert abs(sum(w) / len(w) - record["win_matrix"][t][s]) < 1e-3
            assert len(record["win_vs_n"][t][s]) == len(record["ns"])
        assert len(record["ablation_mono"][t]) == len(record["ablation_no_anchors"][t]) == cfg["eval_prompts"]
    for s in names:
        rm = record["rms"][s]
        assert 0 <= rm["heldout_accuracy_gold"] <= 1 and rm["curve"] and rm["pairs"] > rm["heldout"]
    assert record["rl_steps_run"] >= 1
    assert set(record["rl"]) == {f"{s}->{t}" for s in names for t in names}
    for r in record["rl"].values():
        assert len(r["win"]) == cfg["eval_prompts"] and r["steps"] == record["rl_steps_run"]
    assert set(record["na_win_matrix"]) == set(names) and set(record["na_rms"]) == set(names)   # the whole matrix there too


def test_two_parts_merge(record, tmp_path):
    "On the GPU the two worlds run as two processes at once; --merge makes one record of the main part and the other."
    main = {k: v for k, v in record.items() if not (k.startswith("na_") or k == "ablation_no_anchors")}
    na = {k: v for k, v in record.items() if k.startswith("na_") or k in ("ablation_no_anchors", "phases", "complete")}
    (tmp_path / "main.json").write_text(json.dumps(main)); (tmp_path / "na.json").write_text(json.dumps(na))
    run_script(SCRIPT, "--merge", tmp_path / "main.json", tmp_path / "na.json", "--out", tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["ablation_no_anchors"] == record["ablation_no_anchors"] and merged["win_matrix"] == record["win_matrix"]
    assert merged["phases_no_anchors"] == record["phases"] and merged["complete_no_anchors"]


def test_policy_is_the_chapters_book_policy():
    mod = load_script(SCRIPT)
    presets = chapter_presets("31_rewards.ipynb")
    assert {k: presets["book"][k] for k in mod.POLICY_KEYS} == {k: mod.GPU[k] for k in mod.POLICY_KEYS}
    shared = set(presets["gpu"]) & set(mod.GPU)             # the chapter's gpu row is the script's
    assert {k: presets["gpu"][k] for k in shared} == {k: mod.GPU[k] for k in shared}
    assert mod.GPU["rm_d_model"] > mod.GPU["d_model"] and mod.GPU["rm_layers"] > mod.GPU["n_layers"]
