"""Where a timestep-norm call's time goes at short lengths, where the host sets the pace (issue #15,
nbs/11b_timestep_norm.ipynb, "Speed"). For the training forward and inference, as landed and always cut into time
segments (`one_launch_steps=0`: a first pass, then the forward), and for pieces of the wrapper: the host's
microseconds per call (`--calls` calls issued back to back, the clock stopped before the synchronisation), do_bench's
mean and median of one call (L2 flushed before each), and the GPU time of one call replayed from a CUDA graph.
Usage: PYTHONPATH=. python3 benchmarks/tsn_host_time.py --out OUT.json"""
import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import tinylab.kernels.timestep_norm as tsn
from tinylab.core import cuda_graph_ms

B, D, G = 4, 1024, 32


def host_us(fn, calls):
    "Host microseconds per call: `calls` calls issued back to back, timed before the synchronisation."
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def with_tuning(fn, **tuning):
    "`fn` run with `tuning` set in the kernel's TUNING, restored after each call."
    def call():
        landed = dict(tsn.TUNING)
        tsn.TUNING.update(tuning)
        try:
            return fn()
        finally:
            tsn.TUNING.update(landed)
    return call


def pieces(x, w, w_grad, bias):
    "The calls timed: the wrapper as landed and always cut into segments (two launches), its launch function, and parts."
    training = lambda: tsn.timestep_norm(x, G, w_grad, bias, backend="triton")
    inference = lambda: tsn.timestep_norm(x, G, w, bias, backend="triton")
    return {
        "timestep_norm, training": training,
        "timestep_norm, inference": inference,
        "timestep_norm, training, segmented": with_tuning(training, one_launch_steps=0),
        "timestep_norm, inference, segmented": with_tuning(inference, one_launch_steps=0),
        "_timestep_norm_fwd, save": lambda: tsn._timestep_norm_fwd(x, w, bias, None, None, None, G, 1e-5, True),
        "_timestep_norm_fwd, no save": lambda: tsn._timestep_norm_fwd(x, w, bias, None, None, None, G, 1e-5, False),
        "seven torch.empty": lambda: [torch.empty(B, G, device="cuda") for _ in range(7)],
        "x.add(1.0)": lambda: x.add(1.0),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/tsn_host_time.py", tuning=dict(tsn.TUNING),
               shape=dict(B=B, D=D, groups=G), rows=[])
    w, bias = torch.ones(D, device="cuda"), torch.zeros(D, device="cuda")
    w_grad = w.clone().requires_grad_()
    for T in args.lengths:
        x = torch.randn(B, T, D, device="cuda")
        for name, fn in pieces(x, w, w_grad, bias).items():
            row = dict(T=T, piece=name,
                       host_us=host_us(fn, args.calls),
                       bench_mean_ms=do_bench(fn, warmup=10, rep=100, return_mode="mean"),
                       bench_median_ms=do_bench(fn, warmup=10, rep=100, return_mode="median"))
            try:
                row["graph_ms"] = cuda_graph_ms(fn)
            except Exception as e:  # noqa: BLE001 - the table shows the host time alone
                row["graph_error"] = f"{type(e).__name__}: {str(e)[:100]}"
            row["host_us_again"] = host_us(fn, args.calls)
            print(json.dumps(row), flush=True)
            rec["rows"].append(row)
    Path(args.out).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
