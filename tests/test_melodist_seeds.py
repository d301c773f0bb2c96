"""benchmarks/melodist_seeds.py, the Melodist headline over several training seeds, on its --smoke path (tiny models,
two seeds, seconds): the JSON carries its provenance and per-seed, per-song results in the shape the chapter's
recorded-run section reads; the script reads its preset from the chapter, so it cannot drift from it."""
import json
from pathlib import Path

from script_runs import INTERPRET_ENV, load_script, run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "melodist_seeds.py"


def test_melodist_seeds_smoke(tmp_path):
    out = tmp_path / "seeds.json"
    run_script(SCRIPT, "--smoke", "--out", out, env=INTERPRET_ENV, timeout=600)
    rec = json.loads(out.read_text())
    for key in ("device", "cpu", "threads", "torch", "date", "commit", "args", "config", "codec_gate_passed", "gate",
                "test_items", "seeds", "complete"):
        assert key in rec, key
    assert rec["args"]["smoke"] and rec["threads"] == 1 and rec["complete"] and rec["scale"] == "smoke"
    n = rec["config"]["n_test"]
    assert len(rec["test_items"]) == n and [s["seed"] for s in rec["seeds"]] == [0, 1]
    for s in rec["seeds"]:
        assert set(s["correct"]) == {"tri", "dual"} and set(s["r1"]) == {"tri", "dual"}
        for kind in ("tri", "dual"):
            assert set(s["correct"][kind]) == set(rec["heads"]["accompaniment"])
            assert all(len(v) == n and set(v) <= {0, 1} for v in s["correct"][kind].values())
            assert 0 <= s["summary"][f"adherence {kind}"] <= 1
        for name in ("two-stage", "single stage"):
            assert len(s["agree"][name]["tempo"]) == n and len(s["agree"][name]["key"]) == n
            assert 0 <= s["summary"][f"alignment {name}"] <= 1
        assert s["seconds"]["seed"] > 0


def test_presets_come_from_the_chapter():
    mod = load_script(SCRIPT)
    presets = mod.chapter_presets()
    assert set(presets) == {"ci", "book", "gpu"}
    assert set(presets["book"]) == set(mod.SMOKE)          # the smoke preset has every key the chapter's has
    assert presets["book"]["n_test"] % 48 == 0
