"""GPU benchmark for issue #15: the CEMA forward split into time segments (two passes, tinylab.kernels.cema) against
the previous one-pass forward, in one process, and a sweep of the launch choices (TUNING). Its output is
book/results/cema_segments_h200.json, which nbs/11a_cema.ipynb renders.

The one-pass forward is read from benchmarks/_cema_old.py, a copy of tinylab/kernels/cema.py at commit d50ffac
(`git show d50ffac:tinylab/kernels/cema.py > benchmarks/_cema_old.py`); without that file the comparison with it is
skipped and only the new forward is gated and timed.

Gates first (no timing on a red gate): the new forward against `cema_fft` in float64 (fp32 x: max rel err < 1e-4;
bf16 x: y < 1e-2; with and without h0, at an odd size and at the benchmark shape) and, with the old kernel, its saved
chunk states and the gradients through the autograd function against the old kernel's (< 1e-4). Then, for B 4,
D 1024, N 16, T 1K .. 64K, fp32 and bf16 x: GPU ms with no launch cost (`tinylab.core.cuda_graph_ms`) and call ms
(`triton.testing.do_bench`), old and new; then a sweep of TUNING in graph ms (programs per SM and shortest segment;
then channels per program, warps and FOLD_STATE), each point checked against the float64 FFT form first.

Run: PYTHONPATH=. python3 benchmarks/bench_cema_segments.py --out $OUT/cema/cema_segments_h200.json
(`--smoke`: tiny sizes on the CPU under TRITON_INTERPRET=1: checks the script only.)"""
import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton

import tinylab.kernels.cema as new


def load_script(name: str):
    "A sibling script of benchmarks/ as a module (None if it is missing)."
    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_kernel_copy(name: str, commit: str):
    "tinylab/kernels/cema.py as it was at `commit`, from its copy benchmarks/`name`.py; exits saying how to make it."
    mod = load_script(name)
    if mod is None:
        raise SystemExit(f"benchmarks/{name}.py is missing: `git show {commit}:tinylab/kernels/cema.py > benchmarks/{name}.py`")
    return mod


def load_old():
    "The previous forward (one program per batch row and channel block), copied before the change."
    old = load_script("_cema_old")
    if old is None:
        print("benchmarks/_cema_old.py is missing: the comparison with the one-pass forward is skipped (recreate it "
              "with `git show d50ffac:tinylab/kernels/cema.py > benchmarks/_cema_old.py`)", flush=True)
    return old


# the parameters and the error measure of the recorded Megalodon benchmark, so both scripts time the same inputs
_megalodon = load_script("bench_megalodon")
params, rel_err = _megalodon.params, _megalodon.rel_err


def gates(old, dev, sizes, log):
    out = {}
    for (B, T, D) in sizes:
        N = 16
        p, q, g = params(D, N, device=dev)
        x = torch.randn(B, T, D, device=dev)
        h0 = torch.randn(B, D, N, dtype=torch.complex64, device=dev) * 0.3
        BT, BD, _ = new._fwd_blocks(T, D, N, dev == "cuda")
        S, seg_len = new._cema_segments(B, T, triton.cdiv(D, BD), BT, torch.device(dev))
        key = f"B{B}_T{T}_D{D}_S{S}"
        c128 = lambda t: None if t is None else t.to(torch.complex128)
        for name, hh in (("noh0", None), ("h0", h0)):
            # the reference: the FFT form in float64 (in fp32 it is itself off by ~3e-4 at T = 8192)
            y, h, _ = new._cema_forward(x, p, q, g, hh, save_states=False)
            yf, hf = new.cema_fft(x.double(), p.double(), c128(q), c128(g), c128(hh))
            out[f"fwd_fp32_{name}_{key}"] = max(rel_err(y, yf), rel_err(h, hf))
            yb, _, _ = new._cema_forward(x.bfloat16(), p, q, g, hh, save_states=False)
            yfb, _ = new.cema_fft(x.bfloat16().double(), p.double(), c128(q), c128(g), c128(hh), need_state=False)
            out[f"fwd_bf16_{name}_{key}"] = rel_err(yb.float(), yfb)
            del yf, hf, yfb
        if old is None:
            log(f"gates {key}: " + ", ".join(f"{k.split('_B')[0]}={v:.1e}" for k, v in out.items() if key in k))
            continue
        # the chunk-start states the backward reads, against the old one-pass kernel's
        _, _, hs_new = new._cema_forward(x, p, q, g, h0, save_states=True)
        _, _, hs_old = old._cema_forward(x, p, q, g, h0, save_states=True)
        out[f"states_vs_old_{key}"] = rel_err(hs_new, hs_old)
        # gradients through the autograd function, new vs old (same backward kernel, new saved states)
        ins_n = [t.clone().requires_grad_() for t in (x, p, q, g, h0)]
        ins_o = [t.clone().requires_grad_() for t in (x, p, q, g, h0)]
        yn, hn = new.CEMAFunction.apply(*ins_n)
        yo, ho = old.CEMAFunction.apply(*ins_o)
        dy, dh = torch.randn_like(yn), torch.randn_like(hn)
        gn = torch.autograd.grad((yn * dy).sum() + (hn * dh.conj()).real.sum(), ins_n)
        go = torch.autograd.grad((yo * dy).sum() + (ho * dh.conj()).real.sum(), ins_o)
        out[f"grads_vs_old_{key}"] = max(rel_err(a, b) for a, b in zip(gn, go))
        log(f"gates {key}: " + ", ".join(f"{k.split('_B')[0]}={v:.1e}" for k, v in out.items() if key in k))
    return out


