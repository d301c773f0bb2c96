"""How much of the selective scan forward's time at small shapes is the host's (nbs/10a_selective_scan.ipynb, "On an
H200"): for our forward (default blocks, the split policy on) and mamba-ssm's CUDA forward, `triton.testing.do_bench` of
one call as a user makes it against the GPU time of the same call replayed from a CUDA graph (no launch or Python cost).
Needs a GPU and mamba-ssm's build (.baselines/mamba_ss_bwd, see benchmarks/prep_mamba_ss_bwd.sh).
Usage: PYTHONPATH=. python3 benchmarks/scan_host_time.py OUT.json"""
import datetime
import json
import os
import sys

import torch
import triton

import tinylab.kernels.selective_scan as ss
from tinylab.core import cuda_graph_ms

TIMING = ("bench: triton.testing.do_bench (median) of one call as a user makes it, host work included when the GPU "
          "waits for it; graph: GPU time of one call replayed from a CUDA graph of 20 (tinylab.core.cuda_graph_ms)")
SHAPES = [(2, 1024, 1024), (2, 4096, 1024), (1, 2048, 1536), (4, 2048, 1536)]   # (batch, T, D); N = 16


def main(out):
    sys.path.insert(0, ".baselines/mamba_ss_bwd")
    from build import build
    ext = build()
    rows = []
    for b, T, D in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            kw = ss.random_inputs(b, T, D, 16, dtype=dtype, device="cuda")
            args = list(kw.values())
            ours = lambda: ss.selective_scan_triton(*args)
            ours()
            torch.cuda.synchronize()
            um, dm = kw["u"].transpose(1, 2).contiguous(), kw["delta"].transpose(1, 2).contiguous()
            Bm, Cm = (kw[k].transpose(1, 2).unsqueeze(1).contiguous() for k in ("B", "C"))
            mamba = lambda: ext.fwd(um, dm, kw["A"], Bm, Cm, kw["D"], None, None, False)
            row = dict(batch=b, T=T, D=D, dtype=str(dtype)[6:],
                       ours_bench=triton.testing.do_bench(ours, return_mode="median"), ours_graph=cuda_graph_ms(ours),
                       mamba_bench=triton.testing.do_bench(mamba, return_mode="median"), mamba_graph=cuda_graph_ms(mamba),
                       segments=ss._fwd_plan(b, D, T, False, kw["u"].device)[2])
            rows.append(row)
            print(row, flush=True)
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.date.today().isoformat(), commit=os.environ.get("TINYLAB_COMMIT", "unknown"),
               script="benchmarks/scan_host_time.py", timing=TIMING, rows=rows)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
