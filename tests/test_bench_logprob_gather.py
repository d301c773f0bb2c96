"""The GPU benchmark of the fused log-softmax + gather runs its CPU smoke path: every implementation checked
before it is timed, and a JSON record with device, versions, date and arguments."""
import json

from script_runs import INTERPRET_ENV, ROOT, run_script


def test_bench_smoke_writes_checked_json(tmp_path):
    out = tmp_path / "smoke.json"
    run_script(ROOT / "benchmarks" / "bench_logprob_gather.py", "--smoke", "--out", out, env=INTERPRET_ENV, timeout=600)
    record = json.loads(out.read_text())
    for key in ("device", "date", "torch", "triton", "args", "rows", "checks"):
        assert key in record, key
    assert record["args"]["smoke"] is True and record["all_checks_passed"]
    forms = {r["form"] for r in record["rows"]}
    assert forms == {"logits", "hidden"}
    assert all(r["ms"] > 0 for r in record["rows"])
    assert any("ours" in r["impl"] for r in record["rows"] if r["form"] == "logits")
