"""GPU benchmark of the selective scan (kernel page nbs/10a_selective_scan.ipynb, chapter nbs/10_ssm.ipynb).

Part 1, the anchor shape (batch 4, D 1536, N 16, T 2048; B and C shared by the channels, no z, no softplus), float32
and bfloat16, in one run: the forward of our Triton kernel (blocks `FWD_BLOCKS`), mamba-ssm's
CUDA `selective_scan` (built from source, .baselines/), the chunked and sequential PyTorch references; the backward
of our Triton kernel, mamba-ssm's CUDA backward and the chunked PyTorch backward; a training step (forward + backward)
through `selective_scan`'s autograd Function. Part 2 (as the time budget allows): the forward at batch 2, D 1024,
T 1k..64k. Every implementation is checked before it is timed (no timing on a red gate): forwards against the
sequential definition (the chunked scan past T 4096), backwards against the chunked PyTorch backward.
Times are medians of `triton.testing.do_bench`; floor = the bytes each pass must move at the measured copy bandwidth.
Usage: PYTHONPATH=. python3 benchmarks/bench_ssm.py --out results.json [--budget S] [--smoke (CPU interpreter)]"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tinylab.kernels import selective_scan as ss  # noqa: E402

import nsight  # noqa: E402  (benchmarks/nsight.py: this script's folder is on the path)

T0 = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# mamba-ssm builds: the trimmed forward+backward one (benchmarks/prep_mamba_ss_bwd.sh), else the forward-only one
MAMBA_DIRS = (".baselines/mamba_ss_bwd", ".baselines/mamba_ss")
BUILD = "import sys; sys.path.insert(0, {d!r}); from build import build; build()"

def elapsed():
    return time.perf_counter() - T0


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_ms(fn, slow=False):
    "Median ms: triton.testing.do_bench, or (slow) wall time of 3 synchronised calls; one call on a CPU (--smoke)."
    if DEV == "cpu":  # --smoke: one call, wall time
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
    if slow:
        fn(); sync()
        ts = []
        for _ in range(3):
            t = time.perf_counter(); fn(); sync(); ts.append((time.perf_counter() - t) * 1e3)
        return float(np.median(ts))
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth():
    "GB/s of a device-to-device copy of 1 GiB (read + write)."
    x = torch.empty(2**28 if DEV == "cuda" else 2**16, device=DEV); y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def mamba_layout(u, delta, B, C, g=None):
    "mamba-ssm's layout: u, delta (batch, D, T); B, C (batch, 1, N, T). Transposes are not timed."
    t = lambda x: x.transpose(1, 2).contiguous()
    out = [t(u), t(delta), B.transpose(1, 2).unsqueeze(1).contiguous(), C.transpose(1, 2).unsqueeze(1).contiguous()]
    return out + ([t(g)] if g is not None else [])


def ncu_target(target):
    "Child of --ncu: one profiled launch of our forward or backward (nsight.profiled)."
    direction, dtype = target.split(":")
    kw = ss.random_inputs(4, 2048, 1536, 16, dtype=getattr(torch, dtype), device=DEV, seed=1)
    if direction == "fwd":
        fn = lambda: ss.selective_scan_triton(**kw)
    else:
        args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D")] + [None]
        g = torch.randn_like(kw["u"])
        states = ss._scan_fwd(*args, save=True)[2]
        fn = lambda: ss.selective_scan_triton_bwd(*args, g, None, states)
    nsight.profiled(fn)


def run_ncu(rec, budget_left):
    "Nsight Compute's view of our kernels (key metrics only)."
    rec["ncu"] = {}
    for target in ("fwd:float32", "fwd:bfloat16", "bwd:float32", "bwd:bfloat16"):
        if budget_left() < 40:
            rec["skipped"].append(f"ncu {target}"); continue
        rec["ncu"][target] = nsight.profile(__file__, target, "selective_scan_(fwd|bwd)_kernel", min(120, budget_left()))
        print("ncu", target, rec["ncu"][target], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; later rows are skipped past it")
    ap.add_argument("--no-mamba", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--ncu", action="store_true", help="profile our kernels at the anchor shape with Nsight Compute")
    ap.add_argument("--ncu-target", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--split-fwd", type=int, help="SPLIT_PROGRAMS_PER_SM for the forward (default: the module's)")
    ap.add_argument("--split-bwd", type=int, help="SPLIT_PROGRAMS_PER_SM for the backward (default: the module's)")
    args = ap.parse_args()
    for pass_, value in (("fwd", args.split_fwd), ("bwd", args.split_bwd)):
        if value is not None:
            ss.SPLIT_PROGRAMS_PER_SM[pass_] = value
    if args.ncu_target:
        return ncu_target(args.ncu_target)
    if not args.smoke:
        assert DEV == "cuda", "this benchmark needs a GPU (or --smoke)"
    rec = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("TINYLAB_COMMIT", "unknown"), "script": "benchmarks/bench_ssm.py", "args": vars(args),
           "bwd_block_t": ss.BWD_BLOCK_T, "split_programs_per_sm": dict(ss.SPLIT_PROGRAMS_PER_SM),
           "unsplit_programs_per_sm": ss.UNSPLIT_PROGRAMS_PER_SM, "rows": [], "checks": [], "skipped": [], "errors": [], "phases": {}}

    def save():
        rec["seconds"] = elapsed()
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)

    builds = {}
    dirs = [d for d in MAMBA_DIRS if os.path.isdir(d)]
    if dirs and not (args.no_mamba or args.smoke):  # built in the background while the Triton kernels compile and run
        builds[dirs[0]] = subprocess.Popen([sys.executable, "-c", BUILD.format(d=dirs[0])], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
    rec["copy_GBps"] = copy_bandwidth()
    print(f"{rec['device']}: copy {rec['copy_GBps']:.0f} GB/s", flush=True)
    save()

    ext = [None]

    def mamba():
        "mamba-ssm's extension: the background build (waited for once), else the forward-only build, else None."
        if builds and "mamba_ssm" not in rec:
            t = time.perf_counter()
            for d in dirs:
                try:
                    if d in builds:
                        out, _ = builds[d].communicate(timeout=max(5.0, args.budget - 60 - elapsed()))
                        rc = builds[d].returncode
                    else:
                        pr = subprocess.run([sys.executable, "-c", BUILD.format(d=d)], capture_output=True, text=True,
                                            timeout=max(5.0, args.budget - 60 - elapsed()))
                        out, rc = pr.stdout + pr.stderr, pr.returncode
                    if rc == 0:
                        sys.path.insert(0, d); sys.modules.pop("build", None)
                        from build import build
                        ext[0] = build(); sys.path.remove(d)
                        rec["mamba_ssm"] = f"{d}, built from source ({'forward and backward' if hasattr(ext[0], 'bwd') else 'forward only'})"
                        break
                    rec["errors"].append(f"mamba-ssm build {d}: {out[-800:]}")
                except Exception:  # noqa: BLE001 - recorded, the rest still runs
                    if d in builds:
                        builds[d].kill()
                    rec["errors"].append(f"mamba-ssm build {d}: {traceback.format_exc()[-800:]}")
            rec.setdefault("mamba_ssm", "build failed")
            rec["phases"]["wait for mamba-ssm build"] = time.perf_counter() - t
            print("mamba-ssm:", rec["mamba_ssm"], flush=True)
        return ext[0]

    def add(part, impl, direction, dtype, b, T, d, n, fn, floor_ms, err, slow=False):
        name = str(dtype).split(".")[1]
        if elapsed() > args.budget:
            rec["skipped"].append(f"{impl} {direction} {name} T={T}: over the time budget"); return None
        try:
            ms = bench_ms(fn, slow)
            rec["rows"].append({"part": part, "impl": impl, "dir": direction, "dtype": name, "batch": b, "T": T, "D": d, "N": n,
                                "ms": ms, "floor_ms": floor_ms, "frac_of_floor": floor_ms / ms, "rel_err": err})
            print(f"{impl:30s} {direction:7s} {name:8s} b{b} T{T:6d} D{d}: {ms:9.3f} ms  ({floor_ms / ms:5.1%} of floor, "
                  f"err {err:.1e}) [{elapsed():.0f}s]", flush=True)
            return ms
        except Exception as e:  # noqa: BLE001
            rec["errors"].append(f"{impl} {direction} {name} T={T}: {type(e).__name__}: {str(e)[-400:]}")
            print("ERROR", rec["errors"][-1], flush=True)
            if "out of memory" in str(e):
                torch.cuda.empty_cache()
        finally:
            save()

    def gate(impl, direction, dtype, T, err, tol):
        ok = bool(err < tol)
        rec["checks"].append({"impl": impl, "dir": direction, "dtype": str(dtype).split(".")[1], "T": T, "rel_err": err,
                              "tol": tol, "ok": ok})
        if not ok:
            print(f"RED GATE {impl} {direction} {dtype} T={T}: rel err {err:.2e} > {tol:.0e}", flush=True)
        return ok

    # ---- part 1: the anchor shape: ours and the PyTorch references first, then mamba-ssm (its build runs meanwhile)
    t_part = time.perf_counter()
    b, T, d, n = (4, 2048, 1536, 16) if not args.smoke else (2, 19, 12, 4)
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        gtol = 1e-3 if dtype == torch.float32 else 5e-2
        esz = 4 if dtype == torch.float32 else 2
        # floors: forward reads u, delta, B, C, writes y; backward reads u, delta, B, C, dy, writes du, ddelta, dB, dC
        floor_f = ((3 * b * T * d + 2 * b * T * n) * esz + 2 * d * n * 4) / (rec["copy_GBps"] * 1e9) * 1e3
        floor_b = ((5 * b * T * d + 4 * b * T * n) * esz + 3 * d * n * 4) / (rec["copy_GBps"] * 1e9) * 1e3
        kw = ss.random_inputs(b, T, d, n, dtype=dtype, device=DEV, seed=1)
        u, delta, A, B, C, D = (kw[k] for k in ("u", "delta", "A", "B", "C", "D"))
        ref_y, ref_h = ss.selective_scan_ref(**kw)
        fwd = {"Triton": lambda: ss.selective_scan_triton(**kw),
               "chunked PyTorch": lambda: ss.selective_scan_chunked(**kw, chunk=64),
               "sequential PyTorch": lambda: ss.selective_scan_ref(**kw)}
        for impl, fn in fwd.items():
            try:
                err = rel_err(fn()[0], ref_y)
            except Exception as e:  # noqa: BLE001
                rec["errors"].append(f"{impl} fwd {dtype}: {type(e).__name__}: {str(e)[-400:]}"); continue
            if gate(impl, "fwd", dtype, T, err, tol):
                add("anchor", impl, "fwd", dtype, b, T, d, n, fn, floor_f, err, slow=impl == "sequential PyTorch")
        # backward: from one output gradient; ours given the states its forward kept
        g = torch.randn_like(u)
        ref_g = ss.selective_scan_bwd(u, delta, A, B, C, D, None, g, None, chunk=64)
        _, _, states = ss._scan_fwd(u, delta, A, B, C, D, None, save=True)
        bwd = {"Triton": lambda: ss.selective_scan_triton_bwd(u, delta, A, B, C, D, None, g, None, states),
               "chunked PyTorch": lambda: ss.selective_scan_bwd(u, delta, A, B, C, D, None, g, None, chunk=64)}
        for impl, fn in bwd.items():
            try:
                errs = {k: rel_err(o, r) for k, o, r in zip(("du", "ddelta", "dA", "dB", "dC", "dD"), fn(), ref_g)}
            except Exception as e:  # noqa: BLE001
                rec["errors"].append(f"{impl} bwd {dtype}: {type(e).__name__}: {str(e)[-400:]}"); continue
            rec.setdefault("bwd_errors", {})[f"{impl} {str(dtype)[6:]}"] = errs
            if gate(impl, "bwd", dtype, T, max(errs.values()), gtol):
                add("anchor", impl, "bwd", dtype, b, T, d, n, fn, floor_b, max(errs.values()), slow=impl == "chunked PyTorch")
        # a training step through the autograd Function (forward keeps the states, backward uses them)
        leaves = [x.detach().clone().requires_grad_() for x in (u, delta, A, B, C, D)]
        for backend in ("triton", "chunked"):
            def step():
                y, _ = ss.selective_scan(*leaves, backend=backend)
                return torch.autograd.grad(y, leaves, g)
            try:
                errs = {k: rel_err(o, r) for k, o, r in zip(("du", "ddelta", "dA", "dB", "dC", "dD"), step(), ref_g)}
            except Exception as e:  # noqa: BLE001
                rec["errors"].append(f"fwd+bwd {backend} {dtype}: {type(e).__name__}: {str(e)[-400:]}"); continue
            impl = "Triton" if backend == "triton" else "chunked PyTorch"
            if gate(f"autograd, {impl}", "fwd+bwd", dtype, T, max(errs.values()), gtol):
                add("anchor", impl, "fwd+bwd", dtype, b, T, d, n, step, floor_f + floor_b, max(errs.values()),
                    slow=backend == "chunked")
        refs[dtype] = (kw, g, ref_y, ref_g, floor_f, floor_b)
        del states, leaves
    for dtype, (kw, g, ref_y, ref_g, floor_f, floor_b) in refs.items():
        if mamba() is None:
            break
        tol, gtol = (1e-3, 1e-3) if dtype == torch.float32 else (1e-2, 5e-2)
        u, delta, A, B, C, D = (kw[k] for k in ("u", "delta", "A", "B", "C", "D"))
        um, dm_, Bm, Cm, gm = mamba_layout(u, delta, B, C, g)
        fn = lambda: (ext[0].fwd(um, dm_, A, Bm, Cm, D, None, None, False)[0].transpose(1, 2),)
        try:
            err = rel_err(fn()[0], ref_y)
            if gate("mamba-ssm CUDA", "fwd", dtype, T, err, tol):
                add("anchor", "mamba-ssm CUDA", "fwd", dtype, b, T, d, n, fn, floor_f, err)
            if hasattr(ext[0], "bwd"):
                xs = ext[0].fwd(um, dm_, A, Bm, Cm, D, None, None, False)[1]
                t2 = lambda x: x.transpose(1, 2)
                fb = lambda: ext[0].bwd(um, dm_, A, Bm, Cm, D, None, None, gm, xs, None, None, False, False)
                o = fb()
                errs = {k: rel_err(x, r) for k, x, r in zip(("du", "ddelta", "dA", "dB", "dC", "dD"),
                        (t2(o[0]), t2(o[1]), o[2], t2(o[3].squeeze(1)), t2(o[4].squeeze(1)), o[5]), ref_g)}
                rec.setdefault("bwd_errors", {})[f"mamba-ssm CUDA {str(dtype)[6:]}"] = errs
                if gate("mamba-ssm CUDA", "bwd", dtype, T, max(errs.values()), gtol):
                    add("anchor", "mamba-ssm CUDA", "bwd", dtype, b, T, d, n, fb, floor_b, max(errs.values()))
        except Exception as e:  # noqa: BLE001
            rec["errors"].append(f"mamba-ssm {dtype}: {type(e).__name__}: {str(e)[-400:]}")
    del refs
    if DEV == "cuda":
        torch.cuda.empty_cache()
    rec["phases"]["part 1 (anchor shape)"] = time.perf_counter() - t_part
    save()
    if args.ncu and DEV == "cuda":
        t_part = time.perf_counter()
        run_ncu(rec, lambda: args.budget - elapsed())
        rec["phases"]["Nsight Compute"] = time.perf_counter() - t_part
        save()

    # ---- part 2: forward over lengths, batch 2, D 1024 (as the budget allows)
    t_part = time.perf_counter()
    lengths = [1024, 4096, 16384, 65536] if not args.smoke else [33]
    b, d, n = (2, 1024, 16) if not args.smoke else (1, 5, 3)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        esz = 4 if dtype == torch.float32 else 2
        for T in lengths:
            if elapsed() > args.budget:
                rec["skipped"].append(f"sweep {dtype} T={T}: over the time budget"); continue
            kw = ss.random_inputs(b, T, d, n, dtype=dtype, device=DEV, seed=T)
            u, delta, A, B, C, D = (kw[k] for k in ("u", "delta", "A", "B", "C", "D"))
            floor_f = ((3 * b * T * d + 2 * b * T * n) * esz + 2 * d * n * 4) / (rec["copy_GBps"] * 1e9) * 1e3
            ref_y = ss.selective_scan_ref(**kw)[0] if T <= 4096 else ss.selective_scan_chunked(**kw, chunk=256)[0]
            fwd = {"Triton": lambda: ss.selective_scan_triton(**kw),
                   "chunked PyTorch": lambda: ss.selective_scan_chunked(**kw, chunk=256)}
            if ext[0] is not None:
                um, dm_, Bm, Cm = mamba_layout(u, delta, B, C)
                fwd["mamba-ssm CUDA"] = lambda: (ext[0].fwd(um, dm_, A, Bm, Cm, D, None, None, False)[0].transpose(1, 2),)
            for impl, fn in fwd.items():
                try:
                    err = rel_err(fn()[0], ref_y)
                except Exception as e:  # noqa: BLE001
                    rec["errors"].append(f"{impl} fwd {dtype} T={T}: {type(e).__name__}: {str(e)[-400:]}"); continue
                if gate(impl, "fwd", dtype, T, err, max(tol, 1e-3) if impl == "mamba-ssm CUDA" else tol):
                    add("sweep", impl, "fwd", dtype, b, T, d, n, fn, floor_f, err)
            del kw, u, delta, B, C, ref_y
            if DEV == "cuda":
                torch.cuda.empty_cache()
    rec["phases"]["part 2 (lengths)"] = time.perf_counter() - t_part
    rec["blocks"] = {"fwd": {k: list(v) for k, v in ss.FWD_BLOCKS.items()},
                     "bwd": (f"fixed: BLOCK_D {ss.BWD_BLOCK_D}, one warp, {ss.DBC_SLOTS} slots for dB and dC, "
                             "summed over channels by the reduce-scatter where `_scatter` allows")}
    for p in builds.values():
        if p.poll() is None:
            p.kill()
    save()
    print(f"done in {elapsed():.0f} s; {len(rec['rows'])} rows, {len(rec['errors'])} errors, {len(rec['skipped'])} skipped")


if __name__ == "__main__":
    main()
