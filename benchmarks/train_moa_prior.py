"""Train the MoA chapter's text-to-image prior (nbs/40_moa.ipynb) at `gpu` scale and save it as a small safetensors
checkpoint (diffusers/transformers `save_pretrained`) with its provenance, for the chapter to load with
`from_pretrained` from book/results/moa_prior/.

The model and data are the chapter's own (tinylab.moa: build_prior, random_scenes, train_prior); the script needs
torch, diffusers, transformers and numpy (plus triton, imported by tinylab.kernels). It stops at --time-limit
seconds and saves what it has; --resume continues from the checkpoint in --out (a new learning-rate cycle).

GPU:   PYTHONPATH=. python3 benchmarks/train_moa_prior.py --out book/results/moa_prior
CPU:   PYTHONPATH=. python3 benchmarks/train_moa_prior.py --smoke --out /tmp/moa_prior_smoke"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from tinylab.moa import build_prior, load_prior, noise_schedulers, random_scenes, save_prior, train_prior

T0 = time.perf_counter()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        head = out.stdout.strip() or "unknown (no git)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except Exception:  # no git on the machine, or not a checkout
        return os.environ.get("TINYLAB_COMMIT", "unknown")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="book/results/moa_prior", help="folder for unet/, text_encoder/, provenance.json")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    p.add_argument("--text-dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=450.0, help="stop training after this many seconds, then save")
    p.add_argument("--resume", action="store_true", help="start from the checkpoint in --out")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on a few scenes (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.scenes, args.time_limit = 3, 8, 64, 60.0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(args.seed)
    data = random_scenes(args.scenes, args.size, np.random.default_rng(args.seed))
    data.images, data.ids = data.images.to(device), data.ids.to(device)
    prev_steps = 0
    if args.resume:
        unet, te, prov = load_prior(args.out)
        prev_steps = int(prov.get("steps", 0))
    else:
        unet, te = build_prior(args.size, tuple(args.channels), args.text_dim, args.heads, seed=args.seed)
    unet.to(device); te.to(device)
    ddpm, _ = noise_schedulers()
    print(f"{device}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M UNet parameters, {args.scenes} scenes, "
          f"{args.steps} steps of batch {args.batch}", flush=True)

    # a short warm-up at a tenth of the learning rate measures the time per step; the main run (one learning-rate
    # cycle) then takes all the remaining steps, or as many as fit in the time limit
    losses, t_train = [], time.perf_counter()
    probe = train_prior(unet, te, ddpm, data, min(20, args.steps), args.batch, args.lr * 0.1, args.seed)  # warm-up, timing
    losses += probe
    per_step = (time.perf_counter() - t_train) / len(probe)
    budget = max(1, int((args.time_limit - (time.perf_counter() - T0)) / max(per_step, 1e-6)))
    chunk = max(1, min(args.steps - len(probe), budget))
    if chunk > 0 and args.steps > len(probe):
        losses += train_prior(unet, te, ddpm, data, chunk, args.batch, args.lr, args.seed + 1)
    seconds = time.perf_counter() - t_train
    steps_done = len(losses)
    final = float(np.mean(losses[-100:]))
    prov = dict(script="benchmarks/train_moa_prior.py", commit=commit(), args=vars(args), steps=prev_steps + steps_done,
                steps_this_run=steps_done, final_loss=final, first_loss=float(np.mean(losses[:10])),
                seconds=round(seconds, 1), device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                torch=torch.__version__, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                stopped_early=steps_done < args.steps, resumed_from=prev_steps if args.resume else None)
    try:
        import diffusers, transformers
        prov.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    save_prior(args.out, unet.cpu(), te.cpu(), prov)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(json.dumps({k: prov[k] for k in ("steps", "final_loss", "seconds", "device", "stopped_early")}),
          f"saved {size / 1e6:.1f} MB to {args.out}", flush=True)
    return prov


if __name__ == "__main__":
    main()
