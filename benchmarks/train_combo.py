"""Train and evaluate the COMBO chapter's models (nbs/42_combo.ipynb) at `gpu` scale: the state estimator, the world
model's single-agent stage, its composed fine-tune with and without the agent-dependent loss scaling, and the joint
baseline (all on teams of one and two agents); then prediction accuracy for teams of one to four agents (the guidance
weight w = 5, a sweep over w = 1, 2 and 1/K, the composition the fine-tune trains), the state estimator's accuracy on
the cells an agent does not see, and the five planners (random, greedy, search-est: the tree search on the estimated
state with the true simulator, COMBO, oracle) on --episodes episodes per team size with the paper's 3 x 3 x 3 tree
search and 10 DDIM steps.

The GPU machine allows 9 minutes a command, so the work is split in two commands that share --out: `--phase train`
runs the three training phases (estimator, world model, joint baseline) as parallel processes, each stopping at its
step count or --phase-seconds (their steps are launch-bound, so three processes share one GPU well), and saves every
model as flat files; `--phase eval` loads them and evaluates.

Writes flat files into --out (no sub-folders: the GPU machine's transfer drops nested folders): combo_h200.json
(device, versions, date, commit, args, steps trained and asked, per-item results), every trained model
(<name>.safetensors with train_<name>.json), and the planning models in the chapter's format (unet.json +
unet.safetensors, tokens.safetensors, estimator.json + estimator.safetensors, provenance.json).

GPU:   PYTHONPATH=. python3 benchmarks/train_combo.py --phase train --out DIR   (about 7 minutes on an H200)
       PYTHONPATH=. python3 benchmarks/train_combo.py --phase eval --out DIR    (about 5 minutes)
       The recorded run (book/results/combo_h200) ran exactly these, in two commands.
CPU:   PYTHONPATH=. python3 benchmarks/train_combo.py --smoke --out /tmp/combo_smoke"""
import argparse
import copy
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import torch

T0 = time.perf_counter()


def commit() -> str:
    if os.environ.get("TINYLAB_COMMIT"):
        return os.environ["TINYLAB_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f} s]", *a, flush=True)


def steps_within(fn, steps: int, seconds: float, probe: int = 20):
    "Run fn(n) once with n = probe steps to time it, then the rest of `steps` that fit in `seconds` (at least probe)."
    t = time.perf_counter()
    out = fn(min(probe, steps), first=True)
    per = (time.perf_counter() - t) / min(probe, steps)
    rest = max(0, min(steps - probe, int((seconds - (time.perf_counter() - t)) / max(per, 1e-6))))
    if rest > 0:
        out = out + fn(rest, first=False)
    return out


PHASES = ("est", "wm", "joint")   # the three training phases: independent, so they can run as parallel processes


def model_file(out, name):
    return os.path.join(out, f"{name}.safetensors")


def save_state(out, name, module, record):
    "One model's whole state_dict (flat safetensors) and its training record (flat JSON) beside it."
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, model_file(out, name))
    with open(os.path.join(out, f"train_{name}.json"), "w") as f:
        json.dump(record, f)


def load_state(out, name, module, device):
    from safetensors.torch import load_file
    module.load_state_dict(load_file(model_file(out, name)))
    with open(os.path.join(out, f"train_{name}.json")) as f:
        return module.to(device).eval(), json.load(f)


