"""benchmarks/train_inheritune.py (the Inheritune chapter's `gpu`-preset run) on its CPU --smoke path, without the
`datasets` package (as on the GPU image): the JSON has provenance, the reference's curve, every model of the regime
with per-sequence losses and per-item cloze scores, and the small models' token budget is at most 5% of the
reference's; the script's preset is the chapter's."""
import importlib.util
import json
from pathlib import Path

import pytest
from script_runs import SCRIPT_ENV, chapter_presets, load_script, run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_inheritune.py"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inheritune")
    out, corpus = tmp / "inheritune_smoke.json", tmp / "corpus.json.gz"
    # the corpus file is made here, with `datasets` (as before a GPU run); the run itself goes without it
    run_script(SCRIPT, "--prepare", "--corpus", corpus, env={k: v for k, v in SCRIPT_ENV.items() if k != "TINYLAB_FAKE_DATASETS"})
    assert "datasets stand-in" in run_script(SCRIPT, "--smoke", "--archs", "llama,gpt2", "--corpus", corpus, "--out", out)
    assert out.stat().st_size < 16 * 2**20
    return json.loads(out.read_text())


def test_provenance(record):
    for key in ("device", "torch", "triton", "transformers", "date", "commit", "args", "preset", "phases", "runs",
                "wall_s", "train_tokens"):
        assert key in record, key
    assert record["commit"] == "abc123" and record["args"]["smoke"] and record["datasets"] == "stand-in"
    assert set(record["runs"]) == {"llama", "gpt2"}


def test_regime(record):
    for arch, run in record["runs"].items():
        names = {(r["name"], r["seed"]) for r in run["rows"]}
        for name in ("inherit first", "inherit last", "k = 0", "scratch", "scratch (full data)",
                     "inherit first (full data)"):
            assert (name, 0) in names, (arch, name)
        assert {("untrained", s) for s in range(3)} <= names and ("reference", 0) in names
        rows = {(r["name"], r["seed"]): r for r in run["rows"]}
        ref = rows["reference", 0]
        assert ref["curve"]["steps"][-1] == run["ref_steps"] and ref["curve"]["val_loss"][-1] < ref["curve"]["val_loss"][0]
        for name in ("inherit first", "inherit last", "k = 0", "scratch"):
            assert rows[name, 0]["tokens"] <= 0.05 * ref["tokens"] and rows[name, 0]["layers"] == run["k"]
        assert rows["scratch (full data)", 0]["tokens"] == ref["tokens"]
        for r in run["rows"]:
            assert len(r["seq"]) == run["val_seqs"] and len(r["cloze_items"]) == run["cloze_n"]
        assert run["skipped"] == []


def test_gpu_preset_is_the_chapters():
    mod = load_script(SCRIPT)
    gpu = chapter_presets("20_inheritune.ipynb", FULL_DATA=mod.FULL_DATA)["gpu"]
    assert {k: gpu[k] for k in mod.PRESET} == mod.PRESET


def test_merge_side_by_side_runs(record, tmp_path):
    "The GPU job runs one process per architecture and merges their JSONs into one record."
    parts = []
    for arch in ("llama", "gpt2"):
        part = dict(record, runs={arch: record["runs"][arch]}, phases={"data": 1.0, arch: 2.0})
        parts.append(tmp_path / f"{arch}.json")
        parts[-1].write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    run_script(SCRIPT, "--merge", *parts, tmp_path / "missing.json", "--out", out, timeout=120)
    merged = json.loads(out.read_text())
    assert merged["runs"] == record["runs"] and len(merged["parts"]) == 2
    assert merged["device"] == record["device"] and merged["commit"] == "abc123"
