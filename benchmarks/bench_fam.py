"""GPU benchmark of chapter 12 (TransformerFAM): the block tokens' attention of BSWA+FAM as a FlexAttention
block mask (compiled to Triton) vs the same pattern as a dense boolean mask in SDPA vs full causal attention
(SDPA, flash), over sequence lengths 1k..64k; forward time (median, triton.testing.do_bench) and peak memory.

Run on the GPU machine:  PYTHONPATH=. python3 benchmarks/bench_fam.py --out $OUT/fam_h100.json
Correctness is checked against the block-loop reference first; nothing is timed on a red gate.
With --experiment it then runs the chapter's experiment at its "gpu" scale (the same exported helpers;
the GPU image has no `datasets`, so the Llama config is written here instead of via tinylab.lm) and
records accuracy against distance in the same JSON."""
import argparse
import json
import sys
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import triton
import triton.testing

from tinylab.fam import fam_attention, fam_attention_ref

# one compiled kernel per (length, pattern): raise dynamo's recompile limit so none falls back to eager
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)

BLOCK, MEMORY, FAM = 1024, 3, 64  # the paper's defaults
H, D, DTYPE = 16, 64, torch.bfloat16
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def make(T, dtype=DTYPE, seed=0, fam=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    n = -(-T // BLOCK)
    fk, fv = ((torch.randn(1, H, n, FAM, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
              if fam else (None, None))
    return q, k, v, fk, fv


def max_err(ref, out):
    "Max abs error relative to the largest reference entry (scale-free across lengths and dtypes)."
    return ((ref.float() - out.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def gate():
    "Relative max errors of flex and dense SDPA vs the block loop (bf16, fp32; odd lengths), and of flex gradients (fp32)."
    out, ok = {}, True
    for T, dtype, tol in [(3000, torch.bfloat16, 3e-2), (2500, torch.float32, 5e-3)]:
        q, k, v, fk, fv = make(T, dtype)
        ref = fam_attention_ref(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY)
        for backend in ("flex", "sdpa"):
            e = max_err(ref, fam_attention(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY, backend=backend))
            out[f"{backend}_fwd_{str(dtype).split('.')[-1]}_T{T}"] = e
            ok &= e < tol
    q, k, v, fk, fv = (t.requires_grad_() for t in make(1500, torch.float32))
    dy = torch.randn_like(q)
    ref_g = torch.autograd.grad((fam_attention_ref(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY) * dy).sum(), (q, k, v, fk, fv))
    tri_g = torch.autograd.grad((fam_attention(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY, backend="flex") * dy).sum(), (q, k, v, fk, fv))
    for name, r, t in zip(("dq", "dk", "dv", "dfam_k", "dfam_v"), ref_g, tri_g):
        e = max_err(r, t)
        out[f"flex_bwd_fp32_{name}"] = e
        ok &= e < 5e-3
    return ok, out


def copy_bandwidth():
    "GB/s of a large device-to-device copy (read + write), the memory floor's yardstick."
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    return 2 * x.numel() / ms / 1e6


def measure(fn):
    "Median ms (do_bench) and peak memory (MiB) allocated during one call, above what was allocated before."
    try:
        fn(); torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=5, rep=50)
        return ms, peak, ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan"), "OOM"
    except Exception as e:  # noqa: BLE001  (recorded, the sweep goes on)
        torch.cuda.empty_cache()
        return float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:120]}"


# the chapter's PRESETS["gpu"] (nbs/12_fam.ipynb)
GPU_PRESET = dict(d_model=128, n_layers=2, n_heads=4, seq_len=256, block=16, memory=1, fam=8, lora_rank=32,
                  pre_steps=1000, ft_steps=1000, batch=64, lr=2e-3, ft_lr=2e-3, eval_n=256,
                  distances=[4, 16, 30, 48, 96, 160, 249])


def experiment(seed=0, budget_s=300.0):
    "Pretrain BSWA (facts inside the window), then LoRA + FAM vs LoRA + BSWA, same steps; accuracy by distance."
    import time
    from transformers import AutoModelForCausalLM, LlamaConfig
    from tinylab.fam import FAMLlama, RecallTask, accuracy_by_distance, train_recall, with_lora
    c = GPU_PRESET
    task = RecallTask()
    config = LlamaConfig(vocab_size=task.vocab_size, hidden_size=c["d_model"], intermediate_size=4 * c["d_model"],
                         num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_heads"],
                         max_position_embeddings=c["seq_len"], tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).cuda()
    window = (c["memory"] + 1) * c["block"]
    t0 = time.perf_counter()
    pre = FAMLlama(base, c["block"], c["memory"], c["fam"], mode="bswa")
    pre.fam_prompt.requires_grad_(False)
    # time budget: 30% pretraining, 45% FAM fine-tuning; BSWA then gets exactly as many steps as FAM got
    losses = {"pretrain": train_recall(pre, task, "bswa", c["pre_steps"], c["lr"], c["batch"], c["seq_len"], window, seed,
                                       "pretrain", max_seconds=0.3 * budget_s)}
    print(f"pretrain: {len(losses['pretrain'])} steps, loss {np.mean(losses['pretrain'][-50:]):.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    arms, steps = {}, c["ft_steps"]
    for arm in ("fam", "bswa"):
        arms[arm] = FAMLlama(with_lora(base, c["lora_rank"], seed), c["block"], c["memory"], c["fam"], mode=arm)
        arms[arm].fam_prompt.requires_grad_(arm == "fam")
        losses[arm] = train_recall(arms[arm], task, arm, c["ft_steps"], c["ft_lr"], c["batch"], c["seq_len"], None, seed + 1, arm,
                                   max_seconds=0.45 * budget_s if arm == "fam" else None)
        if arm == "fam":
            steps = len(losses["fam"])
        else:
            losses["bswa"] = losses["bswa"][:steps]
        print(f"{arm}: {len(losses[arm])} steps, loss {np.mean(losses[arm][-50:]):.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    models = {"BSWA pretrained": (pre, "bswa"), "LoRA + BSWA": (arms["bswa"], "bswa"), "LoRA + FAM": (arms["fam"], "fam")}
    acc = {name: {t: accuracy_by_distance(m, task, mode, n_pairs, c["distances"], c["eval_n"], c["seq_len"], seed + 7)
                  for t, n_pairs in (("passkey", 1), ("recall (3 pairs)", 3))} for name, (m, mode) in models.items()}
    return dict(preset=c, window=window, steps={k: len(v) for k, v in losses.items()}, seconds=time.perf_counter() - t0, accuracy=acc,
                final_loss={k: float(np.mean(v[-50:])) for k, v in losses.items()},
                loss_curves={k: [float(np.mean(v[i:i + 20])) for i in range(0, len(v), 20)] for k, v in losses.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    ap.add_argument("--experiment", action="store_true", help="also run the chapter's experiment at gpu scale")
    ap.add_argument("--only-experiment", action="store_true", help="skip the gate and the sweep")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the experiment's training")
    args = ap.parse_args()
    if args.only_experiment:
        record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                      date=datetime.now(timezone.utc).isoformat(timespec="seconds"), experiment=experiment(budget_s=args.budget))
        print(json.dumps(record["experiment"]["accuracy"], indent=1))
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=float)
        return 0
    ok, errors = gate()
    print("gate", "PASS" if ok else "FAIL", json.dumps(errors, indent=1), flush=True)
    record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  config=dict(block=BLOCK, memory_blocks=MEMORY, fam=FAM, heads=H, head_dim=D, batch=1, dtype=str(DTYPE)),
                  gate_pass=ok, gate_errors=errors, rows=[])
    if ok:
        bw = copy_bandwidth()
        record["copy_bandwidth_GBps"] = bw
        for T in args.lengths:
            q, k, v, fk, fv = make(T)
            io_bytes = 4 * q.numel() * q.element_size() + 2 * fk.numel() * fk.element_size()
            fns = {
                "flex BSWA+FAM": lambda: fam_attention(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY, backend="flex"),
                "flex BSWA": lambda: fam_attention(q, k, v, block_size=BLOCK, memory_blocks=MEMORY, backend="flex"),
                "dense-mask SDPA BSWA+FAM": lambda: fam_attention(q, k, v, fk, fv, block_size=BLOCK, memory_blocks=MEMORY, backend="sdpa"),
                "full causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            }
            n_kv = T + -(-T // BLOCK) * FAM
            mask_mib = {"dense-mask SDPA BSWA+FAM": T * n_kv / 2**20}  # the cached bool mask, outside the peak
            for name, fn in fns.items():
                ms, peak, note = measure(fn)
                row = dict(T=T, method=name, ms=ms, peak_mib=peak, mask_mib=mask_mib.get(name, 0.0),
                           floor_ms=io_bytes / bw / 1e6, note=note)
                record["rows"].append(row)
                print(row, flush=True)
            del q, k, v, fk, fv
            torch.cuda.empty_cache()
        df = pd.DataFrame(record["rows"])
        print(df.pivot(index="T", columns="method", values="ms").round(3).to_string())
        print(df.pivot(index="T", columns="method", values="peak_mib").round(1).to_string())
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, default=float)
    if args.experiment:
        try:
            record["experiment"] = experiment(budget_s=args.budget)
        except Exception as e:  # noqa: BLE001  (the benchmark above is kept)
            import traceback; traceback.print_exc()
            record["experiment_error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(record.get("experiment", {}).get("accuracy", {}), indent=1))
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
