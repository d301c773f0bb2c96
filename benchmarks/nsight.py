"""Nsight Compute's view of one kernel launch, for the kernel benchmarks (`--ncu` in bench_ssm.py and
bench_megalodon.py): the metrics that say what bounds a kernel, parsed from `ncu --csv --page raw`.
The benchmark re-runs itself as the profiled child with a hidden `--ncu-target T`; the child compiles first and
brackets one launch with `cudaProfilerStart/Stop` (`profiled`), so only that launch is measured."""
import csv
import io
import os
import subprocess
import sys
import traceback

import torch

METRICS = ["gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__issue_active.avg.pct_of_peak_sustained_active",
           "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
           "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
           "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
           "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"]


def profiled(fn):
    "The child's side: run `fn` once to compile and warm up, then once more between profiler start and stop."
    fn(); torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn(); torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def profile(script: str, target: str, kernel_regex: str, timeout: float) -> dict:
    """Run `script --out /dev/null --ncu-target target` under ncu and return the last profiled launch of a kernel
    matching `kernel_regex`: its name, block, grid and `METRICS` (an "error" entry instead if it failed)."""
    ncu = subprocess.run("command -v ncu", shell=True, capture_output=True, text=True).stdout.strip()
    if not ncu:
        return {"error": "ncu absent"}
    cmd = [ncu, "--csv", "--page", "raw", "--profile-from-start", "off", "--metrics", ",".join(METRICS),
           "-k", f"regex:{kernel_regex}", sys.executable, os.path.abspath(script), "--out", "/dev/null",
           "--ncu-target", target]
    pr = None
    try:
        pr = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": "."})
        rows = list(csv.reader(io.StringIO("\n".join(ln for ln in pr.stdout.splitlines() if ln.startswith('"')))))
        head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
        keys, vals = rows[head], rows[-1]
        return {k: vals[i] for i, k in enumerate(keys) if k in METRICS + ["Kernel Name", "Block Size", "Grid Size"]}
    except Exception:  # noqa: BLE001 - report why, keep benchmarking
        return {"error": traceback.format_exc()[-600:], "stderr": pr.stderr[-800:] if pr else ""}
