"""Benchmark of the fused log-softmax + gather (tinylab.kernels.logprob_gather) against PyTorch and Liger Kernel.

Per-token log-probs of the chosen tokens, forward + backward with an arbitrary per-token upstream gradient (as a
policy-gradient loss gives), bf16, in two forms (the recipe of ../shared/anchors/logprob_gather):
  logits (T, V):                 torch log_softmax(fp32) + gather | ours (Triton) | ours, gradient in place | Liger CE 'none'
  hidden (T, H) @ head (V, H).T: torch matmul + the same          | ours (vocabulary chunks) | Liger FLCE 'none' / 'sum'
Every implementation is checked first (log-probs against float64 on 256 rows, gradients against PyTorch's);
one that fails is recorded and not timed. Time: median ms of one forward + backward (triton.testing.do_bench);
memory: peak bytes allocated above the inputs. Needs only torch, triton, numpy (Liger when importable).

    PYTHONPATH=. python3 benchmarks/bench_logprob_gather.py --out book/results/rewards_h200.json
    python3 benchmarks/bench_logprob_gather.py --smoke --out /tmp/smoke.json    # CPU, tiny shapes, seconds
"""
import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--out", required=True, help="where to write the JSON results")
ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton in its interpreter)")
ap.add_argument("--quick", action="store_true", help="the first two shapes of each form only")
ap.add_argument("--chunk", type=int, default=8192, help="vocabulary chunk of the hidden-state form")
args = ap.parse_args()
if args.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinylab.kernels.logprob_gather import linear_logprob_gather, logprob_gather  # noqa: E402

try:
    import liger_kernel
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    LIGER = getattr(liger_kernel, "__version__", None) or "installed"
except Exception as e:  # noqa: BLE001  (any import failure means: no Liger rows)
    LIGER = None
    print(f"Liger Kernel not importable ({type(e).__name__}: {e}); its rows are skipped", flush=True)

CUDA = torch.cuda.is_available() and not args.smoke
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
GiB = 2**30
if args.smoke:
    LOGITS, HIDDEN = [(7, 300), (33, 1000)], [(9, 16, 300), (17, 24, 1000)]
    args.chunk = min(args.chunk, 256)
else:
    LOGITS = [(4096, 32768), (4096, 131072), (16384, 131072), (16384, 262144)]
    HIDDEN = [(4096, 1024, 32768), (4096, 4096, 131072), (16384, 4096, 131072), (16384, 4096, 262144)]
    if args.quick:
        LOGITS, HIDDEN = LOGITS[:2], HIDDEN[:2]
