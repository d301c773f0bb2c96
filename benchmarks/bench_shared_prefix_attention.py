"""GPU benchmark of the many-shot chapter's kernel (nbs/30a_shared_prefix_attention.ipynb): B examples, each with S
suffix query tokens, attend to one shared prefix of P tokens plus their own suffix (causal inside the suffix).
32 query heads, 8 KV heads, head dim 128, bf16 (the anchors' shape, /work/shared/anchors/shared_prefix_attention).

Run on a CUDA machine from the repository root:
    PYTHONPATH=. python3 benchmarks/bench_shared_prefix_attention.py --out book/results/shared_prefix_attention_h200.json
It first checks the kernel against the fp32 reference on odd shapes (fp32 and bf16; no timings on a red gate), picks
the block sizes from a few candidates at one shape, then times, with `triton.testing.do_bench` (median, L2 flushed):
  - ours: `shared_prefix_attention_triton` (the prefix read once per block of query rows, split when rows are few),
  - sdpa_expanded: torch SDPA over the prefix copied in front of every example (causal_lower_right, enable_gqa);
    the copy itself is made before timing (it costs memory: skipped above --max-copy-gib),
  - reencode: attention computed from scratch over prefix + suffix for every example, i.e. causal SDPA over all
    P + S tokens of one example (every prefix token a query too), timed at batch 1 and multiplied by B,
  - flex: FlexAttention (torch.compile) over one flat KV [prefix | suffix_0 | ...] with a block mask (the anchor),
  - fi_compose: FlashInfer single_prefill + ragged batch prefill + merge_state (the anchor's recipe), last, at
    --fi-B examples, when flashinfer imports (its wheels on PYTHONPATH: see the anchors' README) and time is left.
    Its first call JIT-builds for 2-3 minutes; the recorded run (book/results/shared_prefix_attention_h200.json)
    used --no-flashinfer, so this path has not run yet, and the page quotes the anchors' FlashInfer numbers.
Every timed method is checked against the fp32 reference on two examples first. Rows report ms, TFLOP/s and the
fraction of 790 TFLOP/s (dense bf16 matrix rate measured on an H200), and the bandwidth achieved on the problem's
fewest bytes (prefix once, suffixes, queries, outputs) as a fraction of 4.8 TB/s.
`--smoke` runs tiny sizes on the CPU under TRITON_INTERPRET=1 (checks the script; CI runs it).
Imports only torch, triton and tinylab.kernels.*.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

PEAK_FLOPS, PEAK_BYTES = 790e12, 4.8e12
HQ, HKV = 32, 8


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def problem_flops(B, Hq, S, P, D) -> float:
    "Two products of (queries x keys x D) each, prefix plus the causal half of the suffix."
    return 4.0 * Hq * D * B * S * (P + (S + 1) / 2)


def problem_bytes(B, Hq, Hkv, S, P, D, el=2) -> float:
    "The fewest bytes: prefix K, V once, each suffix's K, V, the queries and the outputs."
    return el * (2 * Hkv * P * D + 2 * B * Hkv * S * D + 2 * B * Hq * S * D)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="JSON file to write (or --out)")
    ap.add_argument("--out", dest="out_opt")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--P", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--B", type=int, nargs="+", default=[64, 256, 1, 16])
    ap.add_argument("--S", type=int, default=64)
    ap.add_argument("--extra", default="131072:64:8", help="extra P:B:S points, comma separated (the anchors' S=8 row)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start nothing new after this many seconds")
    ap.add_argument("--max-copy-gib", type=float, default=40.0, help="skip sdpa_expanded when its copies need more")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--fi-B", type=int, default=64, help="FlashInfer is timed at this many examples only")
    ap.add_argument("--fi-budget-s", type=float, default=450.0, help="start no FlashInfer point after this many seconds")
    args = ap.parse_args(argv)
    out_path = args.out or args.out_opt
    if not out_path:
        ap.error("give the output JSON path")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    t_start = time.time()

    import torch
    import torch.nn.functional as F
    import triton
    from tinylab.kernels.shared_prefix_attention import (shared_prefix_attention_ref, shared_prefix_attention_triton,
                                                         default_config)
    if args.smoke:
        dev, D, Hq, Hkv, dtype = torch.device("cpu"), 16, 4, 2, torch.float32
        points = [(40, 2, 3), (70, 3, 2)]
        do_bench = lambda fn, warmup=0, rep=0, return_mode="median": (lambda t0: (fn(), (time.perf_counter() - t0) * 1e3)[1])(time.perf_counter())
        candidates = [dict(block_m=16, block_n=16, num_warps=4, num_stages=1)]
    else:
        from triton.testing import do_bench
        dev, D, Hq, Hkv, dtype = torch.device("cuda"), 128, HQ, HKV, torch.bfloat16
        # in order of priority (a time budget cuts the tail): the anchors' 64 examples, their S = 8 row, the rest
        points = [(P, B, args.S) for B in args.B for P in args.P]
        points[len(args.P):len(args.P)] = [tuple(int(x) for x in e.split(":")) for e in args.extra.split(",") if e]
        candidates = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
                      [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (64, 64, 4, 3)]]
    G = Hq // Hkv
    record = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)",
                  torch=torch.__version__, triton=triton.__version__, commit=os.environ.get("TINYLAB_COMMIT"),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), args=vars(args),
                  shape=dict(heads=Hq, kv_heads=Hkv, head_dim=D, dtype=str(dtype).split(".")[-1]),
                  peak_tflops=PEAK_FLOPS / 1e12, peak_tbps=PEAK_BYTES / 1e12, gate={}, tuning=[], rows=[], skipped=[],
                  notes=[])

    def save():
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1)

    def elapsed():
        return time.time() - t_start

    def bench(fn):
        "median ms over CUDA events (do_bench flushes L2 before each call), at least ~6 calls"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        est = (time.time() - t) * 1e3
        return do_bench(fn, warmup=max(10, 1.5 * est), rep=max(50, 6 * est), return_mode="median")

    def inputs(B, S, P, dt=dtype, hq=Hq, hkv=Hkv, d=D, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        r = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)
        return r(B, hq, S, d), r(hkv, P, d), r(hkv, P, d), r(B, hkv, S, d), r(B, hkv, S, d)

    # 1. the gate: odd shapes, fp32 (1e-4) and bf16 (1e-2), one split and several
    gate_shapes = [(1, 1, 1, 1, 1, 16), (3, 6, 2, 7, 37, 16)] if args.smoke else \
        [(1, 32, 8, 1, 4097, 128), (2, 8, 8, 17, 513, 80), (3, 6, 2, 7, 1000, 64), (5, 4, 1, 33, 300, 128), (2, 4, 2, 9, 777, 256)]
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        worst = 0.0
        for (B, hq, hkv, S, P, d) in (gate_shapes[:2] if dt == torch.float32 else gate_shapes):
            x = inputs(B, S, P, dt, hq, hkv, d, seed=B * 7 + P)
            ref = shared_prefix_attention_ref(*x)
            for ns in ((None, 3) if dt == torch.bfloat16 else (None,)):
                out = shared_prefix_attention_triton(*x, num_splits=ns)
                e = rel_err(out, ref)
                if not e < tol or not torch.isfinite(out).all():
                    record["gate"]["failed"] = f"{dt} {(B, hq, hkv, S, P, d)} num_splits={ns}: error {e:.2e} > {tol}"
                    save()
                    raise SystemExit("red gate: " + record["gate"]["failed"])
                worst = max(worst, e)
            print(f"  gate {str(dt)[6:]} {(B, hq, hkv, S, P, d)} ok ({elapsed():.0f} s)", flush=True)
        record["gate"][str(dt).split(".")[-1]] = worst
        record["gate"]["shapes_" + str(dt).split(".")[-1]] = gate_shapes[:2] if dt == torch.float32 else gate_shapes
    print("gate passed:", record["gate"], f"({elapsed():.0f} s)", flush=True)
    save()

    # 2. block sizes: a few candidates at one shape
    tP, tB, tS = (70, 3, 2) if args.smoke else (16384, 64, 64)
    x = inputs(tB, tS, tP)
    ref = {n: shared_prefix_attention_ref(x[0][n:n + 1], x[1], x[2], x[3][n:n + 1], x[4][n:n + 1]) for n in (0, tB - 1)}
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            fn = lambda: shared_prefix_attention_triton(*x, config=cfg)
            out = fn()
            e = max(rel_err(out[n:n + 1], ref[n]) for n in ref)
            assert e < 2e-2, f"error {e:.2e}"
            ms = bench(fn)
            record["tuning"].append(dict(**cfg, P=tP, B=tB, S=tS, ms=round(ms, 4), err=e,
                                         frac_peak=round(problem_flops(tB, Hq, tS, tP, D) / (ms * 1e-3) / PEAK_FLOPS, 3)))
            print("config", cfg, f"{ms:.3f} ms", flush=True)
            if ms < best_ms:
                best, best_ms = cfg, ms
        except Exception as exc:  # noqa: BLE001  (a config that does not fit or compile is recorded, not fatal)
            record["tuning"].append(dict(**cfg, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            print("config", cfg, "failed:", type(exc).__name__, str(exc)[:200], flush=True)
    record["config"] = best
    record["default_config"] = default_config(tB * G * tS, D, dtype, not args.smoke)
    save()
    del x, ref

    # 3. the anchors' methods
    fi = None
    if not args.smoke and not args.no_flashinfer:
        try:
            import flashinfer as fi
        except Exception as exc:  # noqa: BLE001
            record["notes"].append(f"FlashInfer not importable, skipped: {type(exc).__name__}: {str(exc)[:200]}")
    flex_c = None
    if not args.smoke:
        try:
            from torch.nn.attention.flex_attention import flex_attention, create_block_mask
            torch._dynamo.config.cache_size_limit = 64
            flex_c = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            record["notes"].append(f"FlexAttention unavailable: {exc}")
    from torch.nn.attention.bias import causal_lower_right
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if fi is not None else None
    reencode_ms = {}

    def methods(q, kp, vp, ks, vs, B, S, P):
        "name -> setup(); setup() returns the timed call (output (B, Hq, S, D)) or raises."
        def ours():
            return lambda: shared_prefix_attention_triton(q, kp, vp, ks, vs, config=best)

        def sdpa_expanded():
            gib = 2 * B * Hkv * (P + S) * D * q.element_size() / 2**30
            if gib > args.max_copy_gib:
                raise MemoryError(f"skipped: the expanded copies need {gib:.0f} GiB")
            Kx, Vx = torch.cat([kp.expand(B, Hkv, P, D), ks], 2), torch.cat([vp.expand(B, Hkv, P, D), vs], 2)
            mask = causal_lower_right(S, P + S)
            return lambda: F.scaled_dot_product_attention(q, Kx, Vx, attn_mask=mask, enable_gqa=True)

        def flex():
            LQ, LKV = B * S, P + B * S
            qf = q.permute(1, 0, 2, 3).reshape(1, Hq, LQ, D)
            kf = torch.cat([kp, ks.permute(1, 0, 2, 3).reshape(Hkv, LQ, D)], 1)[None]
            vf = torch.cat([vp, vs.permute(1, 0, 2, 3).reshape(Hkv, LQ, D)], 1)[None]

            def mask_mod(b, h, qi, kv):
                j = kv - P
                return (kv < P) | ((j >= 0) & ((j // S) == (qi // S)) & ((j % S) <= (qi % S)))
            bm = create_block_mask(mask_mod, None, None, LQ, LKV, device=dev)
            return lambda: flex_c(qf, kf, vf, block_mask=bm, scale=D ** -0.5, enable_gqa=True).view(Hq, B, S, D).transpose(0, 1)

        def fi_compose():
            qf = q.permute(0, 2, 1, 3).reshape(B * S, Hq, D)
            kpf, vpf = kp.transpose(0, 1).contiguous(), vp.transpose(0, 1).contiguous()
            ksf, vsf = (t.permute(0, 2, 1, 3).reshape(B * S, Hkv, D) for t in (ks, vs))
            ind = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=dev)
            rag = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
            rag.plan(ind, ind, Hq, Hkv, D, causal=True, q_data_type=q.dtype, kv_data_type=q.dtype)

            def run():
                o1, l1 = fi.single_prefill_with_kv_cache(qf, kpf, vpf, causal=False, return_lse=True)
                o2, l2 = rag.run(qf, ksf, vsf, return_lse=True)
                return fi.merge_state(o1, l1, o2, l2)[0].view(B, S, Hq, D).transpose(1, 2)
            return run

        impls = dict(ours=ours, sdpa_expanded=sdpa_expanded)
        if flex_c is not None:
            impls["flex"] = flex
        if fi is not None:
            impls["fi_compose"] = fi_compose
        return impls

    def measure(name, setup, P, B, S, refs, flops, nbytes):
        "check one method against the fp32 reference, then time it; a row, or a skip with the reason"
        try:
            t0 = time.time()
            fn = setup()
            out = fn()
            err = max(rel_err(out[n:n + 1], refs[n]) for n in refs)
            if not err < 2e-2:
                raise AssertionError(f"rel err {err:.2e} vs the fp32 reference")
            ms = bench(fn)
            row = dict(P=P, B=B, S=S, method=name, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                       frac_peak=round(flops / (ms * 1e-3) / PEAK_FLOPS, 3), tbps=round(nbytes / ms / 1e9, 3),
                       frac_bw=round(nbytes / (ms * 1e-3) / PEAK_BYTES, 3), rel_err=err, setup_s=round(time.time() - t0, 1))
            record["rows"].append(row)
            print(f"{P:7d} {B:4d} {S:3d} {name:14} {ms:9.3f} {row['tflops']:8.0f} {row['frac_peak']:5.2f} "
                  f"{row['tbps']:6.2f} {err:8.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            record["skipped"].append(dict(P=P, B=B, S=S, method=name, why=f"{type(exc).__name__}: {str(exc)[:200]}"))
            print(f"{P:7d} {B:4d} {S:3d} {name:14} skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def point(P, B, S, seed):
        q, kp, vp, ks, vs = inputs(B, S, P, seed=seed)
        refs = {n: shared_prefix_attention_ref(q[n:n + 1], kp, vp, ks[n:n + 1], vs[n:n + 1]) for n in sorted({0, B - 1})}
        return (q, kp, vp, ks, vs), refs, problem_flops(B, Hq, S, P, D), problem_bytes(B, Hq, Hkv, S, P, D, q.element_size())

    def reencode(P, S):
        "causal SDPA over all P + S tokens of one example (GQA), i.e. no prefix cache at all"
        g = torch.Generator(device=dev).manual_seed(1)
        q1 = torch.randn(1, Hq, P + S, D, device=dev, dtype=dtype, generator=g)
        k1, v1 = (torch.randn(1, Hkv, P + S, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
        return bench(lambda: F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, enable_gqa=True))

    print(f"{'P':>7} {'B':>4} {'S':>3} {'method':14} {'ms':>9} {'TFLOP/s':>8} {'frac':>5} {'TB/s':>6} {'relerr':>8}", flush=True)
    for (P, B, S) in points:
        if elapsed() > args.budget_s:
            record["skipped"].append(dict(P=P, B=B, S=S, why="time budget"))
            continue
        x, refs, flops, nbytes = point(P, B, S, P + B + S)
        for name, setup in methods(*x, B, S, P).items():
            if name != "fi_compose":
                measure(name, setup, P, B, S, refs, flops, nbytes)
        if (P, S) not in reencode_ms and elapsed() < args.budget_s:
            reencode_ms[(P, S)] = reencode(P, S)
        if (P, S) in reencode_ms:
            ms = reencode_ms[(P, S)] * B
            record["rows"].append(dict(P=P, B=B, S=S, method="reencode", ms=round(ms, 4), per_example_ms=round(reencode_ms[(P, S)], 4),
                                       tflops=round(flops / ms / 1e9, 1), frac_peak=round(flops / (ms * 1e-3) / PEAK_FLOPS, 3),
                                       tbps=round(nbytes / ms / 1e9, 3), frac_bw=round(nbytes / (ms * 1e-3) / PEAK_BYTES, 3)))
            print(f"{P:7d} {B:4d} {S:3d} {'reencode':14} {ms:9.3f}   (B x {reencode_ms[(P, S)]:.3f} ms)", flush=True)
        del x, refs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    # FlashInfer last (its first call JIT-builds for minutes): the points with --fi-B examples, while time is left
    if fi is not None:
        for (P, B, S) in points:
            if B != args.fi_B or S != args.S:
                continue
            if elapsed() > args.fi_budget_s:
                record["skipped"].append(dict(P=P, B=B, S=S, method="fi_compose", why="time budget"))
                continue
            x, refs, flops, nbytes = point(P, B, S, P + B + S)
            measure("fi_compose", methods(*x, B, S, P)["fi_compose"], P, B, S, refs, flops, nbytes)
            del x, refs
            save()
    record["wall_s"] = round(elapsed(), 1)
    save()
    print("wrote", out_path, f"({elapsed():.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
