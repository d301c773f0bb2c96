"""benchmarks/train_megalodon.py (the Megalodon chapter's GPU experiments) still runs: its --smoke path on the CPU,
through the `datasets` stand-in the GPU image needs, and its language-model sizes are the chapter's `gpu` preset."""
import ast
import json

import nbformat
from script_runs import ROOT, load_script, run_script


def chapter_presets() -> dict:
    nb = nbformat.read(ROOT / "nbs" / "11_megalodon.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("PRESETS = {"))
    node = next(n for n in ast.parse(cell.source).body if isinstance(n, ast.Assign) and n.targets[0].id == "PRESETS")
    return eval(compile(ast.Expression(node.value), "PRESETS", "eval"), {"__builtins__": {}, "dict": dict})


def test_gpu_preset_matches_the_chapter():
    train_megalodon = load_script(ROOT / "benchmarks" / "train_megalodon.py")
    gpu = chapter_presets()["gpu"]
    for key in ("vocab_size", "block_size", "chunk", "d_model", "n_layers", "n_heads", "steps", "batch_size", "lrs"):
        assert train_megalodon.GPU[key] == gpu[key], key


def test_smoke(tmp_path):
    out = tmp_path / "megalodon_smoke.json"
    run_script(ROOT / "benchmarks" / "train_megalodon.py", "run", "--smoke", "--workers", 2, "--budget-s", 600, "--out", out,
               timeout=900)
    rec = json.loads(out.read_text())
    assert not rec["errors"] and not rec["missing"], (rec["errors"], rec["missing"])
    for key in ("device", "torch", "triton", "transformers", "date", "commit", "args", "phase_s", "preflight"):
        assert key in rec, key
    lm = [j for j in rec["jobs"].values() if j["kind"] == "lm"]
    pk = [j for j in rec["jobs"].values() if j["kind"] == "passkey"]
    assert {j["name"] for j in lm} >= {"Megalodon lr=0.003", "Llama lr=0.003", "no CEMA lr=0.003", "layer norm lr=0.003",
                                       "unnormalised attention lr=0.003", "chunk attention alone lr=0.003"}
    c = rec["preset"]["chunk"]
    for j in lm:
        assert j["steps_done"] == rec["preset"]["steps"] and len(j["curve"]["val_loss"]) >= 2
        assert len(j["position_loss"]) == rec["preset"]["block_size"] - 1
        assert len(j["chunk2_ctx_position"]) == len(j["chunk2_alone_position"]) == c - 1
        assert len(j["chunk2_ctx_per_block"]) == j["val_blocks"]
    # the per-block means average to the per-position means
    j = lm[0]
    assert abs(sum(j["chunk2_ctx_per_block"]) / len(j["chunk2_ctx_per_block"])
               - sum(j["chunk2_ctx_position"]) / len(j["chunk2_ctx_position"])) < 1e-3
    assert len(pk) == 15 and all(set(j["accuracy"]) == {"2", "4"} for j in pk)
    assert {j["arch"] for j in pk} == {"Megalodon", "no CEMA", "CEMA, layer norm", "chunk attention alone", "Llama"}
