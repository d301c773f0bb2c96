"""benchmarks/melodist_seeds.py, the Melodist headline over several training seeds, on its --smoke path (tiny models,
two seeds, seconds): the JSON carries its provenance and per-seed, per-song results in the shape the chapter's
recorded-run section reads; the script reads its preset from the chapter, so it cannot drift from it."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "melodist_seeds.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_melodist_seeds_smoke(tmp_path):
    out = tmp_path / "seeds.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
    spec = importlib.util.spec_from_file_location("melodist_seeds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    presets = mod.chapter_presets()
    assert set(presets) == {"ci", "book", "gpu"}
    assert set(presets["book"]) == set(mod.SMOKE)          # the smoke preset has every key the chapter's has
    assert presets["book"]["n_test"] % 48 == 0