def gate_ok(k, v):
    if k.startswith("fwd_bf16"):
        return v < 1e-2
    return v < 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400, help="start no new measurement after this many seconds")
    args = ap.parse_args()
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:6.1f}s] {s}", flush=True)
    old = load_old()
    if args.smoke:
        dev, B, D, N, lengths = "cpu", 1, 8, 4, [24]
        gate_sizes = [(2, 19, 5)]
        def graph_ms(fn):
            return float("nan")
        def call_ms(fn):
            t0 = time.perf_counter(); fn(); return (time.perf_counter() - t0) * 1e3
        sweep_T, sweep = [24], [dict(programs_per_sm=8, min_segment_tiles=1)]
    else:
        from tinylab.core import cuda_graph_ms
        from triton.testing import do_bench
        dev, B, D, N = "cuda", 4, 1024, 16
        lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
        gate_sizes = [(2, 1000, 130), (4, 8192, 1024)]
        graph_ms = lambda fn: cuda_graph_ms(fn, calls=20)
        call_ms = lambda fn: do_bench(fn, warmup=10, rep=100)
        sweep_T = [1024, 8192, 65536]
        sweep = [dict(programs_per_sm=pps, min_segment_tiles=mst) for pps in (2, 4, 8, 16, 32, 64) for mst in (2, 8, 32)]
    default = dict(new.TUNING)
    record = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke test)", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": os.environ.get("TINYLAB_COMMIT"), "args": vars(args), "shape": {"B": B, "D": D, "N": N},
              "tuning_default": default, "old_kernel": "benchmarks/_cema_old.py (d50ffac)" if old else None,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else None,
              "timing": "graph_ms: tinylab.core.cuda_graph_ms (20 calls in one CUDA graph, median, per call: GPU time, no "
                        "launch cost); call_ms: triton.testing.do_bench mean (L2 flushed), a call as a user makes it; "
                        "inference forward (no autograd), y and h_T",
              "rows": [], "sweep": [], "phase_s": {}}
    def save():  # after every phase, so a run cut short still leaves what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1))
    record["gates"] = gates(old, dev, gate_sizes, log)
    record["gates_pass"] = all(gate_ok(k, v) for k, v in record["gates"].items())
    record["phase_s"]["gates"] = round(time.time() - t_start, 1)
    log(f"gates pass: {record['gates_pass']}")
    save()
    if not record["gates_pass"]:
        log("a gate failed: no timing")
    p, q, g = params(D, N, device=dev)
    t0 = time.time()
    for T in lengths if record["gates_pass"] else []:
        if time.time() - t_start > args.budget_s:
            record.setdefault("skipped_lengths", []).append(T)
            continue
        if dev == "cuda":
            torch.cuda.empty_cache()
        x = torch.randn(B, T, D, device=dev)
        BT, BD, _ = new._fwd_blocks(T, D, N, dev == "cuda")
        S, seg_len = new._cema_segments(B, T, triton.cdiv(D, BD), BT, torch.device(dev))
        row = {"T": T, "segments": S, "seg_len": seg_len}
        try:
            for dname, xx in (("fp32", x), ("bf16", x.bfloat16())):
                for name, mod in (("old", old), ("new", new)):
                    if mod is None:
                        continue
                    f = lambda: mod.cema(xx, p, q, g, backend="triton")
                    row[f"{name}_{dname}_graph_ms"] = graph_ms(f)
                    row[f"{name}_{dname}_call_ms"] = call_ms(f)
            if T == 8192:  # forward + backward through autograd (training), both
                xg = x.clone().requires_grad_()
                for name, mod in (("old", old), ("new", new)):
                    if mod is None:
                        continue
                    def fwd_bwd(mod=mod):
                        y, _ = mod.cema(xg, p, q, g, backend="triton")
                        y.backward(torch.ones_like(y))
                    row[f"{name}_fp32_fwdbwd_call_ms"] = call_ms(fwd_bwd)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        record["rows"].append(row)
        save()
        log(f"T={T} S={S} seg_len={seg_len}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                           if k.endswith("_ms")))
    record["phase_s"]["lengths"] = round(time.time() - t0, 1)
    t0 = time.time()
    for T in sweep_T if record["gates_pass"] else []:
        x = torch.randn(B, T, D, device=dev)
        # each sweep point is checked against the FFT form in float64
        yf, _ = new.cema_fft(x.double(), p.double(), q.to(torch.complex128), g.to(torch.complex128), need_state=False)
        for tun in sweep:
            if time.time() - t_start > args.budget_s + 60:
                break
            new.TUNING.update(tun)
            try:
                y, _ = new.cema(x, p, q, g, backend="triton")
                err = rel_err(y, yf)
                BT, BD, _ = new._fwd_blocks(T, D, N, dev == "cuda")
                S, seg_len = new._cema_segments(B, T, triton.cdiv(D, BD), BT, torch.device(dev))
                ent = {"T": T, **tun, "segments": S, "seg_len": seg_len, "programs": B * triton.cdiv(D, BD) * S,
                       "relerr_vs_fp64": err}
                if err < 1e-4:
                    ent["graph_ms"] = graph_ms(lambda: new.cema(x, p, q, g, backend="triton"))
                record["sweep"].append(ent)
            except Exception as e:  # noqa: BLE001
                record["sweep"].append({"T": T, **tun, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            finally:
                new.TUNING.clear(); new.TUNING.update(default)
        best = sorted((e for e in record["sweep"] if e["T"] == T and "graph_ms" in e), key=lambda e: e["graph_ms"])[:3]
        log(f"sweep T={T} best: " + "; ".join(f"pps={e['programs_per_sm']} mst={e['min_segment_tiles']} S={e['segments']} "
                                               f"{e['graph_ms']:.4f} ms" for e in best))
        # stage 2: the forward's channels per program and warps, at this length's best segment choice
        if best:
            base = {k: best[0][k] for k in ("programs_per_sm", "min_segment_tiles")}
            for bd, nw, fold in ([(4, 4, False)] if args.smoke else
                                 [(bd, nw, fold) for fold in (True, False) for bd in (4, 8, 16) for nw in (2, 4, 8)]):
                if time.time() - t_start > args.budget_s + 90:
                    break
                tun = {**base, "block_d": bd, "num_warps": nw, "fold_state": fold}
                new.TUNING.update(tun)
                try:
                    y, _ = new.cema(x, p, q, g, backend="triton")
                    err = rel_err(y, yf)
                    BT, BD, _ = new._fwd_blocks(T, D, N, dev == "cuda")
                    S, seg_len = new._cema_segments(B, T, triton.cdiv(D, BD), BT, torch.device(dev))
                    ent = {"T": T, "stage": 2, **tun, "segments": S, "seg_len": seg_len, "relerr_vs_fp64": err}
                    if err < 1e-4:
                        ent["graph_ms"] = graph_ms(lambda: new.cema(x, p, q, g, backend="triton"))
                    record["sweep"].append(ent)
                except Exception as e:  # noqa: BLE001
                    record["sweep"].append({"T": T, "stage": 2, **tun, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                finally:
                    new.TUNING.clear(); new.TUNING.update(default)
            b2 = sorted((e for e in record["sweep"] if e["T"] == T and e.get("stage") == 2 and "graph_ms" in e),
                        key=lambda e: e["graph_ms"])[:3]
            log(f"sweep2 T={T} best: " + "; ".join(f"bd={e['block_d']} nw={e['num_warps']} fold={e['fold_state']} S={e['segments']} "
                                                    f"{e['graph_ms']:.4f} ms" for e in b2))
        save()
    record["phase_s"]["sweep"] = round(time.time() - t0, 1)
    record["phase_s"]["total"] = round(time.time() - t_start, 1)
    for r in record["rows"]:
        if "old_fp32_graph_ms" in r and "new_fp32_graph_ms" in r:
            log(f"T={r['T']:>6} fp32 graph old {r['old_fp32_graph_ms']:.4f} new {r['new_fp32_graph_ms']:.4f} | call old "
                f"{r['old_fp32_call_ms']:.4f} new {r['new_fp32_call_ms']:.4f} | bf16 graph old {r['old_bf16_graph_ms']:.4f} "
                f"new {r['new_bf16_graph_ms']:.4f}")
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
