"""Why the MoA chapter's first GPU prior (noise-prediction, commit 055f195's book/results/moa_prior/, in that
commit's layout: unet/, text_encoder/) failed the chapter's quality gate: CPU experiments, written as JSON.

1. The gate's scene reader (tinylab.moa.read_scene) on true scenes (must be right) and on noise (must be at chance).
2. The gate on the prior's DDIM samples for several samplers: timestep spacing ("leading", diffusers' default then,
   and "trailing", from the last training step), DDIM steps, guidance scale.
3. The prior's one-step image estimate x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) on noised true scenes,
   read by the same reader, per timestep t: where along the trajectory the prior's estimate stops being readable.

CPU:   PYTHONPATH=. python3 benchmarks/moa_prior_investigation.py --prior /path/to/old/moa_prior --out book/results/moa_prior_eps_investigation.json"""
import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from tinylab.moa import (BACKGROUNDS, POSITIONS, SHAPES, encode_captions, guided, null_ids, prior_pred, random_scenes,
                         read_scene, sample)
from diffusers import DDIMScheduler


def prompts(n, rng):
    out = []
    for i in range(n):
        bg, pos = list(BACKGROUNDS)[i % 4], POSITIONS[(i // 4 + i) % 4]
        col = ["red", "yellow", "magenta", "black"][int(rng.integers(4))]
        out.append(dict(caption=f"{col} {SHAPES[int(rng.integers(4))]} {pos} {bg}", background=bg, position=pos))
    return out


def reads(imgs, labels):
    r = [read_scene(im) for im in imgs]
    return (float(np.mean([a[0] == l["background"] for a, l in zip(r, labels)])),
            float(np.mean([a[1] == l["position"] for a, l in zip(r, labels)])))


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="folder with unet/ and text_encoder/ (the epsilon prior)")
    p.add_argument("--out", default="book/results/moa_prior_eps_investigation.json")
    p.add_argument("--n", type=int, default=32, help="prompts (and true scenes) per measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = Path(args.prior)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    te = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    prov = json.loads((folder / "provenance.json").read_text())
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    size = unet.config.sample_size
    rec = dict(prior=dict(folder="book/results/moa_prior at commit 055f195", prediction_type="epsilon",
                          **{k: prov.get(k) for k in ("steps", "final_loss", "device", "commit")}, batch=prov["args"]["batch"]))
    truth = random_scenes(200, size, np.random.default_rng(5))
    noise = torch.randn(200, 3, size, size, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    rec["reader"] = dict(true_scenes=reads(truth.images, truth.labels), noise=reads(noise, truth.labels), n=200)
    ps = prompts(args.n, np.random.default_rng(1))
    ctx = te(encode_captions([q["caption"] for q in ps])).last_hidden_state
    null = te(null_ids(len(ps))).last_hidden_state
    rows = []
    for spacing in ("leading", "trailing"):
        ddim = DDIMScheduler.from_config(ddpm.config, clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing)
        for steps in (6, 20, 50):
            for g in (1.0, 3.0):
                den = lambda x, t: guided(prior_pred(unet, x, t, ctx), prior_pred(unet, x, t, null), g)
                bg, pos = reads(sample(den, len(ps), size, ddim, steps, 10_000), ps)
                ddim.set_timesteps(steps)
                rows.append(dict(spacing=spacing, steps=steps, first_t=int(ddim.timesteps[0]), guidance=g, background=bg, position=pos))
                print(rows[-1], flush=True)
    rec["gate"] = rows
    data = random_scenes(256, size, np.random.default_rng(7))
    c_true = te(data.ids).last_hidden_state
    gen, est = torch.Generator().manual_seed(0), []
    for t in (999, 980, 950, 900, 800, 600, 300):
        eps = torch.randn(data.images.shape, generator=gen)
        tt = torch.full((len(eps),), t)
        xt = ddpm.add_noise(data.images, eps, tt)
        eps_hat = prior_pred(unet, xt, tt, c_true)
        ab = ddpm.alphas_cumprod[t]
        x0 = ((xt - (1 - ab).sqrt() * eps_hat) / ab.sqrt()).clamp(-1, 1)
        bg, pos = reads(x0, data.labels)
        est.append(dict(t=t, sqrt_abar=float(ab.sqrt()), eps_mse=float(((eps_hat - eps) ** 2).mean()),
                        x0_mse=float(((x0 - data.images) ** 2).mean()), background=bg, position=pos))
        print(est[-1], flush=True)
    rec["x0_estimate"] = est
    rec.update(script="benchmarks/moa_prior_investigation.py", device="CPU", torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), seconds=round(time.perf_counter() - t0, 1))
    Path(args.out).write_text(json.dumps(rec, indent=1))
    return rec


if __name__ == "__main__":
    main()
