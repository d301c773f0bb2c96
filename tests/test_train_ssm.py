"""The SSM chapter's GPU script (benchmarks/train_ssm.py) still runs: every job at its --smoke sizes on the CPU (the S6
models through the Triton kernel in its interpreter), a resumed job continues from its checkpoint, and the merged JSON has
what the chapter reads."""
import json
import tarfile

from script_runs import INTERPRET_ENV, ROOT, run_script


def test_train_ssm_smoke(tmp_path):
    out, work = tmp_path / "ssm.json", tmp_path / "work"
    run_script(ROOT / "benchmarks" / "train_ssm.py", "smoke", "--out", out, "--work", work, env=INTERPRET_ENV, timeout=600)
    res = json.loads(out.read_text())
    assert not res["errors"], res["errors"]
    jobs = {r["job"]: r for r in res["rows"]}
    assert set(jobs) == set(res["jobs"])
    for r in jobs.values():
        assert r["steps"] > 0 and 0 <= r["final_acc"] <= 1 and len(r["items"]) == r["setting"]["n_eval"]
        assert r["curve"]["step"][0] == 0 and len(r["curve"]["step"]) == len(r["curve"]["acc"])
    assert jobs["copy1024:s6"]["resumed_from"]["step"] > 0                 # the resumed run started from the checkpoint
    for key in ("induction:s6", "induction:s4d", "induction:attn"):
        ext = jobs[key]["extrapolation"]
        assert set(ext) == {str(L) for L in jobs[key]["setting"]["test_lengths"]}
        assert all(v is None or 0 <= v <= 1 for v in ext.values())
    with tarfile.open(work / "ckpt.tar.gz") as tf:
        assert len([n for n in tf.getnames() if n.endswith(".pt")]) == len(jobs)
    assert res["device"] and res["torch"] and "commit" in res and res["paper"]["table1"]["Mamba"]["S6"] == 99.8
