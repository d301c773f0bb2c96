"""GPU benchmark of the selective scan (chapter nbs/10_ssm.ipynb): Triton kernel vs sequential PyTorch vs chunked
PyTorch (eager and torch.compile) vs mamba-ssm's CUDA selective_scan (when .baselines/mamba_ss builds), forward pass,
batch 2, D 1024, N 16, T 1k..64k, float32 and bfloat16; plus fwd+bwd through the autograd Function.
Every implementation is checked against the reference before it is timed (no timing on a red gate).
Usage: PYTHONPATH=. python3 benchmarks/bench_ssm.py --out results.json [--quick]"""
import argparse
import datetime
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
import triton

from tinylab.kernels.selective_scan import (_scan_in_chunk, random_inputs, selective_scan, selective_scan_chunked,
                                            selective_scan_ref, selective_scan_triton)

T0 = time.perf_counter()


def elapsed():
    return time.perf_counter() - T0


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_ms(fn, slow=False):
    "Median ms by triton.testing.do_bench (few repetitions for the slow sequential loop)."
    if slow:
        fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        return float(np.median(ts))
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def peak_mb(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth():
    "GB/s of a device-to-device copy of 1 GiB (read + write)."
    x = torch.empty(2**28, device="cuda"); y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


CHUNK = 256


def chunk_step(u_c, dt_c, A, B_c, C_c, h):
    "One chunk of the chunked scan (float32): returns y of the chunk and the state after it."
    dA = torch.exp(dt_c[..., None] * A)
    dBu = (dt_c * u_c)[..., None] * B_c[:, :, None, :]
    pa, pb = _scan_in_chunk(dA, dBu)
    hs = pa * h[:, None] + pb
    return (hs * C_c[:, :, None, :]).sum(-1), hs[:, -1]


compiled_step = torch.compile(chunk_step, dynamic=False)


def chunked_compiled(u, delta, A, B, C, D):
    u_, dt, B_, C_ = (x.float() for x in (u, delta, B, C))
    h = u_.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for s in range(0, u.shape[1], CHUNK):
        y, h = compiled_step(u_[:, s:s + CHUNK], dt[:, s:s + CHUNK], A, B_[:, s:s + CHUNK], C_[:, s:s + CHUNK], h)
        ys.append(y)
    return (torch.cat(ys, 1) + u_ * D).to(u.dtype), h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="short lengths only (a smoke test)")
    ap.add_argument("--budget", type=float, default=370.0, help="seconds; later rows are skipped past it")
    ap.add_argument("--no-mamba", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shape": "batch 2, D 1024, N 16 (B and C shared by channels), forward unless noted; ms = median",
           "chunk": CHUNK, "rows": [], "checks": [], "skipped": [], "errors": []}

    def save():
        rec["seconds"] = elapsed()
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)

    rec["copy_GBps"] = copy_bandwidth()
    print(f"{rec['device']}: copy {rec['copy_GBps']:.0f} GB/s", flush=True)
    save()

    ext = None
    if not args.no_mamba:
        try:
            t = time.perf_counter()
            sys.path.insert(0, ".baselines/mamba_ss")
            from build import build
            ext = build()
            rec["mamba_ssm"] = f"built from source in {time.perf_counter() - t:.0f} s"
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            rec["mamba_ssm"] = f"build failed: {type(e).__name__}: {str(e)[-300:]}"
        print("mamba-ssm:", rec["mamba_ssm"], flush=True)
        save()
    else:
        rec["mamba_ssm"] = "not attempted (--no-mamba)"

    batch, dm, n = 2, 1024, 16
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    shapes = [(batch, T, dm, n) for T in lengths] + [(4, 2048, 1536, 16)]   # the last: the anchor's shape
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        for (b, T, d, nn_) in shapes:
            if elapsed() > args.budget:
                rec["skipped"].append(f"{dtype} T={T}: over the time budget"); continue
            kw = random_inputs(b, T, d, nn_, dtype=dtype, device="cuda", seed=T)
            u, delta, A, B, C, D = (kw[k] for k in ("u", "delta", "A", "B", "C", "D"))
            esz = u.element_size()
            bytes_io = (3 * b * T * d + 2 * b * T * nn_) * esz + 2 * d * nn_ * 4
            floor_ms = bytes_io / (rec["copy_GBps"] * 1e9) * 1e3
            # the gate's reference: the sequential definition where it is affordable, else the chunked scan
            # (itself checked against the sequential one at the short lengths)
            if T <= 4096:
                ref_y, _ = selective_scan_ref(**kw); ref_name = "sequential"
            else:
                ref_y, _ = selective_scan_chunked(**kw, chunk=CHUNK); ref_name = "chunked"
            impls = {
                "Triton": (lambda: selective_scan_triton(**kw), False),
                "chunked PyTorch": (lambda: selective_scan_chunked(**kw, chunk=CHUNK), False),
                "chunked PyTorch + torch.compile": (lambda: chunked_compiled(u, delta, A, B, C, D), False),
            }
            if T <= 4096 and b == batch:
                impls["sequential PyTorch"] = (lambda: selective_scan_ref(**kw), True)
            if ext is not None:
                um, dm_ = u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous()
                Bm, Cm = B.transpose(1, 2).unsqueeze(1).contiguous(), C.transpose(1, 2).unsqueeze(1).contiguous()
                impls["mamba-ssm CUDA"] = (lambda: (ext.fwd(um, dm_, A, Bm, Cm, D, None, None, False)[0].transpose(1, 2),), False)
            for name, (fn, slow) in impls.items():
                if elapsed() > args.budget:
                    rec["skipped"].append(f"{name} {dtype} T={T}: over the time budget"); continue
                try:
                    out = fn()[0]
                    err = rel_err(out, ref_y)
                    ok = err < (tol if name != "mamba-ssm CUDA" else max(tol, 1e-3))
                    rec["checks"].append({"impl": name, "dtype": str(dtype).split(".")[1], "T": T, "batch": b, "D": d,
                                          "vs": ref_name, "rel_err": err, "ok": ok})
                    if not ok:
                        print(f"RED GATE {name} {dtype} T={T}: rel err {err:.2e}", flush=True); continue
                    ms = bench_ms(fn, slow)
                    mb = peak_mb(fn)
                    rec["rows"].append({"impl": name, "dtype": str(dtype).split(".")[1], "T": T, "batch": b, "D": d, "N": nn_,
                                        "ms": ms, "floor_ms": floor_ms, "GBps": bytes_io / (ms * 1e-3) / 1e9,
                                        "frac_of_copy_bw": floor_ms / ms, "peak_MB": mb, "rel_err": err})
                    print(f"{name:34s} {str(dtype):15s} b={b} D={d} T={T:6d}: {ms:9.3f} ms  (floor {floor_ms:.3f} ms, "
                          f"{floor_ms / ms:5.1%} of copy bw, err {err:.1e}, {elapsed():.0f}s)", flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["errors"].append(f"{name} {dtype} T={T}: {type(e).__name__}: {str(e)[-400:]}")
                    print("ERROR", rec["errors"][-1], flush=True)
                    if "out of memory" in str(e):
                        torch.cuda.empty_cache()
                save()
            del kw, u, delta, B, C, ref_y
            torch.cuda.empty_cache()

    # training: forward + backward through the autograd Function (Triton forward vs chunked forward)
    for T in (4096,):
        for dtype in (torch.float32, torch.bfloat16):
            if elapsed() > args.budget:
                rec["skipped"].append(f"fwd+bwd {dtype} T={T}"); continue
            kw = random_inputs(batch, T, dm, n, dtype=dtype, device="cuda", seed=1)
            leaves = [kw[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D")]
            gy = torch.randn_like(kw["u"])
            for backend in ("triton", "chunked"):
                try:
                    def step():
                        y, _ = selective_scan(*leaves, backend=backend, chunk=CHUNK)
                        return torch.autograd.grad(y, leaves, gy)
                    ms = bench_ms(step)
                    rec["rows"].append({"impl": f"fwd+bwd, {backend} forward", "dtype": str(dtype).split(".")[1], "T": T,
                                        "batch": batch, "D": dm, "N": n, "ms": ms, "peak_MB": peak_mb(step)})
                    print(f"fwd+bwd {backend} {dtype} T={T}: {ms:.3f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["errors"].append(f"fwd+bwd {backend} {dtype}: {type(e).__name__}: {str(e)[-400:]}")
                save()
    # which block sizes the autotuner chose
    try:
        from tinylab.kernels.selective_scan import _fwd_tuned
        rec["autotune"] = {str(k): str(v) for k, v in _fwd_tuned.cache.items()}
    except Exception:  # noqa: BLE001
        pass
    save()
    print(f"done in {elapsed():.0f} s; {len(rec['rows'])} rows, {len(rec['errors'])} errors, {len(rec['skipped'])} skipped")


if __name__ == "__main__":
    main()
