"""The MoA chapter's background leak (nbs/40_moa.ipynb, "What differs from the paper"): on the recorded prior, train
MoA at the chapter's `book` settings three ways and measure, against the prior's own image for the same seed and
prompt, the background drift of DDIM samples and the prediction error outside and inside the subject's box:

- "paper": masked diffusion loss + router loss (weight 1), the chapter's MoA;
- "router x10": the router loss ten times heavier;
- "+ background loss": the paper's loss plus the diffusion loss outside the box (a departure from the paper).

CPU:   PYTHONPATH=. python3 benchmarks/moa_leak_experiment.py --prior book/results/moa_prior --out book/results/moa_leak_experiment.json
       (--smoke: a few steps, for the tests)"""
import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from tinylab.moa import (MoA, ddim_for, diffusion_batch, guided, load_prior, masked_diffusion_loss, null_ids, prior_pred,
                         random_scenes, router_loss, sample, subject_refs)


def train(moa, te, ddpm, data, subjects, steps, batch, lr, router_w, background_w, seed=0):
    "The chapter's train_moa, with an optional diffusion loss outside the box (weight background_w)."
    opt = torch.optim.AdamW(moa.trainable_parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    moa.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.images), (batch,), generator=gen)
        x0, mask = data.images[idx], data.masks[idx]
        refs = subject_refs(subjects, [data.labels[int(i)]["subject"] for i in idx], x0.shape[-1] // 2)
        xt, target, t = diffusion_batch(ddpm, x0, gen)
        with torch.no_grad():
            text = te(data.ids[idx]).last_hidden_state
        pred = moa(xt, t, text, refs, record=True)
        loss = masked_diffusion_loss(pred, target, mask) + router_w * router_loss(moa.state.maps, mask)
        if background_w:
            loss = loss + background_w * masked_diffusion_loss(pred, target, 1 - mask)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(moa.trainable_parameters(), 1.0); opt.step()
    moa.eval()


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default="book/results/moa_prior")
    p.add_argument("--out", default="book/results/moa_leak_experiment.json")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n", type=int, default=24, help="evaluation images")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.n, args.ddim_steps = 2, 4, 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    unet, te, ddpm, prov = load_prior(args.prior)
    ddim, size = ddim_for(ddpm), unet.config.sample_size
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    train_subjects, test_subjects = digits.images[order[:60]], digits.images[order[100:110]]
    data = random_scenes(2000 if not args.smoke else 64, size, np.random.default_rng(1), subjects=train_subjects)
    ev = random_scenes(args.n, size, np.random.default_rng(2), subjects=test_subjects)
    ctx, null = te(ev.ids).last_hidden_state, te(null_ids(args.n)).last_hidden_state
    refs = subject_refs(test_subjects, [l["subject"] for l in ev.labels], size // 2)
    prior_imgs = sample(lambda x, t: guided(prior_pred(unet, x, t, ctx), prior_pred(unet, x, t, null), args.guidance),
                        args.n, size, ddim, args.ddim_steps, 0)
    out_mask = 1 - ev.masks
    chk = random_scenes(128 if not args.smoke else 8, size, np.random.default_rng(3), subjects=train_subjects)
    xt, target, t = diffusion_batch(ddpm, chk.images, torch.Generator().manual_seed(3))
    chk_text = te(chk.ids).last_hidden_state
    chk_refs = subject_refs(train_subjects, [l["subject"] for l in chk.labels], size // 2)

    def errors(pred):
        return dict(outside=masked_diffusion_loss(pred, target, 1 - chk.masks).item(),
                    inside=masked_diffusion_loss(pred, target, chk.masks).item())

    rows = [dict(variant="prior", drift=0.0, **errors(prior_pred(unet, xt, t, chk_text)))]
    for name, rw, bw in (("paper", 1.0, 0.0), ("router x10", 10.0, 0.0), ("+ background loss", 1.0, 1.0)):
        moa = MoA(unet, te.config.hidden_size)
        with torch.enable_grad():
            train(moa, te, ddpm, data, train_subjects, args.steps, 32, 5e-4, rw, bw)
        imgs = sample(lambda x, t_: guided(moa(x, t_, ctx, refs), prior_pred(unet, x, t_, null), args.guidance),
                      args.n, size, ddim, args.ddim_steps, 0)
        drift = (((imgs - prior_imgs).abs() * out_mask).sum((1, 2, 3)) / (out_mask.sum((1, 2, 3)) * 3)).mean().item()
        k = min(16, len(chk.images))
        moa(chk.images[:k], torch.full((k,), 500), chk_text[:k], chk_refs[:k], record=True)
        w_out = float(np.mean([((1 - m) * w).sum().item() / (1 - m).sum().item() for w in moa.state.maps.values()
                               for m in [torch.nn.functional.adaptive_avg_pool2d(chk.masks[:k], int(w.shape[1] ** 0.5)).flatten(1)]]))
        rows.append(dict(variant=name, router_weight=rw, background_weight=bw, drift=drift, router_outside=w_out,
                         **errors(moa(xt, t, chk_text, chk_refs))))
        print(rows[-1], flush=True)
    rec = dict(rows=rows, args=vars(args), prior=dict(folder=args.prior, **{k: prov.get(k) for k in ("steps", "device", "commit")}),
               script="benchmarks/moa_leak_experiment.py", device="CPU", torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               seconds=round(time.perf_counter() - t0, 1))
    Path(args.out).write_text(json.dumps(rec, indent=1))
    return rec


if __name__ == "__main__":
    main()
