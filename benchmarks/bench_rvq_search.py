"""GPU benchmark of the fused residual-vector-quantisation search (Melodist chapter, nbs/41a_rvq_search.ipynb): encode
N = 65,536 vectors through S stages of C codes of dimension D, the kernel (default "tf32": TF32 scores, the best two
rescored in fp32; at two small shapes also "ieee": fp32 scores, and "tf32x3") against the anchors of ../shared/anchors/rvq_search:
per-stage addmm + argmin in TF32 and in fp32 (fp32 is our PyTorch reference) and vector-quantize-pytorch's ResidualVQ
(eval, no grad, the same codebooks copied in; skipped if the package is missing). Every implementation is checked first
against a float64 search on the first 4,096 vectors (no timing on a red gate): code agreement, rows that differ outside a
near-tie (the float64 search's best two distances within a relative 1e-5 at the first stage that differs: these are
what "fp32 codes" means here), and the quantisation error over float64's. Times: triton.testing.do_bench, min and
median of its repeats. FLOPs = 2 S N C D; bytes = the floor any method moves (x, codebooks, codes, quantized once).
Imports torch, triton, tinylab.kernels.rvq_search (and vector_quantize_pytorch if present); triton 3.6 and 3.9.

GPU:  PYTHONPATH=.:.baselines/site python3 benchmarks/bench_rvq_search.py --out book/results/rvq_search_h200.json
      (first: python3 -m pip install -q --no-index --no-deps --no-compile --target .baselines/site .baselines/rvq_search/wheels/*.whl)
CPU:  PYTHONPATH=. python3 benchmarks/bench_rvq_search.py --smoke --out /tmp/rvq_smoke.json"""
import argparse
import datetime
import json
import os
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import tinylab.kernels.rvq_search as rvq_module  # noqa: E402
from tinylab.kernels.rvq_search import rvq_code_agreement, rvq_search  # noqa: E402

# (S, C, D): the anchor's three shapes and the 8 x 1024 x 128 first, then one axis at a time around 8 x 1024 x 128
ANCHOR_SHAPES = [(4, 256, 64), (8, 1024, 128), (32, 1024, 128), (16, 4096, 512)]
SHAPES = ANCHOR_SHAPES + [(4, 1024, 128), (16, 1024, 128), (8, 256, 128), (8, 4096, 128), (8, 1024, 64), (8, 1024, 512)]
SMOKE_SHAPES = [(2, 40, 20), (3, 33, 70)]
# the kernel's fp32 ("ieee") and tf32x3 variants only here (ieee's fp32 tl.dot is far slower at D = 128: 146 ms at 8 x 1024
# x 128 in the first run); everywhere else the default, tf32 + fp32 rescoring (tf32x3 also at the shape)
FULL_PRECISION_SHAPES = [(4, 256, 64), (8, 1024, 64)]
ANCHOR_MS = {(8, 1024, 128): dict(tf32=2.16, fp32=5.18, residualvq=17.3),       # the figures (H200, torch 2.11)
             (4, 256, 64): dict(tf32=0.53, fp32=0.74, residualvq=2.82),
             (32, 1024, 128): dict(tf32=8.50, fp32=20.6, residualvq=78.4),
             (16, 4096, 512): dict(tf32=21.9, fp32=98.8, residualvq=186.9)}
# the device's limits (dense, no sparsity), from NVIDIA's datasheets: TF32 tensor cores, fp32 CUDA cores, HBM bandwidth
LIMITS = {"H200": dict(tf32_tflops=494.7, fp32_tflops=66.9, hbm_tbs=4.8, source="NVIDIA H200 SXM datasheet"),
          "H100": dict(tf32_tflops=494.7, fp32_tflops=66.9, hbm_tbs=3.35, source="NVIDIA H100 SXM datasheet")}
MARGIN = 1e-5
CHECK_ROWS = 4096


def limits_for(name):
    for key, lim in LIMITS.items():
        if key in name:
            return lim
    return dict(tf32_tflops=float("nan"), fp32_tflops=float("nan"), hbm_tbs=float("nan"), source="unknown device")


