"""GPU benchmark of the fused two-expert attention (MoA chapter, nbs/40a_two_expert_attention.ipynb) at a diffusion
UNet's attention shapes (64 x 64 and 128 x 128 latents: self-attention over 4096 / 16384 pixels, head dims 40 / 80, and
cross-attention to 77 text tokens), bfloat16, 8 heads, against the reference: two SDPA calls (cuDNN backend when it
takes the shape) plus the mix, and one SDPA call alone. Every implementation is checked against float32 math before
it is timed (no timing on a red gate). Imports torch, triton and tinylab.kernels only; works on triton 3.6 and 3.9.

GPU:  PYTHONPATH=. python3 benchmarks/bench_two_expert_attention.py --out book/results/two_expert_attention_h200.json
CPU:  PYTHONPATH=. python3 benchmarks/bench_two_expert_attention.py --smoke --out /tmp/tea_smoke.json"""
import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from tinylab.kernels.two_expert_attention import two_expert_attention  # noqa: E402

H = 8
SHAPES = [(2, 4096, 4096, 40), (8, 4096, 4096, 40), (8, 4096, 4096, 80), (2, 16384, 16384, 40), (8, 16384, 16384, 80),
          (8, 4096, 77, 40), (8, 16384, 77, 80), (2, 16384, 77, 40)]          # (B, N queries, M keys, head dim)
SMOKE_SHAPES = [(1, 37, 37, 40), (1, 50, 7, 24)]


def cudnn():
    "A context that asks SDPA for cuDNN attention (the anchor's backend), or nothing where it does not exist."
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH], set_priority=True)
    except (ImportError, TypeError, AttributeError):
        return contextlib.nullcontext()


def ref_mixed(q1, k1, v1, q2, k2, v2, r):
    "The anchor: two SDPA calls and the mix (torch.lerp), (B, H, N, D)."
    with cudnn():
        a1, a2 = F.scaled_dot_product_attention(q1, k1, v1), F.scaled_dot_product_attention(q2, k2, v2)
    return torch.lerp(a2, a1, r[:, None, :, None].to(a1.dtype))


def ref_split(q1, k1, v1, q2, k2, v2, r):
    "Two SDPA calls and the MoA layer's mix: [r A1, (1 - r) A2] as (B, N, 2, H, D), for two output projections."
    with cudnn():
        a1, a2 = F.scaled_dot_product_attention(q1, k1, v1), F.scaled_dot_product_attention(q2, k2, v2)
    g = r[:, None, :, None].to(a1.dtype)
    return torch.stack([g * a1, (1 - g) * a2], 1).permute(0, 3, 1, 2, 4)


def one_sdpa(q1, k1, v1, *_):
    with cudnn():
        return F.scaled_dot_product_attention(q1, k1, v1)


def truth(q1, k1, v1, q2, k2, v2, r, split, rows):
    "float32 math on batch 0 and the first `rows` queries."
    outs = []
    for q, k, v in ((q1, k1, v1), (q2, k2, v2)):
        p = torch.softmax(q[0, :, :rows].float() @ k[0].float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        outs.append(p @ v[0].float())                                           # (H, rows, D)
    g = r[0, :rows].float()[None, :, None]
    if split:
        return torch.stack([g * outs[0], (1 - g) * outs[1]], 0).permute(2, 0, 1, 3)   # (rows, 2, H, D)
    return g * outs[0] + (1 - g) * outs[1]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def timer(fn, smoke):
    if smoke:   # the interpreter: one wall-clock call, for the plumbing only
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    est = (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=max(25, 1.5 * est), rep=max(100, 6 * est), return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter on a CPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU path")
    dev = "cpu" if smoke else "cuda"
    dtype = getattr(torch, args.dtype)
    impls = {"fused (mixed)": lambda *a: two_expert_attention(*a, split=False, backend="triton"),
             "fused (split)": lambda *a: two_expert_attention(*a, split=True, backend="triton"),
             "2 x SDPA + mix": ref_mixed, "2 x SDPA + split mix": ref_split, "1 SDPA": one_sdpa}
    rows, checks = [], []
    for B, N, M, D in (SMOKE_SHAPES if smoke else SHAPES):
        torch.manual_seed(0)
        q1, q2 = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(2))
        k1, v1, k2, v2 = (torch.randn(B, H, M, D, device=dev, dtype=dtype) for _ in range(4))
        r = torch.rand(B, N, device=dev, dtype=torch.float32)
        xs = (q1, k1, v1, q2, k2, v2, r)
        kind = "self" if M == N else "cross"
        rowsq = min(N, 128)
        ms = {}
        for name, fn in impls.items():
            out = fn(*xs)
            if name == "1 SDPA":
                p_ = torch.softmax(q1[0, :, :rowsq].float() @ k1[0].float().transpose(-1, -2) / math.sqrt(D), -1)
                err = rel_err(out[0, :, :rowsq], p_ @ v1[0].float())
            elif "split" in name:
                err = rel_err(out[0, :rowsq], truth(*xs, True, rowsq))
            else:
                err = rel_err(out[0, :, :rowsq], truth(*xs, False, rowsq))
            ok = err < (1e-4 if dtype == torch.float32 else 2e-2)
            checks.append(dict(impl=name, kind=kind, B=B, N=N, M=M, D=D, rel_err=err, ok=ok))
            if not ok:
                print(f"RED GATE {name} at {(B, N, M, D)}: rel err {err:.2e}; not timed", flush=True)
                continue
            ms[name] = timer(lambda: fn(*xs), smoke)
        flops = 2 * 2 * B * H * N * M * D            # one attention: QK^T and PV
        for name, t in ms.items():
            n_att = 1 if name == "1 SDPA" else 2
            rows.append(dict(kind=kind, B=B, H=H, N=N, M=M, D=D, impl=name, ms=t,
                             speedup_vs_2sdpa_mix=ms.get("2 x SDPA + mix", float("nan")) / t,
                             TFLOPs=n_att * flops / t / 1e9))
        line = "  ".join(f"{k} {v:.3f}" for k, v in ms.items())
        print(f"{kind:5} B{B} N{N} M{M} D{D}: {line} ms", flush=True)
    summary = {}
    for kind in ("self", "cross"):
        for B, N, M, D in (SMOKE_SHAPES if smoke else SHAPES):
            if (kind == "self") != (M == N):
                continue
            get = {r_["impl"]: r_["ms"] for r_ in rows if (r_["B"], r_["N"], r_["M"], r_["D"]) == (B, N, M, D)}
            if {"fused (mixed)", "2 x SDPA + mix", "1 SDPA"} <= set(get):
                summary[f"{kind} B{B} N{N} M{M} D{D}"] = dict(
                    fused_vs_ref=get["2 x SDPA + mix"] / get["fused (mixed)"],
                    split_vs_split_ref=get.get("2 x SDPA + split mix", float("nan")) / get.get("fused (split)", float("nan")),
                    fused_over_one_sdpa=get["fused (mixed)"] / get["1 SDPA"])
    record = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter, smoke)",
                  torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if dev == "cuda" else None,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  args=vars(args), heads=H, dtype=args.dtype, rows=rows, checks=checks, summary=summary,
                  goals="fused faster than 2 x SDPA + mix at every shape; cross-attention within 1.5x of one SDPA call",
                  script="benchmarks/bench_two_expert_attention.py")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}: {len(rows)} timings, {sum(c['ok'] for c in checks)}/{len(checks)} checks passed")
    return record


if __name__ == "__main__":
    main()
