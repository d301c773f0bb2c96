"""The CEMA forward against an earlier version of itself, in one process on one GPU (issue #15, nbs/11a_cema.ipynb,
"Speed"). Both run with their own launch choices (`_cema_forward`, no forced segments); every case is first checked
against the earlier kernel's y and h_T, then timed as GPU ms of one call replayed from a CUDA graph
(`tinylab.core.cuda_graph_ms`, no launch cost), the two versions alternating for `--rounds` rounds so that the
spread between rounds of the same version shows the noise. At batch 4, 1024 channels and 8192 steps each version's two
passes (segment ends, then the forward) are also timed alone.
The earlier kernel is read from a file: `git show <commit>:tinylab/kernels/cema.py > benchmarks/_cema_previous.py`
(send it along to the GPU machine; it is git-ignored).
Usage: PYTHONPATH=. python3 benchmarks/cema_against_previous.py --previous-commit <commit> --out book/results/<name>.json"""
import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

import tinylab.kernels.cema as landed
from tinylab.core import cuda_graph_ms

from bench_cema_segments import load_kernel_copy  # noqa: E402  (benchmarks/: this script's folder is on the path)

# (batch, channels, steps, dtype of x, keep the states for the backward); 8190 steps end in a partial tile
CASES = [(4, 1024, 1024, torch.float32, False), (4, 1024, 8192, torch.float32, False), (4, 1024, 65536, torch.float32, False),
         (4, 1024, 8192, torch.bfloat16, False), (4, 1024, 8192, torch.float32, True), (4, 1024, 8190, torch.float32, False),
         (1, 1024, 8192, torch.float32, False), (8, 2048, 4096, torch.float32, False),
         (4, 1024, 1024, torch.bfloat16, False), (4, 1024, 65536, torch.bfloat16, False), (1, 1024, 8192, torch.bfloat16, False),
         (8, 2048, 4096, torch.bfloat16, False)]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def passes_ms(mod, x, p, q, g) -> dict:
    "GPU ms of each pass of `mod`'s forward alone, at its own launch choices: the first (segment ends) and the forward."
    B, T, D = x.shape
    N = p.shape[1]
    BT, BD, BN = mod._fwd_blocks(T, D, N, True)
    S, seg_len = mod._cema_segments(B, T, triton.cdiv(D, BD), BT, x.device)
    qr, gr = torch.view_as_real(q.contiguous()), torch.view_as_real(g.contiguous())
    y, hT = torch.empty_like(x), torch.empty(B, D, N, 2, device=x.device)
    end = torch.empty(B, max(S - 1, 1), D, N, 2, device=x.device)
    blocks = dict(ACC=tl.float32, BLOCK_T=BT, BLOCK_D=BD, BLOCK_N=BN, num_warps=mod.TUNING["num_warps"])
    first_blocks, BD1 = dict(blocks), BD
    if hasattr(mod, "_first_pass_launch"):   # the first pass's own launch (from 8f4d44e on)
        BT1, BD1, nw1, ahead = mod._first_pass_launch(x, BT, BD, blocks["num_warps"])
        first_blocks.update(BLOCK_T=BT1, BLOCK_D=BD1, num_warps=nw1, AHEAD=ahead)
    first = lambda: mod.cema_seg_end_kernel[(B, triton.cdiv(D, BD1), S - 1)](x, p, qr, end, T, D, N, seg_len, **first_blocks)
    forward = lambda: mod.cema_fwd_kernel[(B, triton.cdiv(D, BD), S)](
        x, p, qr, gr, hT, y, hT, hT, T, D, N, HAS_H0=False, SAVE_STATES=False, END=end, seg_len=seg_len, SEGMENTED=True,
        FOLD_STATE=bool(mod.TUNING["fold_state"]), **blocks)
    return dict(segments=S, first_pass_ms=cuda_graph_ms(first), forward_pass_ms=cuda_graph_ms(forward))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--previous-commit", required=True, help="the commit benchmarks/_cema_previous.py was taken from")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    previous = load_kernel_copy("_cema_previous", args.previous_commit)
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), previous_commit=args.previous_commit,
               script="benchmarks/cema_against_previous.py", tuning=dict(landed.TUNING),
               timing=f"GPU ms of one call from a CUDA graph (tinylab.core.cuda_graph_ms); the two versions alternate for "
                      f"{args.rounds} rounds", rows=[])
    for B, D, T, dtype, save in CASES:
        p, q, g = (t.cuda() for t in landed.random_cema_params(D, 16))
        torch.manual_seed(0)
        x = torch.randn(B, T, D, device="cuda", dtype=dtype)
        calls = {name: (lambda mod=mod: mod._cema_forward(x, p, q, g, None, save_states=save))
                 for name, mod in (("previous", previous), ("landed", landed))}
        (y0, h0, _), (y1, h1, _) = calls["previous"](), calls["landed"]()
        row = dict(B=B, D=D, T=T, dtype=str(dtype).removeprefix("torch."), save=save,
                   y_relerr=rel(y1, y0), hT_relerr=rel(torch.view_as_real(h1), torch.view_as_real(h0)),
                   ms={"previous": [], "landed": []})
        if max(row["y_relerr"], row["hT_relerr"]) < (3e-2 if dtype == torch.bfloat16 else 2e-4):
            n = 20 if x.numel() <= 4 * 1024 * 8192 else 5
            for _ in range(args.rounds):
                for name, fn in calls.items():
                    row["ms"][name].append(cuda_graph_ms(fn, calls=n))
            row["ratio"] = statistics.median(row["ms"]["landed"]) / statistics.median(row["ms"]["previous"])
        if (B, D, T, save) == (4, 1024, 8192, False):   # where the time goes: each pass alone
            row["passes"] = {name: passes_ms(mod, x, p, q, g) for name, mod in (("previous", previous), ("landed", landed))}
        print(json.dumps(row), flush=True)
        rec["rows"].append(row)
    rec["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    for r in rec["rows"]:
        print(f"B{r['B']} D{r['D']} T{r['T']} {r['dtype']} save={r['save']}: previous {min(r['ms']['previous'], default=0):.4f}-"
              f"{max(r['ms']['previous'], default=0):.4f} ms, landed {min(r['ms']['landed'], default=0):.4f}-"
              f"{max(r['ms']['landed'], default=0):.4f} ms, ratio {r.get('ratio', float('nan')):.3f}, err {r['y_relerr']:.1e}")


if __name__ == "__main__":
    main()