def rvq_addmm(x, cbs, cbn):
    "The anchor: one addmm per stage, argmin(||c||^2 - 2 r.c); in fp32 this is rvq_search_reference's loop."
    r, idx = x.clone(), []
    for cb, n2 in zip(cbs, cbn):
        i = torch.addmm(n2, r, cb.t(), alpha=-2).argmin(1)
        r -= cb[i]
        idx.append(i)
    return torch.stack(idx, 1), x - r


def make_residualvq(x, S, C, D, cbs, dev):
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    vq = ResidualVQ(dim=D, num_quantizers=S, codebook_size=C).to(dev).eval()
    for s, layer in enumerate(vq.layers):
        layer._codebook.embed.data.copy_(cbs[s][None])

    def run():
        with torch.no_grad():
            q, i, _ = vq(x[None])
        return i[0], q[0]
    return run


def timer(fn, smoke):
    "(min, median) milliseconds."
    if smoke:   # the interpreter: one wall-clock call, for the plumbing only
        t = time.perf_counter(); fn(); ms = (time.perf_counter() - t) * 1e3
        return ms, ms
    from triton.testing import do_bench
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    est = (time.perf_counter() - t) * 1e3
    lo, med = do_bench(fn, warmup=max(10, 1.5 * est), rep=max(50, 6 * est), quantiles=[0.0, 0.5])
    return lo, med


