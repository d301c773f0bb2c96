"""benchmarks/train_manyshot.py (the many-shot chapter's `gpu`-preset run) on its CPU --smoke path, without the
`datasets` package (as on the GPU image): the JSON has provenance, the training curve, per-item scores at every K of
the nested shot sets for every task, instance and seed, the baselines at every K and N, addition and fine-tuning;
and the script's preset is the chapter's."""
import json
from pathlib import Path

import nbformat
import pytest

from script_runs import chapter_presets, load_script, run_script
from tinylab.manyshot import shot_counts, unpack_frame

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_manyshot.py"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("manyshot") / "manyshot_smoke.json"
    assert "datasets stand-in" in run_script(SCRIPT, "--smoke", "--out", out)
    assert out.stat().st_size < 16 * 2**20
    return json.loads(out.read_text())


def test_provenance_and_training(record):
    for key in ("device", "torch", "triton", "transformers", "date", "commit", "args", "preset", "params", "tokens",
                "train", "phases", "mix_table", "steps"):
        assert key in record, key
    assert record["commit"] == "abc123" and record["args"]["smoke"] and record["datasets"] == "stand-in"
    tr = record["train"]
    assert record["steps"] == record["preset"]["steps"] == len(tr["train_loss"]) and not record["hard_stopped"]
    assert tr["eval_loss"][-1] < tr["eval_loss"][0]
    assert record["tokens"] == record["steps"] * record["preset"]["batch_size"] * record["preset"]["block_size"]
    assert record["cache_check"]["max_abs_dnll"] < 1e-4      # the shared cache is used, not silently ignored
    assert record["loss"] == "answers"                          # the chapter's loss: the answer tokens only
    assert record["kernel_check"]["max_abs_dlogp"] < 1e-4 and record["eval_attention"] == "sdpa (DynamicCache)"   # the CPU path
    assert [c["call"] for c in record["calls"]] == [1] and record["curriculum"]["rows"] > 0
    for phase in ("data", "training", "cache_check", "icl", "baselines", "addition", "finetune", "total"):
        assert record["phases"][phase] >= 0, phase


def test_per_item_scores_at_every_k(record):
    cfg = record["preset"]
    icl = unpack_frame(record["icl"])
    short = {"sentiment", "sentiment flipped", "sentiment abstract", "lookup"}
    tasks = [f"linear N={N}" for N in cfg["n_features"]] + sorted(short) + ["parity"]
    assert set(icl.task) == set(tasks) and not record["skipped"]
    for task in tasks:
        d = icl[icl.task == task]
        ks = shot_counts(cfg["k_short"] if task in short else cfg["k_eval"])
        assert sorted(d.k.unique()) == ks, task
        # one row per (instance, seed, K, item)
        assert len(d) == cfg["inst"] * len(cfg["seeds"]) * len(ks) * cfg["n_test"], task
        assert not d.duplicated(["inst", "seed", "k", "item"]).any()
    assert icl.correct.isin([0.0, 1.0]).all() and (icl.nll >= 0).all()
    base = unpack_frame(record["baselines"])
    for N in cfg["n_features"]:
        for method in ("k-NN", "logistic regression"):
            b = base[(base.task == f"linear N={N}") & (base.method == method)]
            assert sorted(b.k.unique()) == shot_counts(cfg["k_eval"])
            assert len(b) == cfg["inst"] * len(cfg["seeds"]) * len(shot_counts(cfg["k_eval"])) * cfg["n_test"]
    add = {m: unpack_frame(f) for m, f in record["addition"].items()}
    assert {"given rationales", "Unsupervised ICL"} <= set(add)
    assert sorted(add["given rationales"].k.unique()) == shot_counts(cfg["k_add"])
    ft = unpack_frame(record["finetune"]["rows"])
    assert len(ft) == cfg["ft_inst"] * cfg["n_test"] and f"ICL ({cfg['k_train']} shots)" in ft.columns


def test_gpu_preset_is_the_chapters():
    mod = load_script(SCRIPT)
    assert chapter_presets("30_manyshot.ipynb")["gpu"] == mod.GPU
    nb = nbformat.read(ROOT / "nbs" / "30_manyshot.ipynb", as_version=4)
    mix = next(c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("MIX = "))
    assert eval(mix.split("\n")[0].split("=", 1)[1]) == mod.MIX


def test_calls_checkpoint_and_resume(tmp_path):
    """The GPU run in several calls: the first trains and saves one small checkpoint, a middle call resumes it and saves
    the next, the last resumes and evaluates; each call is numbered from its checkpoint (so it draws new task data)."""
    ckpts = [tmp_path / "ckpt" / f"manyshot_ckpt{i}.safetensors" for i in (1, 2)]
    def call(*args):
        return run_script(SCRIPT, "--smoke", *args)
    call("--steps", 4, "--ckpt-out", ckpts[0], "--out", tmp_path / "call1.json")
    assert ckpts[0].stat().st_size < 16 * 2**20
    part = json.loads((tmp_path / "call1.json").read_text())
    assert part["step"] == 4 and "icl" not in part and part["part"] == "call 1 (meta-training only)"
    out = call("--steps", 8, "--resume", ckpts[0], "--ckpt-out", ckpts[1], "--out", tmp_path / "call2.json")
    assert "resumed at step 4" in out and "call 2" in out
    out = call("--resume", ckpts[1], "--out", tmp_path / "final.json")
    assert "resumed at step 8" in out and "call 3" in out
    rec = json.loads((tmp_path / "final.json").read_text())
    assert rec["steps"] == rec["preset"]["steps"] == 12
    assert [(c["call"], c["steps"]) for c in rec["calls"]] == [(1, 4), (2, 4), (3, 4)]
    assert rec["finetune"]["rows"] is not None and not rec["skipped"]