if not CUDA and not args.smoke:
    sys.exit("no CUDA device: run with --smoke on a CPU")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn):
    "Median ms of fn: do_bench on a GPU; min-free median of a few perf_counter runs on the CPU (smoke only)."
    if CUDA:
        sync(); t = time.perf_counter(); fn(); sync()
        est = (time.perf_counter() - t) * 1e3
        return triton.testing.do_bench(fn, warmup=max(5, 1.5 * est), rep=max(40, 6 * est), return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def peak_extra(fn):
    "GiB allocated at the peak of fn above what was allocated before it (None on the CPU)."
    if not CUDA:
        fn(); return None
    sync(); torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    fn(); sync()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def torch_lp(logits, y):
    return torch.log_softmax(logits.float(), -1).gather(-1, y[:, None]).squeeze(1)


rows, checks = [], []
bw = None
if CUDA:
    a = torch.empty(1 << 29, device=DEV); b = torch.empty_like(a)
    bw = 2 * a.numel() * 4 / (triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3)
    del a, b
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

print(f"{'T':>6} {'V':>7} {'impl':28} {'ms':>8} {'peak GiB':>8} {'err lp':>8} {'err grad':>8}", flush=True)
backend = "triton"
for T, V in LOGITS:
    torch.manual_seed(0)
    logits = (torch.randn(T, V, device=DEV) * 2).to(DTYPE).requires_grad_()
    y, g = torch.randint(0, V, (T,), device=DEV), torch.randn(T, device=DEV)
    orig = logits.detach().clone()
    k = min(T, 256)
    lp_ref = torch.log_softmax(orig[:k].double(), -1).gather(-1, y[:k, None]).squeeze(1)
    # the reference gradient: PyTorch's, through the float32 log-softmax
    x_ref = orig.clone().requires_grad_()
    torch_lp(x_ref, y).backward(g)
    grad_ref = x_ref.grad[:k].clone(); del x_ref
    impls = {"torch log_softmax + gather": lambda: torch_lp(logits, y),
             "ours (Triton)": lambda: logprob_gather(logits, y, backend=backend),
             "ours (Triton, grad in place)": lambda: logprob_gather(logits, y, backend=backend, inplace_backward=True)}
    if LIGER and CUDA:
        impls["Liger CE 'none'"] = lambda: -LigerCrossEntropyLoss(reduction="none")(logits, y)
    floor_ms = 2 * T * V * 2 / bw * 1e3 if bw else None   # read the logits once + write their gradient once
    for name, f in impls.items():
        def fn():
            logits.grad = None
            lp = f(); lp.backward(g); return lp
        with torch.no_grad():
            logits.copy_(orig)
        lp = fn()[:k].detach()
        in_place = "in place" in name or "Liger" in name
        grad = (logits.detach() if in_place and logits.grad is None else logits.grad)[:k].float()
        err_lp, err_g = relerr(lp, lp_ref), relerr(grad, grad_ref)
        ok = err_lp < 1e-2 and err_g < 2e-2
        checks.append(dict(form="logits", T=T, V=V, impl=name, err_lp=err_lp, err_grad=err_g, passed=ok))
        logits.grad = None
        if not ok:
            print(f"{T:6d} {V:7d} {name:28} FAILED its check (lp {err_lp:.1e}, grad {err_g:.1e}): not timed", flush=True)
            continue
        pm = peak_extra(fn); logits.grad = None
        ms = time_ms(fn); logits.grad = None
        rows.append(dict(form="logits", T=T, V=V, impl=name, ms=ms, peak_GiB=pm, err_lp=err_lp, err_grad=err_g,
                         frac_floor=(floor_ms / ms) if floor_ms else None))
        print(f"{T:6d} {V:7d} {name:28} {ms:8.2f} {pm if pm is not None else float('nan'):8.2f} {err_lp:8.0e} {err_g:8.0e}", flush=True)
    del logits, orig, grad_ref
    if CUDA:
        torch.cuda.empty_cache()

print(f"{'T':>6} {'H':>5} {'V':>7} {'impl':28} {'ms':>8} {'peak GiB':>8} {'TFLOP/s':>8}", flush=True)
for T, H, V in HIDDEN:
    torch.manual_seed(0)
    h = torch.randn(T, H, device=DEV).to(DTYPE).requires_grad_()
    W = (torch.randn(V, H, device=DEV) * 2 / H**0.5).to(DTYPE).requires_grad_()
    y, g = torch.randint(0, V, (T,), device=DEV), torch.randn(T, device=DEV)
    flops = 6 * T * V * H
    impls = {"torch matmul + log_softmax": lambda: torch_lp(h @ W.t(), y).backward(g),
             f"ours (chunks of {args.chunk})": lambda: linear_logprob_gather(h, W, y, chunk=args.chunk, backend=backend).backward(g)}
    if LIGER and CUDA:
        impls["Liger FLCE 'none'"] = lambda: (-LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, y)).backward(g)
        impls["Liger FLCE 'sum' (g=1 only)"] = lambda: (-LigerFusedLinearCrossEntropyLoss(reduction="sum")(W, h, y)).backward()
    ref = None
    for name, f in impls.items():
        def fn():
            h.grad = W.grad = None; f()
        fn()
        if ref is None:
            ref = (h.grad.clone(), W.grad.clone())
            err_h = err_w = 0.0
        else:
            err_h, err_w = relerr(h.grad, ref[0]), relerr(W.grad, ref[1])
        ok = "sum" in name or (err_h < 2e-2 and err_w < 2e-2)   # 'sum' is only right for g = 1: not checked
        checks.append(dict(form="hidden", T=T, H=H, V=V, impl=name, err_dh=err_h, err_dW=err_w, passed=ok))
        h.grad = W.grad = None
        if not ok:
            print(f"{T:6d} {H:5d} {V:7d} {name:28} FAILED its check (dh {err_h:.1e}, dW {err_w:.1e}): not timed", flush=True)
            continue
        pm = peak_extra(fn); h.grad = W.grad = None
        ms = time_ms(fn); h.grad = W.grad = None
        rows.append(dict(form="hidden", T=T, H=H, V=V, impl=name, ms=ms, peak_GiB=pm, err_dh=err_h, err_dW=err_w,
                         tflops=flops / ms / 1e9))
        print(f"{T:6d} {H:5d} {V:7d} {name:28} {ms:8.1f} {pm if pm is not None else float('nan'):8.2f} {flops / ms / 1e9:8.1f}", flush=True)
    del h, W, ref
    if CUDA:
        torch.cuda.empty_cache()

record = dict(device=torch.cuda.get_device_name() if CUDA else f"{platform.processor() or platform.machine()} (CPU, smoke)",
              date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
              triton=triton.__version__, liger_kernel=LIGER, python=platform.python_version(), args=vars(args),
              dtype=str(DTYPE), copy_GBps=bw / 1e9 if bw else None, rows=rows, checks=checks,
              all_checks_passed=all(c["passed"] for c in checks))
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(record, indent=2))
print(f"wrote {args.out}: {len(rows)} timings, {sum(c['passed'] for c in checks)}/{len(checks)} checks passed", flush=True)
sys.exit(0 if record["all_checks_passed"] else 1)