def write(args, name, lim, N, rows, checks, errors, summary, t_all, dev):
    record = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda if dev == "cuda" else None,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=os.environ.get("TINYLAB_COMMIT"), args=vars(args), N=N, limits=lim, margin=MARGIN,
                  check_rows=CHECK_ROWS, anchor_ms={f"S {s}, C {c}, D {d}": v for (s, c, d), v in ANCHOR_MS.items()},
                  rows=rows, checks=checks, errors=errors, summary=summary, seconds=time.perf_counter() - t_all,
                  all_checks_passed=all(c["ok"] for c in checks) and not errors,
                  goal="faster than the TF32 addmm + argmin, with fp32 codes (issue 19)",
                  tuned={str(k): v for k, v in rvq_module._TUNED.items()},
                  script="benchmarks/bench_rvq_search.py")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter on a CPU")
    p.add_argument("--n", type=int, default=None, help="vectors (default 65536; 200 with --smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU path")
    dev = "cpu" if smoke else "cuda"
    N = args.n or (200 if smoke else 65536)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter, smoke)"
    lim = limits_for(name)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, checks, errors, summary = [], [], [], {}
    t_all = time.perf_counter()
    for S, C, D in (SMOKE_SHAPES if smoke else SHAPES):
        torch.manual_seed(0)
        x = torch.randn(N, D, device=dev)
        cb = torch.stack([torch.randn(C, D, device=dev) * 0.75 ** s for s in range(S)])   # residuals shrink per stage
        cbs = list(cb)
        cbn = [(c * c).sum(1) for c in cbs]

        def tf32_addmm():
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return rvq_addmm(x, cbs, cbn)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False

        precs = ("tf32",) + (("ieee", "tf32x3") if smoke or (S, C, D) in FULL_PRECISION_SHAPES else
                             ("tf32x3",) if (S, C, D) == (8, 1024, 128) else ())
        impls = {f"kernel {prec}": (lambda prec=prec: rvq_search(x, cb, backend="triton", precision=prec)) for prec in precs}
        impls.update({"addmm + argmin TF32": tf32_addmm, "addmm + argmin fp32 (reference)": lambda: rvq_addmm(x, cbs, cbn)})
        vq = make_residualvq(x, S, C, D, cbs, dev)
        if vq is not None:
            impls["ResidualVQ (vector-quantize-pytorch)"] = vq
        xc = x[:CHECK_ROWS]
        truth_q = xc.double() - rvq_search(xc.double(), cb.double(), backend="torch")[1].double()   # float64 residual
        e_ref = truth_q.pow(2).sum().item()
        flops = 2 * S * N * C * D
        nbytes = 4 * (N * D * 2 + S * C * D) + 8 * N * S
        ms = {}
        for impl, fn in impls.items():
            try:
                codes, q = fn()
                agree = rvq_code_agreement(codes[:CHECK_ROWS], xc, cb, margin=MARGIN, dtype=torch.float64)
                qerr = (xc.double() - q[:CHECK_ROWS].double()).pow(2).sum().item() / max(e_ref, 1e-30)
                ok = agree["agree"] > 0.99 and abs(qerr - 1) < 1e-3           # the anchor's gate
                checks.append(dict(S=S, C=C, D=D, impl=impl, ok=ok, qerr_over_fp64=qerr, fp32_codes=agree["unexplained"] == 0,
                                   **agree))
                if not ok:
                    print(f"RED GATE {impl} at {(S, C, D)}: {agree}, qerr {qerr:.5f}; not timed", flush=True)
                    continue
                lo, med = timer(fn, smoke)
            except Exception as e:   # record and go on: the other rows still come back
                errors.append(dict(S=S, C=C, D=D, impl=impl, error=f"{type(e).__name__}: {e}"[:2000],
                                   trace=traceback.format_exc()[-3000:]))
                print(f"ERROR {impl} at {(S, C, D)}: {type(e).__name__}: {e}", flush=True)
                continue
            ms[impl] = lo
            tensor_core = "tf32" in impl.lower() or "TF32" in impl
            peak = lim["tf32_tflops"] if tensor_core else lim["fp32_tflops"]
            rows.append(dict(S=S, C=C, D=D, N=N, impl=impl, ms=lo, median_ms=med, TFLOPs=flops / lo / 1e9,
                             peak_used="TF32 tensor cores" if tensor_core else "fp32 CUDA cores",
                             frac_peak_flops=flops / lo / 1e9 / peak, GBs_floor=nbytes / lo / 1e6,
                             frac_hbm=nbytes / lo / 1e6 / (lim["hbm_tbs"] * 1e3),
                             fp32_codes=checks[-1]["fp32_codes"], agree=checks[-1]["agree"]))
        line = "  ".join(f"{k} {v:.3f}" for k, v in ms.items())
        print(f"S{S} C{C} D{D} N{N}: {line} ms", flush=True)
        # the kernel's row: the fastest precision whose codes are fp32 codes (no row differs outside a near-tie)
        passing = {k: v for k, v in ms.items() if k.startswith("kernel") and
                   next(c for c in checks if (c["S"], c["C"], c["D"], c["impl"]) == (S, C, D, k))["fp32_codes"]}
        if passing and "addmm + argmin TF32" in ms:
            best = min(passing, key=passing.get)
            chk = next(c for c in checks if (c["S"], c["C"], c["D"], c["impl"]) == (S, C, D, best))
            row = next(r for r in rows if (r["S"], r["C"], r["D"], r["impl"]) == (S, C, D, best))
            summary[f"S {S}, C {C}, D {D}"] = dict(
                S=S, C=C, D=D, precision=best.split()[-1], kernel_ms=ms[best], tf32_addmm_ms=ms["addmm + argmin TF32"],
                fp32_addmm_ms=ms.get("addmm + argmin fp32 (reference)", float("nan")),
                residualvq_ms=ms.get("ResidualVQ (vector-quantize-pytorch)", float("nan")),
                vs_tf32_addmm=ms["addmm + argmin TF32"] / ms[best],
                vs_fp32_addmm=ms.get("addmm + argmin fp32 (reference)", float("nan")) / ms[best],
                vs_residualvq=ms.get("ResidualVQ (vector-quantize-pytorch)", float("nan")) / ms[best],
                frac_peak_flops=row["frac_peak_flops"], frac_hbm=row["frac_hbm"], agree=chk["agree"],
                unexplained=chk["unexplained"], anchor_shape=(S, C, D) in ANCHOR_MS)
        del x, cb, cbs, cbn, impls, vq
        if dev == "cuda":
            torch.cuda.empty_cache()
        record = write(args, name, lim, N, rows, checks, errors, summary, t_all, dev)   # after every shape: a cut run keeps its rows
    print(f"wrote {args.out}: {len(rows)} timings, {sum(c['ok'] for c in checks)}/{len(checks)} checks passed, "
          f"{len(errors)} errors, {record['seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
