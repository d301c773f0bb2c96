"""Train the MoA chapter's text-to-image prior (nbs/40_moa.ipynb) at `gpu` scale and save it as a small safetensors
checkpoint (diffusers/transformers `save_pretrained`, one flat folder: no sub-folders) with its training scheduler and
provenance, for the chapter to load with `from_pretrained` from book/results/moa_prior/.

The model, data, scheduler (v-prediction) and training loop are the chapter's own (tinylab.moa: build_prior,
random_scenes, noise_schedulers, train_prior); the script needs torch, diffusers, transformers and numpy (plus triton,
imported by tinylab.kernels). Training stops after --time-limit seconds (counted from the script's start) and saves
what it has; --resume continues from the checkpoint in --out (a new learning-rate cycle). The git commit is read from
the environment variable TINYLAB_COMMIT (the GPU machine's copy of the repository has no usable git history).

GPU:   TINYLAB_COMMIT=<sha> PYTHONPATH=. python3 benchmarks/train_moa_prior.py --out $OUT
CPU:   PYTHONPATH=. python3 benchmarks/train_moa_prior.py --smoke --out /tmp/moa_prior_smoke"""
import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

from tinylab.moa import build_prior, load_prior, noise_schedulers, random_scenes, save_prior, train_prior

T0 = time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="book/results/moa_prior", help="flat folder for the checkpoint and provenance.json")
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps (the time limit usually stops first)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    p.add_argument("--text-dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--prediction", default="v_prediction", choices=("v_prediction", "epsilon"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=270.0, help="stop training this many seconds after the start")
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
        unet, te, ddpm, prov = load_prior(args.out)
        prev_steps = int(prov.get("steps", 0))
    else:
        unet, te = build_prior(args.size, tuple(args.channels), args.text_dim, args.heads, seed=args.seed)
        ddpm, _ = noise_schedulers(prediction_type=args.prediction)
    unet.to(device); te.to(device)
    print(f"{device}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M UNet parameters, {args.scenes} scenes, "
          f"batch {args.batch}, {ddpm.config.prediction_type}, at most {args.steps} steps or {args.time_limit:.0f} s", flush=True)

    # warm-up (CUDA initialisation, kernel selection) at a tenth of the learning rate, then a timed probe; the main run
    # (one learning-rate cycle) takes as many steps as fit in what is left of the time limit
    losses, t_train = [], time.perf_counter()
    # (train_prior's OneCycleLR cannot take exactly 10 steps: its 10% warm-up would be one step long, a zero division)
    losses += train_prior(unet, te, ddpm, data, min(20, args.steps), args.batch, args.lr * 0.1, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_probe, n_probe = time.perf_counter(), min(20, args.steps - len(losses))
    if n_probe > 0:
        losses += train_prior(unet, te, ddpm, data, n_probe, args.batch, args.lr * 0.1, args.seed + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    else:                                                                # --smoke: the warm-up was every step
        t_probe, n_probe = t_train, len(losses)
    per_step = (time.perf_counter() - t_probe) / n_probe
    left = args.time_limit - (time.perf_counter() - T0) - 15.0          # keep 15 s for saving
    chunk = max(0, min(args.steps - len(losses), int(left / max(per_step, 1e-6))))
    chunk = chunk if chunk >= 20 else 0                                  # too little time left: save what we have
    print(f"{per_step * 1e3:.1f} ms per step; main run {chunk} steps", flush=True)
    if chunk > 0:
        losses += train_prior(unet, te, ddpm, data, chunk, args.batch, args.lr, args.seed + 2)
    seconds = time.perf_counter() - t_train
    steps_done = len(losses)
    final = float(np.mean(losses[-100:]))
    prov = dict(script="benchmarks/train_moa_prior.py", commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args=vars(args),
                steps=prev_steps + steps_done, steps_this_run=steps_done, prediction_type=ddpm.config.prediction_type,
                final_loss=final, first_loss=float(np.mean(losses[:10])), ms_per_step=round(per_step * 1e3, 2),
                seconds=round(seconds, 1), device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                torch=torch.__version__, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                stopped_early=steps_done < args.steps, resumed_from=prev_steps if args.resume else None,
                losses_every_100=[round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)])
    try:
        import diffusers, transformers
        prov.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    save_prior(args.out, unet.cpu(), te.cpu(), ddpm, prov)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(json.dumps({k: prov[k] for k in ("steps", "final_loss", "seconds", "device", "stopped_early")}),
          f"saved {size / 1e6:.1f} MB to {args.out}: {sorted(os.listdir(args.out))}", flush=True)
    return prov


if __name__ == "__main__":
    main()
