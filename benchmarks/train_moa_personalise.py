"""Personalise the MoA chapter's recorded prior (nbs/40_moa.ipynb, book/results/moa_prior/) at `gpu` scale and evaluate the
chapter's claim rows on the same prompts and seeds: MoA (the chapter's `train_moa`: masked diffusion loss plus router
loss), MoA with its routers initialised toward the prior (`--router-init`), and the baseline fine-tune of the whole
UNet (`train_finetune`), all on the same digit subjects, batches, learning rate and number of steps; evaluated on
held-out digits against the prior's own image for the same seed and prompt (background drift outside the subject's
quadrant, identity by a digit classifier inside it, router mass inside and outside the mask, subject swap).

Diagnosis variants: MoA whose routers start personalised-first (`moa_pers_init`, --router-init-pers), MoA with every
router replaced by the subject's box in training and sampling (`moa_box_routed`, `BoxRouting`), the router loss in the
paper's form (--router-form layer_mean); every MoA model is also sampled with every pixel sent to the personalised
experts and with the box as its router, and the one-step prediction error inside and outside the box is recorded.

The model, data, losses and samplers are the chapter's own (tinylab.moa); the evaluation helpers below follow the
chapter's cells (eval_prompts, extract_glyph/identity, drift). Training of each model stops at its share of
--time-limit (counted from the script's start); --resume continues from the personalised weights of an earlier run
(a .tar.gz written by this script: the optimiser starts afresh). The git commit is read from TINYLAB_COMMIT.

GPU:   TINYLAB_COMMIT=<sha> PYTHONPATH=.:/tmp/site python3 benchmarks/train_moa_personalise.py --out $OUT/moa
CPU:   PYTHONPATH=. python3 benchmarks/train_moa_personalise.py --smoke --out /tmp/moa_pers_smoke"""
import argparse
import datetime
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from tinylab.core import FAILS, HOLDS, INCONCLUSIVE, decide, paired_bootstrap
from tinylab.moa import (BACKGROUNDS, COLORS, MoA, FineTune, NOUN, POSITIONS, background_image, ddim_for, diffusion_batch,
                         glyph_mask, guided, layer_mask, load_prior, masked_diffusion_loss, null_ids, personalisation_batches,
                         prior_pred, quadrant_box, random_scenes, render_scene, sample, subject_refs, train_finetune, train_moa,
                         encode_captions)

ID_MARGIN = 0.1   # the chapter's: "the subject is present" = identity at least this above the prior's own image


