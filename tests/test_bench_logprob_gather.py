"""The GPU benchmark of the fused log-softmax + gather runs its CPU smoke path: every implementation checked
before it is timed, and a JSON record with device, versions, date and arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_checked_json(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_logprob_gather.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    for key in ("device", "date", "torch", "triton", "args", "rows", "checks"):
        assert key in record, key
    assert record["args"]["smoke"] is True and record["all_checks_passed"]
    forms = {r["form"] for r in record["rows"]}
    assert forms == {"logits", "hidden"}
    assert all(r["ms"] > 0 for r in record["rows"])
    assert any("ours" in r["impl"] for r in record["rows"] if r["form"] == "logits")
