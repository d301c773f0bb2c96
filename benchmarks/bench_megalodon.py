"""GPU benchmark of the Megalodon chapter's kernels (nbs/11_megalodon.ipynb).

CEMA: Triton chunked scan vs the FFT convolution vs the sequential loop (and the official CUDA
EMA-parameters + FFT-convolution kernels when they build); timestep norm: Triton Welford scan vs the
PyTorch cumulative-sum reference (and the official CUDA kernel). Lengths 1k to 64k, batch 4, 1024
channels, N = 16. Every kernel is checked against its reference before it is timed (no speedup on a red
gate); times are medians of `triton.testing.do_bench`; the floor is reading the input and writing the
output once at the copy bandwidth measured here.

Run: PYTHONPATH=. python3 benchmarks/bench_megalodon.py --out book/results/megalodon_kernels_h200.json
(`--smoke`: tiny sizes on the CPU under TRITON_INTERPRET=1, no official kernels: checks the script only;
`--ncu`: after the sweep, Nsight Compute's counters of the CEMA forward, fp32 and bf16, and backward at T = 8192.)
Imports only torch, triton, numpy, pandas, tinylab.kernels / tinylab.core and benchmarks/nsight.py (no datasets on
the GPU)."""
import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone

import numpy as np
import pandas as pd

if "--smoke" in sys.argv:  # the CPU smoke run: Triton's interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton
from triton.testing import do_bench

from tinylab.core import cuda_graph_ms
from tinylab.kernels.cema import cema, cema_fft, cema_ref
from tinylab.kernels.timestep_norm import timestep_norm, timestep_norm_ref

import nsight  # noqa: E402  (benchmarks/nsight.py: this script's folder is on the path)

