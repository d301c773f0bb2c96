"""The shared-prefix attention GPU benchmark still runs (its `--smoke` sizes, on the CPU under TRITON_INTERPRET=1), so
that a GPU session does not spend its time finding a broken script."""
import json

from script_runs import INTERPRET_ENV, ROOT, run_script


def test_shared_prefix_bench_smoke(tmp_path):
    out = tmp_path / "result.json"
    run_script(ROOT / "benchmarks" / "bench_shared_prefix_attention.py", "--smoke", out, env=INTERPRET_ENV, timeout=600)
    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "args", "gate", "tuning", "config", "rows"):
        assert key in result, key
    assert result["commit"] == INTERPRET_ENV["TINYLAB_COMMIT"] and result["args"]["smoke"]
    assert result["gate"]["float32"] < 1e-4 and result["gate"]["bfloat16"] < 1e-2
    methods = {r["method"] for r in result["rows"]}
    assert {"ours", "sdpa_expanded", "reencode"} <= methods
    for row in result["rows"]:
        assert row["ms"] > 0 and 0 <= row["frac_peak"] and 0 <= row["frac_bw"]
        assert row.get("rel_err", 0) < 1e-4                            # fp32 in the smoke run
    assert not result["skipped"]
