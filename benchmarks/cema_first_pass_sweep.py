"""How the CEMA first pass's launch was chosen (issue #15, nbs/11a_cema.ipynb, "Speed"): `cema_seg_end_kernel` alone
over its tiles (steps, channels, warps) and with x loaded one chunk ahead or not (`AHEAD`), for fp32 and bf16 x, at the
segments the forward chooses, on one GPU. Every point is first checked against the end states of the landed launch
(`TUNING["first_pass"]`), then timed as GPU ms of one launch replayed from a CUDA graph (`tinylab.core.cuda_graph_ms`).
Then, per dtype, the whole forward (`_cema_forward`) with the landed first pass against the one fastest over the shapes
(geometric mean), alternating for `--rounds` rounds.
Usage: PYTHONPATH=. python3 benchmarks/cema_first_pass_sweep.py --out book/results/cema_first_pass_h200.json"""
import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

import tinylab.kernels.cema as m
from tinylab.core import cuda_graph_ms

SHAPES = [(4, 1024, 8192), (4, 1024, 65536), (1, 1024, 8192), (2, 2048, 4096), (4, 1024, 2048)]   # (B, D, T), each with a first pass
CONFIGS = [(bt, bd, nw, ahead) for bt in (8, 16) for bd in (8, 16, 32) for nw in (1, 2) for ahead in (False, True)]
DTYPES = {4: torch.float32, 2: torch.bfloat16}   # TUNING["first_pass"]'s keys: x's bytes per element


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def first_pass(x, p, q, config):
    "The first pass alone at the forward's segments, with `config` = (BLOCK_T, BLOCK_D, warps, AHEAD): launch, end states."
    B, T, D = x.shape
    N = p.shape[1]
    BT, BD, BN = m._fwd_blocks(T, D, N, True)
    S, seg_len = m._cema_segments(B, T, triton.cdiv(D, BD), BT, x.device)
    bt, bd, nw, ahead = config
    qr = torch.view_as_real(q.contiguous())
    end = torch.empty(B, S - 1, D, N, 2, device=x.device)
    launch = lambda: m.cema_seg_end_kernel[(B, triton.cdiv(D, bd), S - 1)](
        x, p, qr, end, T, D, N, seg_len, ACC=tl.float32, BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=BN, AHEAD=ahead, num_warps=nw)
    return launch, end


@contextlib.contextmanager
def first_pass_choice(elt, config):
    "TUNING['first_pass'] with `config` for x of `elt` bytes an element; the landed entry comes back after, error or not."
    landed = dict(m.TUNING["first_pass"])
    m.TUNING["first_pass"] = {**landed, elt: config}
    try:
        yield
    finally:
        m.TUNING["first_pass"] = landed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    landed = dict(m.TUNING["first_pass"])
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/cema_first_pass_sweep.py",
               tuning=dict(m.TUNING), timing="GPU ms of one launch (or call) replayed from a CUDA graph "
               "(tinylab.core.cuda_graph_ms)", rows=[], calls=[])
    p, q, g = (t.cuda() for t in m.random_cema_params(1024, 16))
    p2, q2, g2 = (t.cuda() for t in m.random_cema_params(2048, 16))
    for elt, dtype in DTYPES.items():
        for B, D, T in SHAPES:
            pp, qq = (p, q) if D == 1024 else (p2, q2)
            torch.manual_seed(0)
            x = torch.randn(B, T, D, device="cuda", dtype=dtype)
            launch, end = first_pass(x, pp, qq, landed[elt])
            launch()
            reference = end.clone()
            for config in CONFIGS:
                launch, end = first_pass(x, pp, qq, config)
                launch()
                row = dict(B=B, D=D, T=T, dtype=str(dtype).removeprefix("torch."), config=list(config),
                           end_relerr=rel(end, reference))
                if row["end_relerr"] < 1e-4:
                    row["ms"] = cuda_graph_ms(launch, calls=20 if x.numel() <= 4 * 1024 * 8192 else 5)
                print(json.dumps(row), flush=True)
                rec["rows"].append(row)
            del x
    best = {}
    for elt, dtype in DTYPES.items():
        name = str(dtype).removeprefix("torch.")
        base = {(r["B"], r["D"], r["T"]): r["ms"] for r in rec["rows"]
                if r["dtype"] == name and tuple(r["config"]) == tuple(landed[elt])}
        score = {}
        for config in CONFIGS:
            ratios = [r["ms"] / base[(r["B"], r["D"], r["T"])] for r in rec["rows"]
                      if r["dtype"] == name and tuple(r["config"]) == config and "ms" in r]
            if len(ratios) == len(SHAPES):
                score[config] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        best[elt] = min(score, key=score.get)
        rec.setdefault("geomean_vs_landed", {})[name] = {str(list(c)): round(s, 4) for c, s in sorted(score.items(), key=lambda i: i[1])}
        print(f"{name}: best first pass {best[elt]} at {score[best[elt]]:.3f}x the landed one", flush=True)
    rec["best"] = {str(DTYPES[e]).removeprefix("torch."): list(c) for e, c in best.items()}
    # the whole forward with the landed first pass and with the best one
    for elt, dtype in DTYPES.items():
        for B, D, T in SHAPES:
            pp, qq, gg = (p, q, g) if D == 1024 else (p2, q2, g2)
            torch.manual_seed(0)
            x = torch.randn(B, T, D, device="cuda", dtype=dtype)
            choices = {"landed": landed[elt], "best": best[elt]}
            forward = lambda: m._cema_forward(x, pp, qq, gg, None, save_states=False)
            ys = {}
            for choice, config in choices.items():
                with first_pass_choice(elt, config):
                    ys[choice] = forward()[0]
            row = dict(B=B, D=D, T=T, dtype=str(dtype).removeprefix("torch."), y_relerr=rel(ys["best"], ys["landed"]),
                       ms={c: [] for c in choices})
            for _ in range(args.rounds):
                for choice, config in choices.items():
                    with first_pass_choice(elt, config):   # set while the graph is captured
                        row["ms"][choice].append(cuda_graph_ms(forward, calls=20 if x.numel() <= 4 * 1024 * 8192 else 5))
            row["ratio"] = statistics.median(row["ms"]["best"]) / statistics.median(row["ms"]["landed"])
            print(json.dumps(row), flush=True)
            rec["calls"].append(row)
            del x
    rec["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
