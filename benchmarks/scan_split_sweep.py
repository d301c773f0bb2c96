"""Sweep of the selective scan's split in time (nbs/10a_selective_scan.ipynb, `SPLIT_PROGRAMS_PER_SM` and
`UNSPLIT_PROGRAMS_PER_SM`) on one GPU.

For each policy value (programs per SM the split aims for; 0 = no split), with the launch threshold as shipped
(a launch with `UNSPLIT_PROGRAMS_PER_SM` programs per SM is left whole) and without it, it times at batch 4 and 1
(D 1536, N 16, T 2048, the anchor shape of `bench_ssm.py`) and batch 2 (D 1024, T 4096), in float32 and bfloat16:
the forward, the forward that keeps states for the backward, and the backward. A segment count already timed for a
case is not timed again. Each split result is first checked against the unsplit one (no timing on a red gate).
Times are medians of `triton.testing.do_bench`, default blocks (`FWD_BLOCKS`; autotuned before 2026-12-02: a split
plain forward now also changes blocks, 32 x 8 whole to 8 x 32 split, so its time / unsplit time includes that). It
then picks, per pass, the value (threshold as shipped) with the least worst (time / unsplit time) over the cases,
then the least geometric mean, and writes everything as JSON; `bench_ssm.py --split-fwd F --split-bwd B` times the
chosen policy beside mamba-ssm.
Usage: PYTHONPATH=. python3 benchmarks/scan_split_sweep.py --out sweep.json [--smoke (CPU interpreter)]"""
import argparse
import datetime
import json
import math
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from bench_ssm import rel_err  # noqa: E402  (the scan benchmark's error measure; this script's folder is on the path)
from tinylab.kernels import selective_scan as ss  # noqa: E402

VALUES = [0, 4, 8, 16, 32, 64]
NEVER = 10**9               # a threshold no launch reaches: the policy value alone sets the segments


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        shapes, bench = [(1, 40, 6, 3)], lambda fn: (lambda t0: (fn(), (time.perf_counter() - t0) * 1e3)[1])(time.perf_counter())
        ss._sm_count = lambda device: 4                       # a small GPU's worth of programs, so the policy splits
    else:
        assert dev == "cuda", "this sweep needs a GPU (or --smoke)"
        shapes = [(4, 2048, 1536, 16), (1, 2048, 1536, 16), (2, 4096, 1024, 16)]
        bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    rec = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", torch=torch.__version__,
               triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/scan_split_sweep.py", values=VALUES,
               unsplit_programs_per_sm=ss.UNSPLIT_PROGRAMS_PER_SM, rows=[])
    shipped = ss.UNSPLIT_PROGRAMS_PER_SM
    for b, T, d, n in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            kw = ss.random_inputs(b, T, d, n, dtype=dtype, device=dev, seed=1)
            args_ = tuple(kw.values())
            g = torch.randn_like(kw["u"])
            passes = {"fwd": lambda: ss._scan_fwd(*args_, save=False)[:2],
                      "fwd, keeping states": lambda: ss._scan_fwd(*args_, save=True),
                      "bwd": lambda: ss.selective_scan_triton_bwd(*args_, g, None, states)}
            timed = {}                                               # (pass, segments) -> (err, ms)
            for value in VALUES:
                for threshold in (shipped, NEVER):
                    ss.SPLIT_PROGRAMS_PER_SM.update(fwd=value, bwd=value)
                    ss.UNSPLIT_PROGRAMS_PER_SM = threshold
                    if value == 0 and threshold == shipped:          # the unsplit results: what each split must equal
                        states = ss._scan_fwd(*args_, save=True)[2]
                        refs = {name: [x for x in fn() if x is not None] for name, fn in passes.items()}
                    for name, fn in passes.items():
                        if name == "bwd":
                            segments = ss._segments("bwd", b, d, triton.cdiv(d, ss.BWD_BLOCK_D), T, kw["u"].device)
                        else:
                            segments = ss._fwd_plan(b, d, T, "keeping" in name, kw["u"].device)[2]
                        if (name, segments) not in timed:
                            err = max(rel_err(o, r) for o, r in zip([x for x in fn() if x is not None], refs[name]))
                            ok = err < (tol if name != "bwd" else 10 * tol)
                            timed[(name, segments)] = (err, bench(fn) if ok else None)
                        err, ms = timed[(name, segments)]
                        row = dict(pass_=name, dtype=str(dtype).split(".")[1], batch=b, T=T, D=d, N=n, programs_per_sm=value,
                                   unsplit_programs_per_sm=None if threshold == NEVER else threshold, segments=segments,
                                   rel_err=err, ok=ms is not None)
                        if ms is not None:
                            row["ms"] = ms
                        rec["rows"].append(row)
                        print(json.dumps(row), flush=True)
            ss.SPLIT_PROGRAMS_PER_SM.update(fwd=0, bwd=0)
            ss.UNSPLIT_PROGRAMS_PER_SM = shipped
            del kw, args_, g, states, refs
            if dev == "cuda":
                torch.cuda.empty_cache()
    # per pass: the value whose worst case relative to no split is least, then the least geometric mean (red gates
    # disqualify a value). (The record of 2026-11-30 chose by the geometric mean alone: bwd 32, which slows batch 4.)
    rec["best"] = {}
    for key, names in (("fwd", ("fwd", "fwd, keeping states")), ("bwd", ("bwd",))):
        shipped_rows = [r for r in rec["rows"] if r["unsplit_programs_per_sm"] is not None]
        base = {(r["pass_"], r["dtype"], r["batch"]): r["ms"] for r in shipped_rows if r["programs_per_sm"] == 0}
        score, worst = {}, {}
        for value in VALUES:
            rows = [r for r in shipped_rows if r["programs_per_sm"] == value and r["pass_"] in names]
            if rows and all(r["ok"] for r in rows):
                worst[value] = max(r["ms"] / base[(r["pass_"], r["dtype"], r["batch"])] for r in rows)
                score[value] = math.exp(sum(math.log(r["ms"] / base[(r["pass_"], r["dtype"], r["batch"])]) for r in rows)
                                        / len(rows))
        rec.setdefault("geomean_vs_unsplit", {})[key] = score
        rec.setdefault("worst_vs_unsplit", {})[key] = worst
        rec["best"][key] = min(score, key=lambda v: (round(worst[v], 2), score[v]))
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print("best:", rec["best"], rec["geomean_vs_unsplit"])


if __name__ == "__main__":
    main()