def data(args, device):
    "The same expert data in every process (seeded): world-model transitions, estimator frames, test transitions."
    import tinylab.combo as C
    rng = np.random.default_rng(args.seed)
    train = {k: C.rollouts(args.train_episodes, k, rng) for k in (1, 2)}
    est_data = [C.rollouts(max(args.train_episodes // 4, 2), k, rng, max_steps=10) for k in (1, 2, 3, 4)]
    frames = torch.cat([d.cur for d in est_data]); agents = [a.numpy() for d in est_data for a in d.agents]
    test = {k: C.rollouts(max(args.n_test // 4, 2), k, np.random.default_rng(args.seed + 1000 + k)) for k in (1, 2, 3, 4)}
    for d in train.values():
        d.cur, d.nxt = d.cur.to(device), d.nxt.to(device)
    return train, frames, agents, test


def train_phase(phase, args, device):
    """Train one phase and save its models as flat files in --out. est: the state estimator; wm: the single-agent
    stage, then the composed fine-tune with and without C_i (same steps, same batches); joint: the baseline, asked
    for as many steps as the composed model's stages together. Each phase stops at its step count or at
    --phase-seconds, whichever comes first, and records both."""
    import tinylab.combo as C
    train, frames, agents, _ = data(args, device)
    lr, ft_lr, B, secs = 2e-3, 5e-4, args.batch, args.phase_seconds
    asked = dict(est=args.est_steps, single=args.single_steps, finetune=args.ft_steps, joint=args.single_steps + args.ft_steps)
    log(f"{phase} on {device}: {[len(d) for d in train.values()]} world-model transitions, {len(frames)} estimator frames")
    if phase == "est":
        est = C.StateEstimator(tuple(args.channels), seed=args.seed).to(device)
        l = steps_within(lambda n, first: C.train_estimator(est, frames, agents, n, B, lr * (0.1 if first else 1), seed=args.seed + (0 if first else 1)),
                         args.est_steps, secs)
        save_state(args.out, "est", est, dict(steps=len(l), asked=asked["est"], final_loss=float(np.mean(l[-50:])), losses=l[::10]))
    elif phase == "wm":
        wm = C.WorldModel(tuple(args.channels), seed=args.seed).to(device)
        l = steps_within(lambda n, first: C.train_single(wm, [train[1], train[2]], n, B, lr * (0.1 if first else 1), seed=args.seed + (0 if first else 1)),
                         args.single_steps, 0.7 * secs)
        save_state(args.out, "wm_single", wm, dict(steps=len(l), asked=asked["single"], final_loss=float(np.mean(l[-50:])), losses=l[::10]))
        log("single", len(l), "steps")
        wm_scaled, wm_plain = copy.deepcopy(wm), copy.deepcopy(wm)
        l_sc = steps_within(lambda n, first: C.finetune_composed(wm_scaled, train[2], n, B, ft_lr, scaled=True, seed=args.seed + 2 + first),
                            args.ft_steps, 0.15 * secs)
        l_pl = C.finetune_composed(wm_plain, train[2], len(l_sc), B, ft_lr, scaled=False, seed=args.seed + 2 + 1)  # same steps, same batches
        for name, m, ls in (("wm_scaled", wm_scaled, l_sc), ("wm_plain", wm_plain, l_pl)):
            save_state(args.out, name, m, dict(steps=len(ls), asked=asked["finetune"], single_steps=len(l),
                                               final_loss=float(np.mean(ls[-50:])), losses=ls[::10]))
    elif phase == "joint":
        wm = C.WorldModel(tuple(args.channels), seed=args.seed).to(device)
        l = steps_within(lambda n, first: C.train_joint(wm, [train[1], train[2]], n, B, lr * (0.1 if first else 1), seed=args.seed + (0 if first else 1)),
                         asked["joint"], secs)
        save_state(args.out, "wm_joint", wm, dict(steps=len(l), asked=asked["joint"], final_loss=float(np.mean(l[-50:])), losses=l[::10]))
    log(phase, "saved")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="book/results/combo_h200")
    p.add_argument("--phase", default="all", choices=("all", "train", "eval") + PHASES,
                   help="all: train then evaluate in this process; train: the three training phases as parallel "
                        "processes (the steps are launch-bound, so they share the GPU well); est/wm/joint: one of them; "
                        "eval: load what the training phases saved in --out and evaluate")
    p.add_argument("--episodes", type=int, default=30, help="planning episodes per team size")
    p.add_argument("--agents", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--train-episodes", type=int, default=1500, help="expert episodes per team size (1 and 2) for the world model")
    p.add_argument("--channels", type=int, nargs=2, default=(32, 64))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--est-steps", type=int, default=3000)
    p.add_argument("--single-steps", type=int, default=4500)
    p.add_argument("--ft-steps", type=int, default=1200)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--weight", type=float, default=5.0)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--tree", type=int, nargs=3, default=(3, 3, 3))
    p.add_argument("--phase-seconds", type=float, default=3000.0,
                   help="wall-clock cap of each training phase (wm: 70%% single-agent stage, 15%% each fine-tune); the cap "
                        "guesses the steps that fit from the first 20, which overestimates a step's cost, so the default "
                        "is no cap: the default steps take about 430 s on an H200 with the three phases in parallel")
    p.add_argument("--workers", type=int, default=12, help="processes for the planners' scripted parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.episodes, args.agents, args.max_steps, args.train_episodes = 1, [2, 3], 3, 6
        args.channels, args.batch, args.est_steps, args.single_steps, args.ft_steps = (16, 32), 8, 3, 4, 2
        args.n_test, args.ddim_steps, args.tree, args.phase_seconds, args.workers = 4, 2, (2, 2, 2), 60.0, 0
    os.makedirs(args.out, exist_ok=True)
    if args.phase == "train":       # one process per phase; the parent only waits
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--phase", ph])
                 for ph in PHASES]
        codes = [pr.wait() for pr in procs]
        if any(codes):
            sys.exit(f"training phases {PHASES} exited with {codes}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(args.seed)
    if args.phase in PHASES:
        torch.set_num_threads(4)
        return train_phase(args.phase, args, device)
    if args.phase == "all":
        for ph in PHASES:
            train_phase(ph, args, device)
    evaluate(args, device)


def evaluate(args, device):
    "Prediction accuracy, the weight sweep, estimation accuracy and the five planners, from the saved models."
    import tinylab.combo as C
    pool = mp.get_context("fork").Pool(args.workers) if args.workers > 0 and not torch.cuda.is_initialized() else None
    mapper = (lambda f, *its: pool.starmap(f, zip(*its), chunksize=8)) if pool else map
    _, _, _, test = data(args, device)
    mk = lambda: C.WorldModel(tuple(args.channels), seed=args.seed)
    est, r_est = load_state(args.out, "est", C.StateEstimator(tuple(args.channels), seed=args.seed), device)
    wm, r_single = load_state(args.out, "wm_single", mk(), device)
    wm_scaled, r_sc = load_state(args.out, "wm_scaled", mk(), device)
    wm_plain, r_pl = load_state(args.out, "wm_plain", mk(), device)
    wm_joint, r_joint = load_state(args.out, "wm_joint", mk(), device)
    info = dict(estimator=r_est, single=r_single, finetune=dict(steps=r_sc["steps"], asked=r_sc["asked"], final_loss_scaled=r_sc["final_loss"],
                                                                 final_loss_plain=r_pl["final_loss"]), joint=r_joint)
    log("trained steps", {k: (v["steps"], v.get("asked")) for k, v in info.items()})

    prov = dict(script="benchmarks/train_combo.py", commit=commit(), args=vars(args),
                steps=dict(estimator=r_est["steps"], single=r_single["steps"], finetune=r_sc["steps"], joint=r_joint["steps"]),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU", torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                losses={k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in info.items()})
    try:
        import diffusers
        prov["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    C.save_models(args.out, copy.deepcopy(wm_scaled).cpu(), copy.deepcopy(est).cpu(), prov)   # flat files for the chapter

    names = {"composed, single-agent stage only": (wm, False), "composed + fine-tune with C_i": (wm_scaled, False),
             "composed + fine-tune, C_i = 1": (wm_plain, False), "joint (baseline)": (wm_joint, True)}
    prediction = {}
    for name, (m, joint) in names.items():
        prediction[name] = {}
        for k in (1, 2, 3, 4):
            r = C.prediction_accuracy(m, test[k], args.n_test, args.weight, args.ddim_steps, joint=joint, seed=args.seed)
            prediction[name][k] = dict(exact=r["exact"].tolist(), objects=r["objects"].tolist())
        log("prediction", name, {k: round(float(np.mean(v["exact"])), 3) for k, v in prediction[name].items()})

    sweep = {}                                                   # the guidance weight: the paper's 5, and two smaller
    for w in (1.0, 2.0):
        sweep[w] = {name: {k: float(C.prediction_accuracy(m, test[k], args.n_test, w, args.ddim_steps, joint=joint, seed=args.seed)["exact"].mean())
                           for k in (1, 2, 3, 4)} for name, (m, joint) in names.items() if name in ("composed + fine-tune with C_i", "joint (baseline)")}
        log("weight", w, sweep[w])
    # w = 1/K: eps_0 + (1/K) sum_i (eps_i - eps_0) = mean_i eps_i, the composition the fine-tune's loss trains
    sweep["1/K"] = {name: {k: float(C.prediction_accuracy(names[name][0], test[k], args.n_test, 1 / k, args.ddim_steps, seed=args.seed)["exact"].mean())
                           for k in (1, 2, 3, 4)} for name in ("composed + fine-tune with C_i", "composed + fine-tune, C_i = 1")}
    log("weight 1/K", sweep["1/K"])
    info["weight_sweep"] = sweep
    estimation = C.estimation_accuracy(est, test, max(args.n_test // 4, 2), args.ddim_steps, seed=args.seed)
    log("estimation", estimation)
    test_episodes = {k: test[k].episode[:args.n_test].tolist() for k in (1, 2, 3, 4)}

    n_prop, n_beam, n_hor = args.tree
    planners = {"random": C.Planner("random", seed=args.seed),
                "greedy": C.Planner("greedy", est=est, ddim_steps=args.ddim_steps, seed=args.seed),
                "search-est": C.Planner("search-est", est=est, ddim_steps=args.ddim_steps, n_propose=n_prop, beam=n_beam,
                                        horizon=n_hor, seed=args.seed, mapper=mapper),
                "COMBO": C.Planner("combo", wm=wm_scaled, est=est, weight=args.weight, ddim_steps=args.ddim_steps,
                                   n_propose=n_prop, beam=n_beam, horizon=n_hor, seed=args.seed, mapper=mapper),
                "oracle": C.Planner("oracle", n_propose=n_prop, beam=n_beam, horizon=n_hor, seed=args.seed, mapper=mapper)}
    planning = {}
    for k in args.agents:
        planning[k] = {}
        for name, pl in planners.items():
            r = C.run_episodes(pl, k, args.episodes, args.max_steps, seed=args.seed + 10 * k)
            planning[k][name] = {key: v.tolist() for key, v in r.items()}
            log(f"planning {k} agents, {name}: success {np.mean(r['success']):.2f}, steps {np.mean(r['steps']):.1f}")
        # keep what is done, in case the command is cut short
        write(args, prov, info, prediction, planning, estimation, test_episodes)
    write(args, prov, info, prediction, planning, estimation, test_episodes)
    if pool:
        pool.close()
    log("done")


def write(args, prov, info, prediction, planning, estimation, test_episodes):
    rec = dict(chapter="combo", device=prov["device"], torch=prov["torch"], diffusers=prov.get("diffusers"),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=prov["commit"],
               args=vars(args), training=info, seconds=round(time.perf_counter() - T0, 1),
               sampler="per-team indices",   # train_single/train_joint draw each team size's indices over its own length
               prediction={n: {str(k): v for k, v in r.items()} for n, r in prediction.items()},
               estimation={str(k): v for k, v in estimation.items()},
               test_episodes={str(k): v for k, v in test_episodes.items()},
               planning={str(k): v for k, v in planning.items()})
    try:
        import triton
        rec["triton"] = triton.__version__
    except ImportError:
        pass
    with open(os.path.join(args.out, "combo_h200.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