B, D, N, G = 4, 1024, 16, 32
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def params(D, N, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    alpha, delta = torch.rand(D, N, generator=g) * 0.9 + 0.05, torch.rand(D, N, generator=g)
    theta = torch.rand(D, 1, generator=g) * torch.arange(1, N + 1) * 2 * math.pi / N
    q = torch.polar(1 - alpha * delta, theta)
    gamma = torch.complex(torch.randn(D, N, generator=g), torch.randn(D, N, generator=g)) / math.sqrt(N)
    return alpha.to(device), q.to(device), gamma.to(device)


def rel_err(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def copy_bandwidth(smoke=False):
    "Bytes per second of a device-to-device copy of 1 GiB (read + write)."
    if smoke:
        return 1e10
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def gates(log, dev="cuda", T_gate=1000, D_gate=130):
    "Correctness of every path before any timing (odd sizes, prior states); returns a dict of max relative errors."
    out = {}
    torch.manual_seed(0)
    p, q, g = params(D_gate, N, device=dev)
    x = torch.randn(2, T_gate, D_gate, device=dev)
    h0 = torch.randn(2, D_gate, N, dtype=torch.complex64, device=dev)
    y_ref, h_ref = cema_ref(x, p, q, g, h0)
    y_tri, h_tri = cema(x, p, q, g, h0, backend="triton")
    y_fft, h_fft = cema_fft(x, p, q, g, h0)
    out["cema_fwd_fp32"] = max(rel_err(y_tri, y_ref), rel_err(h_tri, h_ref))
    out["cema_fft_vs_ref_fp32"] = max(rel_err(y_fft, y_ref), rel_err(h_fft, h_ref))
    xb = x.bfloat16()
    out["cema_fwd_bf16"] = rel_err(cema(xb, p, q, g, backend="triton")[0].float(), cema_ref(xb, p, q, g)[0].float())
    # backward: the Triton autograd Function against autograd through the FFT form
    ins = [t.clone().requires_grad_() for t in (x, p, q, g, h0)]
    ins2 = [t.clone().requires_grad_() for t in (x, p, q, g, h0)]
    dy, dh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    yt, ht = cema(*ins, backend="triton")
    yf, hf = cema_fft(*ins2)
    gt = torch.autograd.grad((yt * dy).sum() + (ht * dh.conj()).real.sum(), ins)
    gf = torch.autograd.grad((yf * dy).sum() + (hf * dh.conj()).real.sum(), ins2)
    out["cema_bwd_fp32"] = max(rel_err(a, b) for a, b in zip(gt, gf))
    # timestep norm
    xt = torch.randn(2, T_gate, 160, device=dev) * 2 + 1
    w, b = torch.randn(160, device=dev), torch.randn(160, device=dev)
    c0 = torch.tensor([0, 5], device=dev)
    m0, v0 = torch.randn(2, 8, device=dev), torch.rand(2, 8, device=dev) + 0.5
    r = timestep_norm_ref(xt, 8, w, b, c0, m0, v0)
    t = timestep_norm(xt, 8, w, b, c0, m0, v0, backend="triton")
    out["tsn_fwd_fp32"] = max(rel_err(t[0], r[0]), rel_err(t[2], r[2]), rel_err(t[3], r[3]))
    out["tsn_fwd_bf16"] = rel_err(timestep_norm(xt.bfloat16(), 8, w, b, backend="triton")[0].float(),
                                  timestep_norm_ref(xt.bfloat16(), 8, w, b)[0].float())
    ins = [u.clone().requires_grad_() for u in (xt, w, b, m0, v0)]
    ins2 = [u.clone().requires_grad_() for u in (xt, w, b, m0, v0)]
    dy = torch.randn_like(xt)
    o1 = timestep_norm(ins[0], 8, ins[1], ins[2], c0, ins[3], ins[4], backend="triton")
    o2 = timestep_norm_ref(ins2[0], 8, ins2[1], ins2[2], c0, ins2[3], ins2[4])
    g1 = torch.autograd.grad((o1[0] * dy).sum(), ins)
    g2 = torch.autograd.grad((o2[0] * dy).sum(), ins2)
    out["tsn_bwd_fp32"] = max(rel_err(a, c) for a, c in zip(g1, g2))
    log(f"gates: {out}")
    return out


def official_ops(log):
    "Build Megalodon's CUDA ops from .baselines/megalodon (see ../shared/anchors/megalodon_kernels)."
    path = os.path.join(os.getcwd(), ".baselines", "megalodon")
    if not os.path.isdir(path):
        return None, "not present (.baselines/megalodon missing)"
    try:
        t0 = time.time()
        sys.path.insert(0, path)
        from build import build
        ops = build()
        log(f"official ops built in {time.time() - t0:.0f} s")
        return ops, f"built in {time.time() - t0:.0f} s"
    except Exception as e:  # noqa: BLE001 - report why, keep benchmarking
        traceback.print_exc()
        return None, f"build failed: {type(e).__name__}: {str(e)[:300]}"


def official_cema(ops, x_bdl, p, q, g):
    "The official forward: EMA kernel by ema_parameters_fwd, then its FFT convolution (L <= 16384)."
    L = x_bdl.shape[-1]
    k, _, _ = ops.ema_parameters_fwd(p[..., None].contiguous(), q.log()[..., None].contiguous(), g.contiguous(), None, L)
    n = L if (L & (L - 1)) == 0 else 1 << L.bit_length()
    y, _ = ops.fftconv_fwd(x_bdl, torch.fft.rfft(k, n=2 * n))
    return y


def per_call_ms(calls: dict, rounds: int) -> dict:
    """Ms of one call as a user makes it, for each of `calls` (row key -> function): do_bench medians (L2 flushed before
    each call), the calls timed in turn for `rounds` rounds, and the median round kept, so that a change in the host's
    pace during the row falls on ours and the official kernels alike."""
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            times[key].append(do_bench(fn, warmup=10, rep=100, return_mode="median"))
    return {key: float(np.median(v)) for key, v in times.items()}


def graph_ms(fn):
    "GPU ms of one call from a CUDA graph (None if `fn` cannot be captured: the table then shows the call time only)."
    try:
        return cuda_graph_ms(fn)
    except Exception as e:  # noqa: BLE001
        print(f"not capturable: {type(e).__name__}: {str(e)[:120]}")
        return None


NCU_TARGETS = {"fwd:float32": "cema_fwd_kernel", "fwd:bfloat16": "cema_fwd_kernel", "bwd:float32": "cema_bwd_kernel"}


def ncu_target(target):
    "Child of --ncu: one profiled CEMA forward (`fwd:<x dtype>`) or forward and backward (`bwd:float32`) at T = 8192."
    kind, dtype = target.split(":")
    p, q, g = params(D, N)
    x = torch.randn(B, 8192, D, device="cuda", dtype=getattr(torch, dtype), requires_grad=kind == "bwd")
    if kind == "fwd":
        nsight.profiled(lambda: cema(x, p, q, g, backend="triton"))
    else:
        nsight.profiled(lambda: cema(x, p, q, g, backend="triton")[0].sum().backward())


def main():
    global B, D, N, G, do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="megalodon_kernels_h200.json")
    ap.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    ap.add_argument("--budget-s", type=float, default=400,
                    help="start no new length after this many seconds of timing (building the official ops not counted)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the per-call timings, taken in turns")
    ap.add_argument("--no-official", action="store_true", help="skip building Megalodon's CUDA ops")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1 (checks the script)")
    ap.add_argument("--ncu", action="store_true", help="after the sweep, profile the CEMA kernels at T = 8192 with Nsight Compute")
    ap.add_argument("--ncu-target", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ncu_target:
        return ncu_target(args.ncu_target)
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:6.1f}s] {s}", flush=True)
    if args.smoke:
        dev, B, D, N, G, args.lengths, args.no_official = "cpu", 1, 8, 4, 2, [24], True
        do_bench = lambda fn, warmup=0, rep=0, return_mode=None: (lambda t0: (fn(), (time.perf_counter() - t0) * 1e3)[1])(time.perf_counter())
    else:
        dev = "cuda"
    import tinylab.kernels.cema as cema_mod
    import tinylab.kernels.timestep_norm as tsn_mod
    record = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke test)", "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": os.environ.get("TINYLAB_COMMIT"),
              "args": vars(args), "dtype": "float32 (and bfloat16 x for cema_triton_bf16_ms)",
              "timing": "triton.testing.do_bench, median ms (L2 flushed before each call), a call as a user makes it, ours and "
                        "the official kernels timed in turn for --rounds rounds, the median round kept (per_call_ms); "
                        "*_graph_ms: GPU time of one call replayed from a CUDA graph of 20 (tinylab.core.cuda_graph_ms), "
                        "no launch cost; tsn_triton_ms is the training forward (keeps what the backward needs), "
                        "tsn_triton_nograd_ms inference",
              "tuning": {"cema": getattr(cema_mod, "TUNING", None), "timestep_norm": getattr(tsn_mod, "TUNING", None)},
              "shape": {"B": B, "D": D, "N": N, "groups": G}, "rows": [], "phase_s": {}}
    record["gates"] = gates(log, dev, *((19, 6) if args.smoke else (1000, 130)))
    tol = {"cema_fwd_fp32": 1e-4, "cema_fft_vs_ref_fp32": 1e-4, "cema_fwd_bf16": 1e-2, "cema_bwd_fp32": 1e-4,
           "tsn_fwd_fp32": 1e-4, "tsn_fwd_bf16": 1e-2, "tsn_bwd_fp32": 1e-3}
    record["gates_pass"] = {k: v <= tol[k] for k, v in record["gates"].items()}
    record["phase_s"]["gates"] = round(time.time() - t_start, 1)
    bw = copy_bandwidth(args.smoke)
    record["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    t0 = time.time()
    ops, status = (None, "skipped (--no-official)") if args.no_official else official_ops(log)
    record["official"] = status
    record["phase_s"]["official_build"] = round(time.time() - t0, 1)
    p, q, g = params(D, N, device=dev)
    w, bias = torch.ones(D, device=dev), torch.zeros(D, device=dev)
    w_grad = w.clone().requires_grad_()
    t0 = time.time()
    for T in args.lengths:
        if time.time() - t0 > args.budget_s:
            log(f"budget reached: T = {T} and longer not run")
            record.setdefault("skipped_lengths", []).append(T)
            continue
        if dev == "cuda":
            torch.cuda.empty_cache()
        x = torch.randn(B, T, D, device=dev)
        floor_ms = 2 * x.numel() * 4 / bw * 1e3
        row = {"T": T, "floor_ms": floor_ms}
        calls = {}   # row key -> a call as a user makes it, timed below in turns
        ok_cema = record["gates_pass"]["cema_fwd_fp32"] and record["gates_pass"]["cema_fwd_bf16"]
        ok_tsn = record["gates_pass"]["tsn_fwd_fp32"] and record["gates_pass"]["tsn_fwd_bf16"]
        try:
            if ok_cema:
                calls["cema_triton_ms"] = lambda: cema(x, p, q, g, backend="triton")
                if dev == "cuda":
                    row["cema_triton_graph_ms"] = graph_ms(lambda: cema(x, p, q, g, backend="triton"))
                xb = x.bfloat16()
                calls["cema_triton_bf16_ms"] = lambda: cema(xb, p, q, g, backend="triton")
                row["floor_bf16_ms"] = floor_ms / 2
                xg = x.clone().requires_grad_()
                def fwd_bwd():
                    y, _ = cema(xg, p, q, g, backend="triton")
                    y.backward(torch.ones_like(y))
                row["cema_triton_fwdbwd_ms"] = do_bench(fwd_bwd, warmup=3, rep=50, return_mode="median")
            row["cema_fft_ms"] = do_bench(lambda: cema_fft(x, p, q, g), warmup=3, rep=50, return_mode="median")
            if T <= 4096:
                row["cema_seq_ms"] = do_bench(lambda: cema_ref(x, p, q, g), warmup=1, rep=20, return_mode="median")
            if ops is not None and T <= 16384:
                xt = x.transpose(1, 2).contiguous()
                y_off = official_cema(ops, xt, p, q, g)
                err = rel_err(y_off.transpose(1, 2), cema_fft(x, p, q, g)[0])
                row["cema_official_relerr"] = err
                if err < 1e-3:
                    calls["cema_official_ms"] = lambda: official_cema(ops, xt, p, q, g)
                    row["cema_official_graph_ms"] = graph_ms(lambda: official_cema(ops, xt, p, q, g))
        except Exception as e:  # noqa: BLE001
            row["cema_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        try:
            if ok_tsn:
                # training forward (keeps the cumulative statistics its backward needs, as the official forward
                # does) and inference (no autograd: nothing kept)
                train = lambda: timestep_norm(x, G, w_grad, bias, backend="triton")
                infer = lambda: timestep_norm(x, G, w, bias, backend="triton")
                calls["tsn_triton_ms"], calls["tsn_triton_nograd_ms"] = train, infer
                if dev == "cuda":
                    row["tsn_triton_graph_ms"] = graph_ms(train)
                    row["tsn_triton_nograd_graph_ms"] = graph_ms(infer)
            row["tsn_torch_ms"] = do_bench(lambda: timestep_norm_ref(x, G, w, bias), warmup=3, rep=50, return_mode="median")
            if ops is not None:
                c0 = torch.zeros(B, dtype=torch.int64, device=dev)
                m0, v0 = torch.zeros(B, G, device=dev), torch.ones(B, G, device=dev)
                off = lambda: ops.group_timestep_norm_fwd(x, c0, m0, v0, w, bias, None, G, 1e-5)
                err = rel_err(off()[0], timestep_norm_ref(x, G, w, bias)[0])
                row["tsn_official_relerr"] = err
                if err < 1e-3:
                    calls["tsn_official_ms"] = off
                    row["tsn_official_graph_ms"] = graph_ms(off)
        except Exception as e:  # noqa: BLE001
            row["tsn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        try:
            row.update(per_call_ms(calls, args.rounds))
        except Exception as e:  # noqa: BLE001
            row["per_call_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        record["rows"].append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        del x
        record["phase_s"]["sweep"] = round(time.time() - t0, 1)
        record["wall_s"] = round(time.time() - t_start, 1)
        with open(args.out, "w") as f:  # write as we go: a time-out still leaves the rows so far
            json.dump(record, f, indent=2)
    df = pd.DataFrame(record["rows"])
    print(df.to_string())
    if args.ncu and dev == "cuda":
        t0 = time.time()
        record["ncu"] = {target: nsight.profile(__file__, target, kernel, 120) for target, kernel in NCU_TARGETS.items()}
        log(f"ncu: {record['ncu']}")
        record["phase_s"]["ncu"] = round(time.time() - t0, 1)
    record["wall_s"] = round(time.time() - t_start, 1)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
