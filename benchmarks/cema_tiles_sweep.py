"""How the CEMA kernels' tiles and segments were chosen (issue #15, nbs/11a_cema.ipynb, "Speed"): the kernel with
(time, state, channel) tiles over its launch settings, beside the kernel of 8f9929b ((time, channel, state) tiles,
four warps a program) in the same process, on one GPU. Times are GPU ms of a call replayed from a CUDA graph
(`tinylab.core.cuda_graph_ms`, no launch cost); every point is first checked against the old kernel's output.
- part "tiles": tile shapes (steps, channels, warps) x segment counts at batch 4, D 1024, N 16, T 1K to 64K, fp32
  and bf16, and the training forward (it keeps the states the backward reads, which fix 16 steps);
- part "waves": the landed tiles' time against the segment count at six (batch, channels, length) shapes;
- part "backward": forward + backward through autograd (`triton.testing.do_bench`, median) against the backward's
  warps.
The old kernel is read from benchmarks/_cema_old_tiles.py:
`git show 8f9929b:tinylab/kernels/cema.py > benchmarks/_cema_old_tiles.py` (send it along to the GPU machine).
Usage: PYTHONPATH=. python3 benchmarks/cema_tiles_sweep.py --out book/results/cema_tiles_h200.json"""
import argparse
import contextlib
import datetime
import json
import os
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import tinylab.kernels.cema as m
from tinylab.core import cuda_graph_ms

from bench_cema_segments import load_kernel_copy  # noqa: E402  (benchmarks/: this script's folder is on the path)

TILES = [(8, 8, 1), (16, 8, 1), (32, 8, 1), (16, 16, 1), (16, 32, 1), (8, 64, 2), (8, 128, 4)]  # (steps, channels, warps)
TILE_CASES = [(1024, torch.float32, False), (8192, torch.float32, False), (65536, torch.float32, False),
              (8192, torch.bfloat16, False), (8192, torch.float32, True)]          # (T, dtype of x, keep states)
SEGMENTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
WAVE_SHAPES = [(4, 1024, 8192), (4, 1024, 65536), (1, 1024, 8192), (8, 2048, 4096), (2, 1024, 2048), (1, 512, 32768)]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def graph_ms(fn, elements):
    return cuda_graph_ms(fn, calls=20 if elements <= 4 * 1024 * 8192 else 5)


@contextlib.contextmanager
def launch(bt, bd, nw):
    "The forward in (bt steps, bd channels) tiles and nw warps; the landed tiles and TUNING come back after, error or not."
    blocks, landed = m._cema_blocks, dict(m.TUNING)
    m._cema_blocks = lambda T_, D_, N_, on_gpu: (bt, bd, triton.next_power_of_2(N_))
    m.TUNING.update(block_d=bd, num_warps=nw)
    try:
        yield
    finally:
        m._cema_blocks = blocks
        m.TUNING.clear(); m.TUNING.update(landed)


def segment_curve(old, B, D, T, dtype, save, bt, bd, nw, sms):
    "Old kernel's ms, and ours at each segment count that fits one GPU (segments of at least 4 tiles)."
    p, q, g = (t.cuda() for t in m.random_cema_params(D, 16))
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", dtype=dtype)
    y_old = old._cema_forward(x, p, q, g, None, save_states=save)[0]
    row = dict(B=B, D=D, T=T, dtype=str(dtype).removeprefix("torch."), save=save, steps=bt, channels=bd, warps=nw,
               old_ms=graph_ms(lambda: old._cema_forward(x, p, q, g, None, save_states=save), x.numel()), ms={})
    tiles = triton.cdiv(T, bt)
    with launch(bt, bd, nw):
        for S in SEGMENTS:
            seg_len = triton.cdiv(tiles, S) * bt
            if (S > 1 and seg_len < 4 * bt) or B * triton.cdiv(D, bd) * S > sms * 64 // nw:
                continue
            seg = (triton.cdiv(T, seg_len), seg_len)
            fn = lambda: m._cema_forward(x, p, q, g, None, save_states=save, segments=seg)
            err = rel(fn()[0], y_old)
            row["ms"][seg[0]] = graph_ms(fn, x.numel()) if err < (3e-2 if dtype == torch.bfloat16 else 2e-4) else f"error {err:.1e}"
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    old = load_kernel_copy("_cema_old_tiles", "8f9929b")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    landed = dict(m.TUNING)
    rec = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/cema_tiles_sweep.py", sms=sms,
               old_kernel="benchmarks/_cema_old_tiles.py (tinylab/kernels/cema.py at 8f9929b)", tuning=landed,
               timing="GPU ms of one call from a CUDA graph (tinylab.core.cuda_graph_ms); backward: do_bench median of "
                      "forward + backward through autograd", tiles=[], waves=[], backward={})
    for T, dtype, save in TILE_CASES:
        for bt, bd, nw in TILES:
            if not save or bt == 16:
                rec["tiles"].append(segment_curve(old, 4, 1024, T, dtype, save, bt, bd, nw, sms))
    for B, D, T in WAVE_SHAPES:
        rec["waves"].append(segment_curve(old, B, D, T, torch.float32, False, 16, landed["block_d"], landed["num_warps"], sms))
    B, D, T = 4, 1024, 8192
    p, q, g = (t.cuda() for t in m.random_cema_params(D, 16))
    torch.manual_seed(0)
    x, dy = torch.randn(B, T, D, device="cuda"), torch.randn(B, T, D, device="cuda")
    def fwd_bwd(mod):
        ins = [t.detach().clone().requires_grad_() for t in (x, p, q, g)]
        return torch.autograd.grad(mod.CEMAFunction.apply(*ins, None)[0], ins, dy)
    ref = fwd_bwd(old)
    rec["backward"] = dict(B=B, D=D, T=T, old_ms=do_bench(lambda: fwd_bwd(old), return_mode="median"), warps={})
    try:
        for nw in (1, 2, 4):
            m.TUNING["bwd_num_warps"] = nw
            err = max(rel(a, b) for a, b in zip(fwd_bwd(m), ref))
            rec["backward"]["warps"][nw] = do_bench(lambda: fwd_bwd(m), return_mode="median") if err < 1e-3 else f"error {err:.1e}"
    finally:
        m.TUNING.update(landed)
    print(json.dumps(rec["backward"]), flush=True)
    rec["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
