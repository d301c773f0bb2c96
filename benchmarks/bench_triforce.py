"""GPU benchmark of the TriForce chapter's kernel (nbs/21_triforce.ipynb): decode attention over selected KV chunks,
read in place, against PyTorch SDPA on the gathered chunks and on the full cache.

Run on a CUDA machine from the repository root:
    PYTHONPATH=. python3 benchmarks/bench_triforce.py --out book/results/triforce_h200.json
It first checks the kernel against the PyTorch reference (fp32 and bf16; no timings on a red gate), measures the
GPU's copy bandwidth (the floor: time to read the KV bytes once), then times, at Llama2-7B's attention shape
(32 heads of 128) and growing cache lengths, with `triton.testing.do_bench` (median):
  - SDPA on the full cache (what the verifying level reads),
  - the kernel on the full cache (all chunks), given every chunk id and given none (`chunk_idx=None`: no ids to load),
  - SDPA on the selected chunks, gather copy included / excluded (the retrieval cache the usual way),
  - the kernel on the selected chunks, read in place (TriForce's middle level);
each also as GPU time replayed from a CUDA graph (`graph_ms`: no launch cost, as in a captured decoding loop).
Imports only torch, triton, numpy, pandas, tinylab.kernels.* and tinylab.core (cuda_graph_ms).
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
import triton
from triton.testing import do_bench

from tinylab.core import cuda_graph_ms
import tinylab.kernels.sparse_decode_attention as sda_module
from tinylab.kernels.sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_ref


USE_TRITON = None   # None: Triton on CUDA tensors; the smoke test forces it on the CPU (interpreter)


def kernel(q, k, v, idx, C):
    "The kernel as TriForce calls it: the ids are distinct by construction, so the check (a sort and a sync) is off."
    return sparse_decode_attention(q, k, v, idx, C, use_triton=USE_TRITON, check_distinct=False)


def graph_ms(fn):
    "GPU ms of one call from a CUDA graph; None on the CPU (smoke) or if `fn` cannot be captured."
    if not torch.cuda.is_available():
        return None
    try:
        return cuda_graph_ms(fn)
    except Exception as e:  # noqa: BLE001
        print(f"not capturable: {type(e).__name__}: {str(e)[:120]}")
        return None


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def gate(dev) -> dict:
    "Kernel vs reference on odd shapes; raises if any is out of tolerance."
    errs = {}
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        worst = 0.0
        for B, H, Hkv, NQ, N, D, M in [(1, 32, 32, 1, 5000, 128, 77), (2, 6, 2, 7, 1001, 60, 40), (1, 8, 1, 3, 123, 64, 16),
                                       (1, 32, 8, 7, 20000, 128, 600)]:
            q = torch.randn(B, H, NQ, D, device=dev, dtype=dtype)
            buf = torch.randn(2, B, Hkv, N + 50, D, device=dev, dtype=dtype)
            k, v = buf[0, :, :, :N], buf[1, :, :, :N]
            nc = triton.cdiv(N, 8)
            # distinct chunks, the last one (the newest tokens) always among them
            idx = torch.stack([torch.cat([torch.randperm(nc - 1, device=dev)[:M - 1], torch.tensor([nc - 1], device=dev)])
                               for _ in range(B * Hkv)]).view(B, Hkv, M)
            out = sparse_decode_attention(q, k, v, idx, 8)
            ref = sparse_decode_attention_ref(q, k, v, idx, 8)
            e = rel_err(out, ref)
            if not (e < tol) or torch.isnan(out).any():
                raise SystemExit(f"red gate: {dtype} {(B, H, Hkv, NQ, N, D, M)} error {e:.2e} > {tol}")
            worst = max(worst, e)
        errs[str(dtype).split(".")[-1]] = worst
    return errs


def copy_bandwidth(dev) -> float:
    "GB/s of a device-to-device copy of 2 GiB (bytes read + written)."
    x = torch.empty(2**30, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def sdpa_end_aligned(q, k, v):
    """SDPA with the new queries as the last NQ tokens (causal, aligned to the end); GQA without copying k, v.
    The mask is `causal_lower_right`, which SDPA's flash and memory-efficient kernels take (a dense boolean
    mask would leave it only the slower ones, and flatter our kernel)."""
    NQ, N = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if NQ == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(NQ, N), enable_gqa=gqa)


def sdpa_dense_mask(q, k, v):
    "SDPA with the same end-aligned causal mask as a dense boolean tensor (the H100 run's baseline; slower paths only)."
    NQ, N = q.shape[2], k.shape[2]
    mask = torch.ones(NQ, N, dtype=torch.bool, device=q.device).tril(diagonal=N - NQ)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_backend(q, k, v) -> str:
    "Which of SDPA's kernels runs these inputs: the first, in SDPA's own order of preference, that accepts them."
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                sdpa_end_aligned(q, k, v)
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1 (checks the script)")
    ap.add_argument("--tuning", default="{}", help="JSON of TUNING entries to time instead of the module's")
    args = ap.parse_args()
    sda_module.TUNING.update(json.loads(args.tuning))
    global do_bench, USE_TRITON
    if args.smoke:
        USE_TRITON = True
        import time
        dev, C, D, H, dtype, contexts, kv_heads, args.budget = torch.device("cpu"), 8, 16, 4, torch.float32, (200,), (4, 2), 32
        do_bench = lambda fn, warmup=0, rep=0: (lambda t0: (fn(), (time.perf_counter() - t0) * 1e3)[1])(time.perf_counter())
        errs, bw = {}, 10.0
    else:
        dev, C, D, H, dtype, contexts, kv_heads = torch.device("cuda"), 8, 128, 32, torch.bfloat16, (16384, 65536, 122880), (32, 8)
        errs = gate(dev)
        print("gate passed:", errs)
        bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw:.0f} GB/s")
    rows = []
    for Hkv in kv_heads:
        for N in contexts:
            for NQ in (1, 7):
                torch.manual_seed(0)
                q = torch.randn(1, H, NQ, D, device=dev, dtype=dtype)
                cap = N + 256
                kbuf = torch.randn(1, Hkv, cap, D, device=dev, dtype=dtype)
                vbuf = torch.randn(1, Hkv, cap, D, device=dev, dtype=dtype)
                k, v = kbuf[:, :, :N], vbuf[:, :, :N]                      # views of the cache buffer
                nc = triton.cdiv(N, C)
                all_idx = torch.arange(nc, device=dev, dtype=torch.int32).expand(1, Hkv, nc).contiguous()
                m = args.budget // C
                # a retrieval selection: the first chunk, random chunks of the prefix, and the chunks of the last NQ tokens
                sel = torch.stack([torch.randperm(nc - 2, device=dev)[:m - 2] + 1 for _ in range(Hkv)]).sort(-1).values
                sel = torch.cat([torch.zeros(Hkv, 1, device=dev, dtype=sel.dtype), sel,
                                 torch.full((Hkv, 1), nc - 1, device=dev, dtype=sel.dtype)], 1)[None].to(torch.int32)
                tok = (sel.long()[..., None] * C + torch.arange(C, device=dev)).flatten(2).clamp_max(N - 1)   # (1, Hkv, m*C)

                def gather():                                              # the retrieval cache as a copy
                    ix = tok[..., None].expand(-1, -1, -1, D)
                    return k.gather(2, ix), v.gather(2, ix)

                ks, vs = gather()
                # correctness of the timed paths against each other before timing
                e_full = max(rel_err(kernel(q, k, v, ids, C), sdpa_end_aligned(q, k, v)) for ids in (all_idx, None))
                e_sel = rel_err(kernel(q, k, v, sel, C), sdpa_end_aligned(q, ks, vs))
                e_dense = rel_err(sdpa_dense_mask(q, k, v), sdpa_end_aligned(q, k, v)) if NQ > 1 else 0.0
                if e_full > 2e-2 or e_sel > 2e-2 or e_dense > 2e-2:
                    raise SystemExit(f"red gate at N={N}, NQ={NQ}, Hkv={Hkv}: errors {e_full:.2e}, {e_sel:.2e}")
                backend = sdpa_backend(q, k, v)
                full_bytes = 2 * k.numel() * k.element_size()
                sel_bytes = 2 * ks.numel() * ks.element_size()
                fns = {
                    "SDPA, full cache": (lambda: sdpa_end_aligned(q, k, v), full_bytes),
                    "triforce kernel, full cache": (lambda: kernel(q, k, v, all_idx, C), full_bytes),
                    "triforce kernel, full cache, no ids": (lambda: kernel(q, k, v, None, C), full_bytes),
                    "SDPA, selected chunks (gather included)": (lambda: sdpa_end_aligned(q, *gather()), sel_bytes),
                    "SDPA, selected chunks (pre-gathered)": (lambda: sdpa_end_aligned(q, ks, vs), sel_bytes),
                    "triforce kernel, selected chunks": (lambda: kernel(q, k, v, sel, C), sel_bytes),
                }
                if NQ > 1:
                    fns["SDPA, full cache, dense boolean mask"] = (lambda: sdpa_dense_mask(q, k, v), full_bytes)
                times = {name: do_bench(fn, warmup=25, rep=200) for name, (fn, _) in fns.items()}
                graph = {name: graph_ms(fn) for name, (fn, _) in fns.items()}
                for name, (fn, nbytes) in fns.items():
                    ms = times[name]
                    rows.append(dict(heads=H, kv_heads=Hkv, context=N, new_tokens=NQ, budget=args.budget, method=name,
                                     sdpa_backend=backend,
                                     ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1), floor_ms=round(nbytes / bw / 1e6, 4),
                                     of_floor=round(nbytes / bw / 1e6 / ms, 3),
                                     speedup_vs_sdpa_full=round(times["SDPA, full cache"] / ms, 2),
                                     graph_ms=graph[name] and round(graph[name], 4),
                                     graph_of_floor=graph[name] and round(nbytes / bw / 1e6 / graph[name], 3),
                                     graph_speedup_vs_sdpa_full=graph[name] and graph["SDPA, full cache"]
                                     and round(graph["SDPA, full cache"] / graph[name], 2)))
                    print(f"Hkv={Hkv:2d} N={N:6d} NQ={NQ} {name:42s} {ms:8.4f} ms  {nbytes / ms / 1e6:7.0f} GB/s  "
                          f"graph {graph[name] or float('nan'):8.4f} ms")
                del kbuf, vbuf, ks, vs
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    record = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)", torch=torch.__version__, triton=triton.__version__,
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), copy_gbps=round(bw, 1), gate=errs,
                  dtype="bfloat16", head_dim=D, chunk_size=C, sdpa_mask="causal_lower_right",
                  timing="triton.testing.do_bench, mean ms (L2 flushed before each call), a call as a user makes it; "
                         "graph_ms: GPU time of one call replayed from a CUDA graph of 20 (tinylab.core.cuda_graph_ms), no "
                         "launch cost, as in a decoding loop captured in a graph", kernel_tuning=dict(sda_module.TUNING),
                  commit=os.environ.get("TINYLAB_COMMIT"), args=vars(args), rows=rows)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
