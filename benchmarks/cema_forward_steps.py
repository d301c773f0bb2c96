"""How the CEMA forward's steps per tile were chosen for calls that keep no states (issue #15, nbs/11a_cema.ipynb,
"Speed"): the whole forward (`_cema_forward`, no states kept) with 16 and with 32 steps per tile (TUNING["forward_steps"]),
fp32 and bf16 x, at six shapes, on one GPU; each point first checked against the 16-step output, then timed as GPU ms
of one call replayed from a CUDA graph (`tinylab.core.cuda_graph_ms`), the two alternating for `--rounds` rounds.
A dtype takes 32 steps where its geometric mean over the shapes is below 0.98x and no shape is above 1.02x;
`--best-out` gets that choice as JSON for `bench_megalodon.py --cema-tuning`.
Usage: PYTHONPATH=. python3 benchmarks/cema_forward_steps.py --out book/results/cema_forward_steps_h200.json"""
import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import triton

import tinylab.kernels.cema as m
from tinylab.core import cuda_graph_ms

SHAPES = [(4, 1024, 8192), (4, 1024, 65536), (1, 1024, 8192), (2, 2048, 4096), (4, 1024, 2048), (4, 1024, 1024)]
DTYPES = {4: torch.float32, 2: torch.bfloat16}   # TUNING["forward_steps"]'s keys: x's bytes per element
STEPS = (16, 32)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--best-out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    landed = dict(m.TUNING["forward_steps"])
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/cema_forward_steps.py", tuning=dict(m.TUNING),
               timing="GPU ms of one call from a CUDA graph (tinylab.core.cuda_graph_ms), steps alternating", rows=[])
    params = {D: tuple(t.cuda() for t in m.random_cema_params(D, 16)) for D in {s[1] for s in SHAPES}}
    for elt, dtype in DTYPES.items():
        for B, D, T in SHAPES:
            p, q, g = params[D]
            torch.manual_seed(0)
            x = torch.randn(B, T, D, device="cuda", dtype=dtype)
            def call(steps):
                m.TUNING["forward_steps"] = {**landed, elt: steps}
                try:
                    return m._cema_forward(x, p, q, g, None, save_states=False)
                finally:
                    m.TUNING["forward_steps"] = dict(landed)
            outs = {s: call(s) for s in STEPS}
            row = dict(B=B, D=D, T=T, dtype=str(dtype).removeprefix("torch."),
                       y_relerr=rel(outs[32][0], outs[16][0]), hT_relerr=rel(torch.view_as_real(outs[32][1]), torch.view_as_real(outs[16][1])),
                       segments={s: m._cema_segments(B, T, triton.cdiv(D, m.TUNING["block_d"]), s, x.device)[0] for s in STEPS},
                       ms={s: [] for s in STEPS})
            if max(row["y_relerr"], row["hT_relerr"]) < (3e-2 if dtype == torch.bfloat16 else 2e-4):
                for _ in range(args.rounds):
                    for s in STEPS:
                        row["ms"][s].append(cuda_graph_ms(lambda s=s: call(s), calls=20 if x.numel() <= 4 * 1024 * 8192 else 5))
                row["ratio"] = statistics.median(row["ms"][32]) / statistics.median(row["ms"][16])
            print(json.dumps(row), flush=True)
            rec["rows"].append(row)
            del x
    best = {}
    for elt, dtype in DTYPES.items():
        ratios = [r["ratio"] for r in rec["rows"] if r["dtype"] == str(dtype).removeprefix("torch.") and "ratio" in r]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if len(ratios) == len(SHAPES) else float("nan")
        best[elt] = 32 if geo < 0.98 and max(ratios) <= 1.02 else 16
        rec.setdefault("geomean_32_over_16", {})[str(dtype).removeprefix("torch.")] = geo
        print(f"{dtype}: 32 / 16 steps, geometric mean {geo:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}: {best[elt]} steps", flush=True)
    rec["best"] = {"forward_steps": best}
    rec["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    if args.best_out:
        Path(args.best_out).write_text(json.dumps(rec["best"]))


if __name__ == "__main__":
    main()
