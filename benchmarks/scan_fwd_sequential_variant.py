"""A development variant of the selective-scan forward (issue #15), not used by the package: it walks time one step
at a time, h = exp(delta A) h + delta u B and y = C h + D u at every step, instead of the package kernel's blocks of
BLOCK_T steps scanned with `tl.associative_scan` (fewer operations per element, no extraction of a block's last
row, but one dependent step after another). Timed beside the package's kernel (its default blocks; autotuned in the
recorded run) in one run, on GPU time from CUDA graphs (`tinylab.core.cuda_graph_ms`), over its launch settings
(channels a program, warps, steps unrolled), each gated against the package's output first. The best setting's time
over the package kernel's is what page 10a reports.
Usage: PYTHONPATH=. python3 benchmarks/scan_fwd_sequential_variant.py --out book/results/scan_fwd_sequential_h200.json
With TRITON_INTERPRET=1 (any machine) it checks the variant against `selective_scan_ref` on small odd sizes only."""
import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

from bench_ssm import rel_err   # the scan benchmark's error measure (this script's folder is on the path)
from tinylab.kernels import selective_scan as ss

GRID = dict(block_d=(8, 16, 32), warps=(1, 2, 4), unroll=(8, 16))
SHAPES = [(4, 2048, 1536, 16), (1, 2048, 1536, 16), (2, 8192, 1024, 16)]   # (batch, T, D, N)


@triton.jit
def scan_fwd_sequential_kernel(U, DELTA, A, B, C, DSKIP, Y, HT, T, DM, N, HAS_D: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    "One program: one sequence, BLOCK_D channels and all N states, walking time one step at a time."
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < DM, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * 1.4426950408889634
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_base, bc_base = pid_b * T * DM + offs_d, pid_b * T * N + offs_n
    for t0 in range(0, T, UNROLL):
        for i in tl.static_range(UNROLL):
            t = t0 + i                         # steps past T load delta = 0: decay 1, input 0
            ok_d, ok_n = mask_d & (offs_d * 0 + t < T), mask_n & (offs_n * 0 + t < T)
            dt = tl.load(DELTA + x_base + t * DM, mask=ok_d, other=0.0).to(tl.float32)
            u = tl.load(U + x_base + t * DM, mask=ok_d, other=0.0).to(tl.float32)
            b = tl.load(B + bc_base + t * N, mask=ok_n, other=0.0).to(tl.float32)
            c = tl.load(C + bc_base + t * N, mask=ok_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * a) * h + (dt * u)[:, None] * b[None, :]
            y = tl.sum(h * c[None, :], axis=1)
            if HAS_D:
                y += dskip * u
            tl.store(Y + x_base + t * DM, y.to(Y.dtype.element_ty), mask=ok_d)
    tl.store(HT + pid_b * DM * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


def scan_fwd_sequential(u, delta, A, B, C, D=None, block_d=16, warps=2, unroll=8):
    "The variant's forward: (y, h_T) as `selective_scan_triton` returns them (no h0)."
    bsz, T, dm = u.shape
    n = A.shape[1]
    y = torch.empty_like(u)
    hT = torch.empty(bsz, dm, n, device=u.device, dtype=torch.float32)
    scan_fwd_sequential_kernel[(bsz, triton.cdiv(dm, block_d))](
        u, delta, A, B, C, D if D is not None else A, y, hT, T, dm, n, HAS_D=D is not None, BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(n), UNROLL=unroll, num_warps=warps)
    return y, hT


def check_interpreted():
    "Against the definition on small odd sizes, float32 and bfloat16 (the interpreter)."
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        kw = ss.random_inputs(2, 37, 13, 5, dtype=dtype, seed=3)
        y_ref, h_ref = ss.selective_scan_ref(**kw)
        y, h = scan_fwd_sequential(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], block_d=8, warps=1, unroll=4)
        errs = rel_err(y, y_ref), rel_err(h, h_ref)
        print(f"{dtype}: rel err y {errs[0]:.1e}, h_T {errs[1]:.1e}")
        assert max(errs) < tol, errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return check_interpreted()
    from tinylab.core import cuda_graph_ms
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), commit=os.environ.get("TINYLAB_COMMIT"),
               command=" ".join(["python3", *sys.argv]), grid=GRID, rows=[])
    for (b, T, d, n), dtype in itertools.product(SHAPES, (torch.bfloat16, torch.float32)):
        kw = ss.random_inputs(b, T, d, n, dtype=dtype, device="cuda", seed=1)
        y0, h0 = ss.selective_scan_triton(**kw)
        base_ms = cuda_graph_ms(lambda: ss.selective_scan_triton(**kw))
        for bd, w, un in itertools.product(*GRID.values()):
            if bd * 16 < 32 * w:                    # fewer (channel, state) pairs than threads
                continue
            run = lambda: scan_fwd_sequential(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], bd, w, un)
            y, h = run()
            err = max(rel_err(y, y0), rel_err(h, h0))
            row = dict(batch=b, T=T, D=d, N=n, dtype=str(dtype)[6:], block_d=bd, warps=w, unroll=un, rel_err=err,
                       package_ms=base_ms)
            if err < (1e-3 if dtype == torch.float32 else 2e-2):   # no timing on a red gate
                row["ms"] = cuda_graph_ms(run)
                row["vs_package"] = row["ms"] / base_ms
            rec["rows"].append(row)
        print(json.dumps(min((r for r in rec["rows"] if "ms" in r and r["batch"] == b and r["T"] == T
                              and r["dtype"] == str(dtype)[6:]), key=lambda r: r["ms"])), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