def eval_prompts(n, noun, rng):
    "The chapter's evaluation prompts: backgrounds and positions cycled, random colours."
    out = []
    for i in range(n):
        bg, pos = list(BACKGROUNDS)[i % 4], POSITIONS[(i // 4 + i) % 4]
        col = ["red", "yellow", "magenta", "black"][int(rng.integers(4))]
        out.append(dict(caption=f"{col} {noun} {pos} {bg}", background=bg, position=pos, color=col))
    return out


def glyph_features(masks):
    return (F.adaptive_avg_pool2d(masks[:, None], 8).flatten(1) * 16).numpy()


def extract_glyph(img, p, size):
    q = size // 2
    r0, c0 = quadrant_box(p["position"], size)
    bgi = background_image(p["background"], size)[:, r0:r0 + q, c0:c0 + q]
    col = torch.tensor(COLORS[p["color"]]).view(3, 1, 1) * 2 - 1
    return ((img[:, r0:r0 + q, c0:c0 + q] - bgi).norm(dim=0) / (col - bgi).norm(dim=0).clamp_min(0.3)).clamp(0, 1)


def time_limited(deadline, counter):
    "A `progress` wrapper for the chapter's training loops: stops the loop at `deadline` (perf_counter seconds)."
    def wrap(r):
        for i in r:
            if time.perf_counter() >= deadline:
                return
            counter.append(i)
            yield i
    return wrap


class BoxRouting:
    """The 'moa_box_routed' diagnosis: every router of `moa` replaced by the subject's box (personalised weight 1 inside it,
    0 outside, at every layer), in training and in sampling. It solves the routing, so what remains is what the
    personalised experts and the multimodal prompt can draw. Set `.box` (B, 1, S, S) before each call."""
    def __init__(self, moa):
        self.box = None
        for r in moa.routers.values():
            r.forward = self

    def __call__(self, x):
        m = layer_mask(self.box, x.shape[1]).to(x)
        return torch.stack([1 - m, m], -1)


def train_box_routed(moa, routing, te, ddpm, data, subjects, steps, batch_size, lr, seed, progress):
    """`train_moa`'s loop (same batches for the same seed) with the routing fixed to the box: the masked diffusion loss
    alone trains the experts, image encoder and fusion (the router loss is zero by construction)."""
    params = [p for n, p in moa.named_parameters() if not n.startswith(("unet.", "routers."))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = []
    te.requires_grad_(False); moa.train()
    batches = personalisation_batches(te, ddpm, data, subjects, batch_size, torch.Generator().manual_seed(seed), params[0].device)
    for _, (xt, target, t, text, refs, mask) in zip(progress(range(steps)), batches):
        routing.box = mask
        loss = masked_diffusion_loss(moa(xt, t, text, refs), target, mask)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        log.append(dict(masked=loss.item(), router=0.0))
    moa.eval()
    return log


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(sd):
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sd.items()}, buf)
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default="book/results/moa_prior")
    p.add_argument("--out", default="/tmp/moa_personalise", help="folder for the JSON and the weights' .tar.gz")
    p.add_argument("--json-name", default="moa_personalise_h200.json")
    p.add_argument("--tar-name", default="moa_personalise_weights.tar.gz")
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps per model (time usually stops first)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--router-weight", type=float, default=1.0)
    p.add_argument("--router-form", default="per_layer", choices=["per_layer", "layer_mean"],
                   help="the router loss's form (tinylab.moa.router_loss): ours, or the paper's (square of the layers' mean)")
    p.add_argument("--router-lr-mult", type=float, default=10.0,
                   help="the 'moa_fast_router' variant: routers from 1/2, learning at this multiple of --lr")
    p.add_argument("--router-init-pers", type=float, default=3.0,
                   help="the 'moa_pers_init' variant: routers start personalised-first, R_pers = 1 / (1 + e^-b) (0.95 for 3)")
    p.add_argument("--router-init", type=float, default=4.0,
                   help="prior-logit bias of the 'router init to prior' variant: R_pers starts at 1 / (1 + e^b)")
    p.add_argument("--train-subjects", type=int, default=200)
    p.add_argument("--scenes", type=int, default=8000)
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--n-seeds", type=int, default=4)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--contexts", default=None,
                   help="comma-separated backgrounds: personalisation scenes only on these (the paper's setting, where a "
                        "subject's images show a narrow context); evaluation still cycles all four")
    p.add_argument("--no-tar", action="store_true", help="write the JSON only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="moa_half,moa_prior_init,finetune",
                   help="moa_half: the routers start at (1/2, 1/2); moa_prior_init: they start toward the prior (--router-init); "
                        "moa_fast_router: from 1/2, with the routers' learning rate --router-lr-mult times the rest; "
                        "moa_pers_init: they start personalised-first (--router-init-pers), the router loss sends the background back; "
                        "moa_box_routed: no routers, the subject's box routes (BoxRouting), in training and sampling")
    p.add_argument("--time-limit", type=float, default=430.0, help="seconds from the start to the end of evaluation")
    p.add_argument("--eval-reserve", type=float, default=90.0, help="seconds kept for evaluation and saving")
    p.add_argument("--resume", default=None, help="a .tar.gz written by an earlier run: continue from its weights")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on a few scenes (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.train_subjects, args.scenes = 3, 8, 20, 64
        args.n_prompts, args.n_seeds, args.ddim_steps, args.time_limit, args.eval_reserve = 4, 1, 3, 120.0, 30.0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    phases = {}

    # --- the prior, the subjects (held out from the prior and from personalisation), the data, the classifier
    unet, te, ddpm, prov = load_prior(args.prior)
    unet.to(device); te.to(device)
    ddim, size = ddim_for(ddpm), unet.config.sample_size
    q = size // 2
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    held_out = np.array([next(i for i in order if digits.target[i] == c) for c in range(10)])      # one per class
    train_ids = np.array([i for i in order if i not in set(held_out)][:args.train_subjects])
    clf_ids = np.array([i for i in order if i not in set(held_out) | set(train_ids)])
    train_subjects, test_subjects = digits.images[train_ids], digits.images[held_out]
    data = random_scenes(args.scenes, size, rng, subjects=train_subjects)
    contexts = args.contexts.split(",") if args.contexts else list(BACKGROUNDS)
    if args.contexts:                               # keep the scenes on the given backgrounds, as many as asked for
        while True:
            keep = [i for i, l in enumerate(data.labels) if l["background"] in contexts]
            if len(keep) >= args.scenes:
                break
            more = random_scenes(args.scenes, size, rng, subjects=train_subjects)
            data = type(data)(torch.cat([data.images, more.images]), torch.cat([data.ids, more.ids]),
                              torch.cat([data.masks, more.masks]), data.captions + more.captions, data.labels + more.labels)
        keep = torch.tensor(keep[:args.scenes])
        data = type(data)(data.images[keep], data.ids[keep], data.masks[keep], [data.captions[i] for i in keep],
                          [data.labels[i] for i in keep])
    data.images, data.ids, data.masks = data.images.to(device), data.ids.to(device), data.masks.to(device)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(
        glyph_features(torch.stack([glyph_mask(digits.images[i], q) for i in clf_ids])), digits.target[clf_ids])
    phases["setup_s"] = round(time.perf_counter() - T0, 1)
    print(f"{device}: {len(train_ids)} training subjects, {args.scenes} scenes, variants {variants}; setup "
          f"{phases['setup_s']} s", flush=True)

    # --- the models (resumed weights when given)
    dim = te.config.hidden_size
    models, box_routing = {}, {}
    for v in variants:
        if v == "finetune":
            models[v] = FineTune(unet, dim).to(device)
        else:
            m = MoA(unet, dim).to(device)
            m.state.kernel = False          # reference path: exact equality for the forced-prior control
            if v == "moa_box_routed":
                box_routing[v] = BoxRouting(m)
            for r in m.routers.values():           # the last layer's bias sets the start: prior logit b, personalised 0
                with torch.no_grad():
                    r.net[2].bias.zero_()
                    r.net[2].bias[0] = {"moa_prior_init": args.router_init, "moa_pers_init": -args.router_init_pers}.get(v, 0.0)
            models[v] = m
    prev_steps = {v: 0 for v in variants}
    if args.resume:
        with tarfile.open(args.resume) as tf:
            meta = json.load(tf.extractfile("meta.json"))
            for v in variants:
                sd = torch.load(io.BytesIO(tf.extractfile(f"{v}.pt").read()), map_location=device)
                if v == "finetune":
                    models[v].load_state_dict(sd)
                else:
                    models[v].load_state_dict(sd, strict=False)
                prev_steps[v] = int(meta["steps"].get(v, 0))
        print(f"resumed from {args.resume}: {prev_steps}", flush=True)

    # --- training: each model gets an equal share of the time left before the evaluation reserve
    logs, steps_done = {}, {}
    t_train = time.perf_counter()
    for j, v in enumerate(variants):
        left = args.time_limit - args.eval_reserve - (time.perf_counter() - T0)
        deadline = time.perf_counter() + max(0.0, left / (len(variants) - j))
        counter = []
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        if v in box_routing:
            log = train_box_routed(models[v], box_routing[v], te, ddpm, data, train_subjects, args.steps, args.batch,
                                   args.lr, args.seed + prev_steps[v], progress=time_limited(deadline, counter))
            logs[v] = dict(masked=[l["masked"] for l in log])
        elif v == "finetune":
            log = train_finetune(models[v], te, ddpm, data, train_subjects, args.steps, args.batch, args.lr,
                                 args.seed + prev_steps[v], progress=time_limited(deadline, counter))
            logs[v] = dict(loss=log)
        else:
            log = train_moa(models[v], te, ddpm, data, train_subjects, args.steps, args.batch, args.lr, args.router_weight,
                            args.seed + prev_steps[v], progress=time_limited(deadline, counter),
                            router_lr=args.lr * args.router_lr_mult if v == "moa_fast_router" else None,
                            router_form=args.router_form)
            logs[v] = dict(masked=[l["masked"] for l in log], router=[l["router"] for l in log])
        sync(device)
        steps_done[v] = len(log)
        phases[f"train_{v}_s"] = round(time.perf_counter() - t0, 1)
        first = {k: float(np.mean(x[:10])) for k, x in logs[v].items()}
        last = {k: float(np.mean(x[-50:])) for k, x in logs[v].items()}
        print(f"{v}: {len(log)} steps in {phases[f'train_{v}_s']} s; loss {first} -> {last}", flush=True)
    for m in models.values():
        m.eval()

    # --- evaluation: the chapter's rows, same prompts and seeds for every model
    t_eval = time.perf_counter()
    # every (prompt, seed) pair is one image; image j starts from noise seeded j (the chapter's `sample`), the same
    # draw for every model, so all kinds are compared on the same prompts and seeds
    prompts = eval_prompts(args.n_prompts, NOUN, np.random.default_rng(args.seed + 2))
    items = [dict(seed=s, cls=i % 10, **p) for s in range(args.n_seeds) for i, p in enumerate(prompts)]
    cls_all = [it["cls"] for it in items]
    swap_all = [(c + 1) % 10 for c in cls_all]
    n_img = len(items)
    with torch.no_grad():
        ctx = te(encode_captions([it["caption"] for it in items]).to(device)).last_hidden_state
        null = te(null_ids(n_img).to(device)).last_hidden_state

    def generate(kind, cls, seed=0, record=False):
        refs = subject_refs(test_subjects, cls, q).to(device)
        maps = {}
        if kind == "prior":
            den = lambda x, t: guided(prior_pred(unet, x, t, ctx), prior_pred(unet, x, t, null), args.guidance)
        elif kind == "finetune":
            den = lambda x, t: guided(models[kind](x, t, ctx, refs), prior_pred(unet, x, t, null), args.guidance)
        else:
            name, mode = kind.split(":") if ":" in kind else (kind, None)
            force, m = {"forced": "prior", "personal": "personal"}.get(mode), models[name]
            if name in box_routing:
                box_routing[name].box = box_dev

            def den(x, t):
                o = m(x, t, ctx, refs, force=force, record=record)
                for k, w in m.state.maps.items():
                    maps[k] = maps.get(k, 0) + w.detach().cpu() / args.ddim_steps    # mean over the DDIM steps
                return guided(o, prior_pred(unet, x, t, null), args.guidance)
        patched = []
        if kind.endswith(":oracle"):   # diagnosis: the personalised weight zeroed outside the subject's box in every layer
            for r in m.routers.values():
                def masked_router(x, fwd=r.forward):
                    w = fwd(x)
                    pers = w[..., 1] * layer_mask(box_dev, x.shape[1])
                    return torch.stack([1 - pers, pers], -1)
                patched.append((r, r.forward)); r.forward = masked_router
        if kind.endswith(":box"):      # diagnosis: the routers replaced by the box (personalised weight 1 inside, 0 outside)
            routing = BoxRouting.__new__(BoxRouting); routing.box = box_dev
            for r in m.routers.values():
                patched.append((r, r.forward)); r.forward = routing
        try:
            with torch.no_grad():
                return sample(den, n_img, size, ddim, args.ddim_steps, seed, device).cpu(), maps
        finally:
            for r, fwd in patched:
                r.forward = fwd

    box_dev = torch.stack([render_scene(it["background"], it["color"], it["position"], torch.zeros(q, q), size)[1]
                           for it in items]).to(device)
    # per MoA variant: as trained, forced to the prior (the control), personalised weight zeroed outside the box
    # (":oracle"), every pixel of every layer to the personalised experts (":personal"), the box as the router (":box")
    kinds = ["prior"] + [k for v in variants for k in ((v,) if v == "finetune" else
                                                        (v, v + ":forced", v + ":oracle", v + ":personal", v + ":box"))]
    imgs, maps_of, swap = {}, {}, {}
    for k in kinds:
        imgs[k], mp = generate(k, cls_all, record=k in variants and k != "finetune")
        if mp:
            maps_of[k] = [mp]
    for v in variants:
        swap[v] = generate(v, swap_all)[0]
    other_seed = generate("prior", cls_all, seed=10_000)[0]
    boxes = torch.stack([render_scene(p["background"], p["color"], p["position"], torch.zeros(q, q), size)[1] for p in items])
    outside = 1 - boxes

    def drift(a, b):
        return (((a - b).abs() * outside).sum((1, 2, 3)) / (outside.sum((1, 2, 3)) * 3)).numpy()

    def identity(ims, cls):
        proba = clf.predict_proba(glyph_features(torch.stack([extract_glyph(im, p, size) for im, p in zip(ims, items)])))
        return proba[np.arange(len(cls)), np.asarray(cls)]

    drift_of = {k: drift(imgs[k], imgs["prior"]) for k in kinds}
    ident_of = {k: identity(imgs[k], cls_all) for k in kinds}
    true_renders = torch.stack([render_scene(p["background"], p["color"], p["position"], glyph_mask(test_subjects[c], q), size)[0]
                                for p, c in zip(items, cls_all)])
    id_true = float(identity(true_renders, cls_all).mean())
    scene_change = drift(other_seed, imgs["prior"])
    swap_prior_ident = identity(imgs["prior"], swap_all)

    @torch.no_grad()
    def prediction_errors(n=256):
        "One-step error of the prediction (v) inside and outside the box, held-out subjects on fresh scenes, random timesteps."
        chk = random_scenes(n, size, np.random.default_rng(args.seed + 7), subjects=test_subjects)
        x0, M = chk.images.to(device), chk.masks.to(device)
        xt, target, t = diffusion_batch(ddpm, x0, torch.Generator().manual_seed(args.seed + 7))
        text = te(chk.ids.to(device)).last_hidden_state
        refs = subject_refs(test_subjects, [l["subject"] for l in chk.labels], q).to(device)
        preds = {"prior": prior_pred(unet, xt, t, text)}
        for v in variants:
            if v == "finetune":
                preds[v] = models[v](xt, t, text, refs)
                continue
            m = models[v]
            if v in box_routing:
                box_routing[v].box = M
            preds[v] = m(xt, t, text, refs)
            preds[v + ":personal"] = m(xt, t, text, refs, force="personal")
            routing = BoxRouting.__new__(BoxRouting); routing.box = M
            saved = [(r, r.forward) for r in m.routers.values()]
            for r, _ in saved:
                r.forward = routing
            preds[v + ":box"] = m(xt, t, text, refs)
            for r, fwd in saved:
                r.forward = fwd
        return {k: dict(inside=float(masked_diffusion_loss(pr, target, M)), outside=float(masked_diffusion_loss(pr, target, 1 - M)))
                for k, pr in preds.items()}

    pred_err = prediction_errors(8 if args.smoke else 256)

    def iv(x):
        return dict(estimate=x.estimate, low=x.low, high=x.high, outcome=decide(x), text=str(x))

    seen = np.array([it["background"] in contexts for it in items])
    per_model = {k: dict(drift=float(drift_of[k].mean()), identity=float(ident_of[k].mean()),
                         drift_seen_contexts=float(drift_of[k][seen].mean()) if seen.any() else None,
                         drift_other_contexts=float(drift_of[k][~seen].mean()) if (~seen).any() else None) for k in kinds}
    rows = []
    for v in variants:
        row = dict(variant=v, steps=prev_steps[v] + steps_done[v], **per_model[v])
        if v != "finetune":
            per_layer = {}
            for name, w in maps_of[v][0].items():                  # w: (images, pixels) personalised weight
                m = layer_mask(boxes, w.shape[1])
                per_layer[name] = (((w * m).sum(1) / m.sum(1)).numpy(), ((w * (1 - m)).sum(1) / (1 - m).sum(1)).numpy())
            w_in = np.mean([x[0] for x in per_layer.values()], 0); w_out = np.mean([x[1] for x in per_layer.values()], 0)
            row.update(router_inside=float(w_in.mean()), router_outside=float(w_out.mean()),
                       router_interval=iv(paired_bootstrap(w_in, w_out)),
                       router_per_layer={n: [float(x[0].mean()), float(x[1].mean())] for n, x in per_layer.items()},
                       forced_prior_drift_max=float(drift_of[v + ":forced"].max()),
                       personal_everywhere=dict(drift=float(drift_of[v + ":personal"].mean()), identity=float(ident_of[v + ":personal"].mean())),
                       box_as_router=dict(drift=float(drift_of[v + ":box"].mean()), identity=float(ident_of[v + ":box"].mean())),
                       oracle_router=dict(drift=float(drift_of[v + ":oracle"].mean()), identity=float(ident_of[v + ":oracle"].mean())))
            if "finetune" in variants:
                bg = paired_bootstrap(drift_of["finetune"], drift_of[v])               # > 0: less drift than the fine-tune
                idv = paired_bootstrap(ident_of[v], ident_of["prior"] + ID_MARGIN)     # > 0: the subject is present
                ctl_bg = paired_bootstrap(drift_of["finetune"], drift_of[v + ":forced"])
                ctl_id = paired_bootstrap(ident_of[v + ":forced"], ident_of["prior"] + ID_MARGIN)

                def both(a, b):
                    d = [decide(a), decide(b)]
                    return HOLDS if d == [HOLDS, HOLDS] else FAILS if FAILS in d else INCONCLUSIVE
                row.update(headline=dict(less_drift=iv(bg), subject_present=iv(idv), outcome=both(bg, idv)),
                           control=dict(less_drift=iv(ctl_bg), subject_present=iv(ctl_id), outcome=both(ctl_bg, ctl_id)))
        sw = drift(swap[v], imgs[v]); sid = identity(swap[v], swap_all)
        row.update(identity_vs_prior=iv(paired_bootstrap(ident_of[v], ident_of["prior"])),
                   swap=dict(drift=float(sw.mean()), new_seed=float(scene_change.mean()), identity=float(sid.mean()),
                             prior_identity=float(swap_prior_ident.mean()),
                             keeps_scene=iv(paired_bootstrap(scene_change, sw)),
                             new_subject=iv(paired_bootstrap(sid, swap_prior_ident + ID_MARGIN))))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("variant", "steps", "drift", "identity", "router_inside", "router_outside",
                                              "personal_everywhere", "box_as_router") if k in row}),
              row.get("headline", {}).get("outcome"), flush=True)
    phases["eval_s"] = round(time.perf_counter() - t_eval, 1)

    # --- grids for the chapter: the first prompts, every kind (uint8), and the weights for a later resume
    show = min(8, len(prompts))
    grid = {k: ((imgs[k][:show] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).tolist() for k in kinds}
    rec = dict(script="benchmarks/train_moa_personalise.py", commit=os.environ.get("TINYLAB_COMMIT", "unknown"),
               args=vars(args), device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
               torch=torch.__version__, python=sys.version.split()[0],
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               prior=dict(folder=args.prior, **{k: prov.get(k) for k in ("steps", "device", "commit", "prediction_type")}),
               resumed_from=args.resume, steps_this_run=steps_done, steps_total={v: prev_steps[v] + steps_done[v] for v in variants},
               phases=phases, n_images=len(items), id_true=id_true, id_margin=ID_MARGIN, per_model=per_model, rows=rows,
               prediction_error=pred_err,
               losses_every_50={v: {k: [round(float(np.mean(x[i:i + 50])), 5) for i in range(0, len(x), 50)] for k, x in lg.items()}
                                for v, lg in logs.items()},
               grid=dict(prompts=[p["caption"] for p in prompts[:show]], classes=cls_all[:show], images=grid))
    try:
        import diffusers, transformers, triton
        rec.update(diffusers=diffusers.__version__, transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    rec["contexts"] = contexts
    tar_path = out / args.tar_name
    with (tarfile.open(tar_path, "w:gz") if not args.no_tar else tarfile.open(fileobj=io.BytesIO(), mode="w")) as tf:
        blobs = {"meta.json": json.dumps(dict(steps=rec["steps_total"], variants=variants, args=vars(args))).encode()}
        for v, m in models.items():
            sd = m.state_dict() if v == "finetune" else {k: t for k, t in m.state_dict().items() if not k.startswith("unet.")}
            blobs[f"{v}.pt"] = state_bytes(sd)
        for name, b in blobs.items():
            info = tarfile.TarInfo(name); info.size = len(b); tf.addfile(info, io.BytesIO(b))
    rec["seconds"] = round(time.perf_counter() - T0, 1)
    (out / args.json_name).write_text(json.dumps(rec, indent=1, default=float))
    print("prediction error (inside, outside the box):", {k: (round(e["inside"], 3), round(e["outside"], 3)) for k, e in pred_err.items()})
    print(f"wrote {out / args.json_name}" + ("" if args.no_tar else f" and {tar_path} ({tar_path.stat().st_size / 1e6:.1f} MB)")
          + f" in {rec['seconds']} s", flush=True)
    return rec


if __name__ == "__main__":
    main()
