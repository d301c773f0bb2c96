"""The MoA chapter's GPU scripts on their CPU --smoke paths: benchmarks/train_moa_prior.py (a few steps, then the saved
checkpoint loads with from_pretrained and carries its provenance) and benchmarks/bench_two_expert_attention.py (tiny
shapes through the Triton interpreter, every implementation checked, JSON with device, versions, date and args)."""
import json

import numpy as np
import torch
from script_runs import INTERPRET_ENV, ROOT, run_script

import tinylab.moa as moa


def run(script, *args):
    return run_script(ROOT / "benchmarks" / script, *args, env=INTERPRET_ENV, timeout=600)


def test_train_moa_prior_smoke(tmp_path):
    folder = tmp_path / "moa_prior"
    log = run("train_moa_prior.py", "--smoke", "--out", str(folder))
    assert "saved" in log
    unet, te, ddpm, prov = moa.load_prior(folder)
    for key in ("commit", "script", "args", "steps", "final_loss", "device", "date", "torch", "prediction_type"):
        assert key in prov, key
    assert prov["script"] == "benchmarks/train_moa_prior.py" and prov["steps"] == 3 and prov["args"]["smoke"]
    assert prov["commit"] == INTERPRET_ENV["TINYLAB_COMMIT"] and ddpm.config.prediction_type == prov["prediction_type"] == "v_prediction"
    assert not any(f.is_dir() for f in folder.iterdir())    # flat: the GPU run returns plain files only
    assert (folder / "diffusion_pytorch_model.safetensors").exists() and (folder / "model.safetensors").exists()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 8e6, size                                  # a small checkpoint
    with torch.no_grad():                                    # it runs as the chapter uses it
        ctx = te(moa.encode_captions(["red object topleft day"])).last_hidden_state
        assert moa.prior_pred(unet, torch.randn(1, 3, 16, 16), torch.tensor([3]), ctx).shape == (1, 3, 16, 16)
    # resuming continues the step count
    run("train_moa_prior.py", "--smoke", "--resume", "--out", str(folder))
    assert moa.load_prior(folder)[3]["steps"] == 6


def test_bench_two_expert_attention_smoke(tmp_path):
    out = tmp_path / "tea.json"
    run("bench_two_expert_attention.py", "--smoke", "--out", str(out))
    rec = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "args", "rows", "checks", "summary"):
        assert key in rec, key
    assert rec["checks"] and all(c["ok"] for c in rec["checks"])
    impls = {r["impl"] for r in rec["rows"]}
    assert {"fused (mixed)", "fused (split)", "2 x SDPA + mix", "2 x SDPA + split mix", "1 SDPA"} <= impls


def test_moa_leak_experiment_smoke(tmp_path):
    folder = tmp_path / "prior"
    run("train_moa_prior.py", "--smoke", "--out", str(folder))
    out = tmp_path / "leak.json"
    run("moa_leak_experiment.py", "--smoke", "--prior", str(folder), "--out", str(out))
    rec = json.loads(out.read_text())
    assert [r["variant"] for r in rec["rows"]] == ["prior", "paper", "router x10", "+ background loss"]
    assert all(np.isfinite([r["drift"], r["outside"], r["inside"]]).all() for r in rec["rows"])


def test_train_moa_personalise_smoke(tmp_path):
    "benchmarks/train_moa_personalise.py on the recorded prior: a few CPU steps per model, the JSON the chapter renders, a resume."
    out = tmp_path / "pers"
    log = run("train_moa_personalise.py", "--smoke", "--out", str(out))
    assert "wrote" in log
    rec = json.loads((out / "moa_personalise_h200.json").read_text())
    for key in ("device", "torch", "date", "commit", "args", "phases", "rows", "per_model", "grid", "prior", "steps_total"):
        assert key in rec, key
    assert rec["commit"] == INTERPRET_ENV["TINYLAB_COMMIT"] and rec["args"]["smoke"]
    rows = {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == {"moa_half", "moa_prior_init", "finetune"}
    for v in ("moa_half", "moa_prior_init"):
        assert rows[v]["forced_prior_drift_max"] == 0.0                 # routing all to the prior: no drift at all
        assert rows[v]["control"]["outcome"] == "does not hold"          # and no subject: the control fails the row
        assert 0 <= rows[v]["router_outside"] <= 1 and "oracle_router" in rows[v]
        assert rows[v]["headline"]["outcome"] in ("holds", "does not hold", "inconclusive")
    assert np.isfinite([r["drift"] for r in rec["rows"]]).all()
    assert len(rec["grid"]["images"]["prior"]) == len(rec["grid"]["prompts"])
    tar = out / "moa_personalise_weights.tar.gz"
    assert tar.exists() and tar.stat().st_size < 16 * 2 ** 20
    out2 = tmp_path / "pers2"
    run("train_moa_personalise.py", "--smoke", "--out", str(out2), "--resume", str(tar))
    rec2 = json.loads((out2 / "moa_personalise_h200.json").read_text())
    assert rec2["steps_total"] == {v: 2 * rec["steps_total"][v] for v in rec["steps_total"]}
