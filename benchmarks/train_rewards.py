"""The reward-transfer chapter (nbs/31_rewards.ipynb) at `gpu` scale on one GPU: reward models stronger than the
policy, best-of-n over the whole source x target matrix, RL (the chapter's RLOO with an explicit KL penalty) for every
source/target pair, and the two ablations (no shared anchors; no shared pretraining), in one JSON the chapter renders
beside its CPU run.

Everything is the chapter's own code (tinylab.rewards: the generated languages, the gold judge, the raters, the SFT
policy, preference pairs, best-of-n, the win rate, `rloo_train` with the fused log-prob kernel; tinylab.lm: the base
LMs). What differs from the chapter's CPU run:

- The policy is the chapter's `book` policy (same sizes and steps), but every reward model sits on a larger base LM
  (`rm_d_model`, `rm_layers`) pretrained longer on more text of the same kind, and is trained on many more labelled
  pairs (`pairs` prompts per language): an RM stronger than the policy, as in practice.
- The GPU image has no trl (and no datasets): the RMs are trained here with the same Bradley-Terry loss as trl's
  `RewardTrainer`, -log sigmoid(r(x, y_w) - r(x, y_l)), in plain torch on the same `transformers`
  sequence-classification model (`reward_model_from`), AdamW with a cosine schedule; 10% of each language's pairs
  are held out and the step with the best held-out *label* accuracy is kept (never the gold judge). The `datasets`
  stand-in of benchmarks/train_manyshot.py (imported, `install_datasets_shim`) serves tinylab.lm's pretraining.
- RL rewards are the RM's score standardised by its mean and standard deviation on the target's SFT samples (so one
  KL coefficient fits every RM); the step count per pair is cut to fit --budget-s.

JSON: device, versions, date, commit (env TINYLAB_COMMIT), args, preset, wall time per phase; SFT quality; per RM the
training curve and held-out accuracies (labels, gold); per (source, target) the per-prompt best-of-64 win rates and
the mean win rate at every n; the ablations' per-prompt win rates; RL per pair: steps, reward/KL curves, per-prompt
win rates of the RL policy over SFT samples.

Every phase (and every RL pair) rewrites the JSON, so a run stopped by a time limit keeps what it finished; an RM that
does not fit the budget is skipped (`rm_sources` lists those trained) and never used. On a shared GPU the two worlds
run as two processes at once and --merge makes one record (the other part's date, commit and preset under
`no_anchors_run`).

GPU:   PYTHONPATH=. python3 benchmarks/train_rewards.py --part main --out main.json &
       PYTHONPATH=. python3 benchmarks/train_rewards.py --part no_anchors --out na.json & wait
       PYTHONPATH=. python3 benchmarks/train_rewards.py --merge main.json na.json --out book/results/rewards_train_h200.json
CPU:   PYTHONPATH=. python3 benchmarks/train_rewards.py --smoke --out /tmp/rewards_train_smoke.json   (both parts)"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

# the `datasets` stand-in lives in the many-shot GPU script: import it (it registers itself when `datasets` is missing
# or TINYLAB_FAKE_DATASETS=1), so that tinylab.lm imports on the GPU image
_spec = importlib.util.spec_from_file_location("train_manyshot_shim", ROOT / "benchmarks" / "train_manyshot.py")
_manyshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_manyshot)
SHIM = _manyshot.SHIM
if SHIM:
    print("datasets stand-in (benchmarks/train_manyshot.py: install_datasets_shim)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402  (the real one, or the stand-in)

from tinylab.core import seed_everything  # noqa: E402
from tinylab.lm import TrainConfig, build_model, count_params, tiny_config, tokenize_blocks, train_lm  # noqa: E402
from tinylab.rewards import (LABELLERS, best_of_n, completion_words, gold_score, make_languages, make_tasks,  # noqa: E402
                             preference_pairs, pretraining_texts, reference_summary, reward_model_from, reward_scores,
                             rloo_train, sample, train_sft, win_rate, world_tokenizer)

transformers.logging.set_verbosity_error()

# the policy is the chapter's `book` policy; the reward models are larger and see far more pairs
GPU = dict(n_langs=4, d_model=64, n_layers=2, block=64, pre_docs=1000, pre_steps=400, sft_n=600, sft_steps=400,
           rm_d_model=256, rm_layers=6, rm_heads=8, rm_pre_docs=20000, rm_pre_steps=1000, rm_pre_batch=64, rm_pre_lr=1e-3,
           pairs=20000, rm_steps=600, rm_batch=256, rm_lr=2e-4, rm_eval_every=100,
           eval_prompts=256, N=64, M=32, rl_prompts=4000, rl_steps=150, rl_batch=32, rl_k=4, rl_beta=0.05, rl_lr=5e-4,
           rl_samples=16)
SMOKE = dict(n_langs=2, d_model=16, n_layers=1, block=64, pre_docs=30, pre_steps=4, sft_n=30, sft_steps=4,
             rm_d_model=32, rm_layers=1, rm_heads=2, rm_pre_docs=30, rm_pre_steps=4, rm_pre_batch=8, rm_pre_lr=1e-3,
             pairs=40, rm_steps=6, rm_batch=8, rm_lr=1e-3, rm_eval_every=3,
             eval_prompts=6, N=8, M=4, rl_prompts=16, rl_steps=2, rl_batch=2, rl_k=2, rl_beta=0.05, rl_lr=2e-4,
             rl_samples=4)
MAX_NEW = 12   # the chapter's: a complete summary is 9 words and an EOS
POLICY_KEYS = ("n_langs", "d_model", "n_layers", "block", "pre_docs", "pre_steps", "sft_n", "sft_steps")


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def pretrain(langs, tok, *, d_model, n_layers, n_heads, docs_per_lang, steps, batch, lr, block, seed, desc):
    "The chapter's `pretrain`: a Llama on monolingual text in `langs` (5% held out), `train_lm`."
    docs = pretraining_texts(langs, docs_per_lang, seed=seed)
    order = random.Random(seed).sample(range(len(docs)), len(docs))
    n_val = max(8, len(docs) // 20)
    val_docs, train_docs = [docs[i] for i in order[:n_val]], [docs[i] for i in order[n_val:]]
    blocks = tokenize_blocks(Dataset.from_dict({"text": train_docs}), tok, block)
    val = tokenize_blocks(Dataset.from_dict({"text": val_docs}), tok, block)
    config = tiny_config("llama", vocab_size=len(tok), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         block_size=block, tokenizer=tok)
    config.pad_token_id = tok.pad_token_id
    model = build_model(config, seed=seed)
    hist = train_lm(model, blocks, val, TrainConfig(steps=steps, batch_size=min(batch, len(blocks)), lr=lr,
                                                    eval_every=max(1, steps // 3), seed=seed), desc=desc)
    return model.eval(), dict(params=count_params(model), eval_loss=hist.eval_loss, seconds=hist.seconds)


def padded(rows, pad):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def rm_logits(rm, x, pad):
    return rm(input_ids=x, attention_mask=(x != pad).long()).logits[:, 0].float()


def train_rm(base, pairs, tok, gold_pairs, *, steps, batch, lr, eval_every, seed, device):
    """A reward model on `base` (the chapter's `reward_model_from`), trained with trl RewardTrainer's Bradley-Terry loss
    in plain torch; the last 10% of `pairs` are held out, and the weights at the best held-out label accuracy are kept.
    `gold_pairs[i]` = (gold of chosen, gold of rejected) of pair i, for the held-out agreement with the gold judge."""
    pad = tok.pad_token_id
    n = len(pairs["chosen_ids"])
    n_held = max(2, n // 10)
    c, r = padded(pairs["chosen_ids"], pad).to(device), padded(pairs["rejected_ids"], pad).to(device)
    (ct, rt), (ch, rh) = (c[:-n_held], r[:-n_held]), (c[-n_held:], r[-n_held:])
    gold_h = np.array(gold_pairs[-n_held:])
    sep = gold_h[:, 0] != gold_h[:, 1]
    rm = reward_model_from(base, pad).to(device)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = transformers.get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def held_out():
        rm.eval()
        d = torch.cat([rm_logits(rm, ch[i:i + 2048], pad) - rm_logits(rm, rh[i:i + 2048], pad)
                       for i in range(0, len(ch), 2048)]).cpu().numpy()
        rm.train()
        return float((d > 0).mean()), float(((d > 0) == (gold_h[:, 0] > gold_h[:, 1]))[sep].mean())

    curve, best, best_state, losses, accs = [], -1.0, None, [], []
    rm.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(ct), (batch,), generator=g).to(device)
        d = rm_logits(rm, ct[idx], pad) - rm_logits(rm, rt[idx], pad)
        loss = -F.logsigmoid(d).mean()
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0); opt.step(); sched.step()
        losses.append(loss.detach()); accs.append((d > 0).float().mean().detach())   # no sync per step
        if step % eval_every == 0 or step == steps:
            acc_l, acc_g = held_out()
            curve.append(dict(step=step, train_loss=torch.stack(losses).mean().item(),
                              train_accuracy=torch.stack(accs).mean().item(), heldout_accuracy_labels=acc_l,
                              heldout_accuracy_gold=acc_g))
            losses, accs = [], []
            if acc_l > best:
                best, best_state = acc_l, {k: v.detach().clone() for k, v in rm.state_dict().items()}
    rm.load_state_dict(best_state)
    rm.eval()
    kept = max(curve, key=lambda e: e["heldout_accuracy_labels"])
    return rm, dict(pairs=n, heldout=n_held, curve=curve, kept_step=kept["step"],
                    heldout_accuracy_labels=kept["heldout_accuracy_labels"],
                    heldout_accuracy_gold=kept["heldout_accuracy_gold"], params=count_params(rm))


def labelled_pairs(policy, L, i, tok, n, seed):
    tasks = make_tasks(L, tok, n, seed=seed * 1000 + 300 + i)
    device = next(policy.parameters()).device
    pairs = preference_pairs(policy, dataclasses.replace(tasks, prompts=tasks.prompts.to(device)), LABELLERS[i % len(LABELLERS)], tok, max_new=MAX_NEW, seed=seed * 1000 + i)
    P = tasks.prompts.shape[1]
    gold = [tuple(gold_score(completion_words(torch.tensor(ids[P:]), tok), tasks.records[j], L)
                  for ids in (cid, rid))
            for j, cid, rid in zip(pairs["index"], pairs["chosen_ids"], pairs["rejected_ids"])]
    return pairs, gold


def gold_of(comp, tasks, per, tok):
    comp = comp.cpu()
    L = tasks.lang
    return np.array([gold_score(completion_words(c, tok), tasks.records[k // per], L)
                     for k, c in enumerate(comp)]).reshape(len(tasks.records), per)


def eval_target(policy, L, j, tok, cfg, seed, device, g):
    "The chapter's evaluation set of one target: N + M SFT samples per held-out prompt, their gold scores."
    tasks = make_tasks(L, tok, cfg["eval_prompts"], seed=seed * 1000 + 400 + j)
    P, per = len(tasks.records), cfg["N"] + cfg["M"]
    prompts = tasks.prompts.to(device)
    comp = sample(policy, prompts.repeat_interleave(per, 0), MAX_NEW, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  generator=g, batch_size=4096)
    gold = gold_of(comp, tasks, per, tok)
    comp_N = comp.view(P, per, -1)[:, :cfg["N"]].reshape(P * cfg["N"], -1)
    return dict(tasks=tasks, prompts=prompts, comp_N=comp_N, gold=gold[:, :cfg["N"]], base=gold[:, cfg["N"]:], scores={})


def score(e, name, rm, cfg, tok):
    P = len(e["tasks"].records)
    e["scores"][name] = reward_scores(rm, e["prompts"].repeat_interleave(cfg["N"], 0), e["comp_N"], tok.eos_token_id,
                                      tok.pad_token_id).view(P, cfg["N"]).cpu().numpy()


def r4(x):
    return [round(float(v), 4) for v in np.asarray(x).ravel()]


def merge(parts, out_path):
    "One JSON from the two processes of a GPU run: the main part (shared world, best-of-n, RL) and the no-anchors world."
    docs = [json.loads(Path(p).read_text()) if Path(p).exists() else None for p in parts]
    main_rec, na = docs
    if main_rec is None:
        raise SystemExit(f"merge: the main part {parts[0]} is missing")
    rec = dict(main_rec)
    rec["parts"] = "two processes side by side (`device` and `no_anchors_run.device` name their GPUs): 'main' (shared " \
                   "world: RMs, best-of-n, RL, no-shared-pretraining ablation if time was left) and 'no_anchors' (the " \
                   "second world)"
    rec["phases_main"] = main_rec.get("phases")
    if na is not None:
        for k, v in na.items():
            if k.startswith("na_") or k == "ablation_no_anchors":
                rec[k] = v
        rec["phases_no_anchors"], rec["complete_no_anchors"] = na.get("phases"), na.get("complete")
        rec["no_anchors_run"] = {k: na.get(k) for k in ("device", "date", "commit", "torch", "transformers", "triton",
                                                        "args", "preset")}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(rec, indent=1))
    log(f"merged {parts} -> {out_path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a test that the script runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=("all", "main", "no_anchors"), default="all",
                    help="main: shared world, RMs, best-of-n, RL (+ the no-shared-pretraining ablation if time is left); "
                         "no_anchors: the second world; all: both, one after the other")
    ap.add_argument("--merge", nargs=2, metavar=("MAIN_JSON", "NO_ANCHORS_JSON"), help="merge two parts into --out")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget of the whole run (RL is cut to fit)")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    cfg = dict(SMOKE if args.smoke else GPU)
    seed = args.seed
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = T0 + args.budget_s
    left = lambda: deadline - time.perf_counter()
    phases, clock = {}, [time.perf_counter()]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def phase(name, final=False):
        "Time a phase and write what there is so far (a run killed later still leaves its finished phases)."
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now
        log(f"phase {name}: {phases[name]:.1f} s")
        if final:
            phases["total"] = round(now - T0, 2)
        out["phases"], out["complete"] = phases, final
        path.write_text(json.dumps(out, indent=1))

    seed_everything(seed)
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args=vars(args), preset=cfg,
               datasets="stand-in" if SHIM else "real", max_new=MAX_NEW,
               rm_training="plain torch Bradley-Terry loss -log sigmoid(r_w - r_l) (trl RewardTrainer's loss; trl is not "
                           "on the GPU image), AdamW + cosine, 10% of pairs held out, weights kept at the best held-out "
                           "label accuracy",
               rl_reward="RM score standardised by its mean and std on the target's SFT samples; RLOO with KL penalty beta")
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    NS = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cfg["N"]]
    out["ns"] = NS
    wins = lambda e, s, n: win_rate(best_of_n(e["scores"][s], e["gold"], n), e["base"])

    def make_policy(w, tag):
        base, info = pretrain(w["langs"], w["tok"], d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=4,
                              docs_per_lang=cfg["pre_docs"], steps=cfg["pre_steps"], batch=32, lr=3e-3,
                              block=cfg["block"], seed=seed, desc=f"policy base ({tag})")
        sft_tasks = [make_tasks(L, w["tok"], cfg["sft_n"], seed=seed * 1000 + 100 + i) for i, L in enumerate(w["langs"])]
        policy = copy.deepcopy(base)
        losses = train_sft(policy, sft_tasks, steps=cfg["sft_steps"], lr=3e-3, seed=seed, desc=f"SFT ({tag})")
        info["sft_loss"] = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
        return policy.to(device).eval(), info

    def make_rm_base(w, data_langs, tag):
        base, info = pretrain(data_langs, w["tok"], d_model=cfg["rm_d_model"], n_layers=cfg["rm_layers"],
                              n_heads=cfg["rm_heads"], docs_per_lang=cfg["rm_pre_docs"], steps=cfg["rm_pre_steps"],
                              batch=cfg["rm_pre_batch"], lr=cfg["rm_pre_lr"], block=cfg["block"], seed=seed + 1,
                              desc=f"RM base ({tag})")
        return base.to(device).eval(), info

    def world_rms(w, policy, rm_base, tag, min_left=0.0):
        "Pairs and an RM for each language (L0 first); later languages only while `min_left` seconds would remain."
        rms, info, pair_data, per_rm = {}, {}, {}, None
        for i, L in enumerate(w["langs"]):
            if per_rm is not None and left() - per_rm < min_left:
                log(f"{tag}: no time for RM {L.name} (one takes {per_rm:.0f} s, {left():.0f} s left)")
                break
            t_rm = time.perf_counter()
            pairs, gold_pairs = labelled_pairs(policy, L, i, w["tok"], cfg["pairs"], seed)
            pair_data[L.name] = (pairs, gold_pairs)
            rms[L.name], info[L.name] = train_rm(rm_base, pairs, w["tok"], gold_pairs, steps=cfg["rm_steps"],
                                                 batch=cfg["rm_batch"], lr=cfg["rm_lr"], eval_every=cfg["rm_eval_every"],
                                                 seed=seed + i, device=device)
            per_rm = time.perf_counter() - t_rm
            r = info[L.name]
            log(f"{tag} RM {L.name}: {r['pairs']} pairs, held-out accuracy labels {r['heldout_accuracy_labels']:.3f}, "
                f"gold {r['heldout_accuracy_gold']:.3f} (step {r['kept_step']}), {per_rm:.0f} s")
        return rms, info, pair_data, per_rm

    def world_evals(w, policy, rms, gen):
        evals = {}
        for j, L in enumerate(w["langs"]):
            e = evals[L.name] = eval_target(policy, L, j, w["tok"], cfg, seed, device, gen)
            for s, rm in rms.items():
                score(e, s, rm, cfg, w["tok"])
        return evals

    def agreement(evals, sources):
        "The chapter's diagnostic: consecutive SFT samples of a prompt, paired; RM order vs gold order."
        res = {}
        for t, e in evals.items():
            a, b = e["gold"][:, 0::2], e["gold"][:, 1::2]
            m = a != b
            res[t] = {s: float(((e["scores"][s][:, 0::2] > e["scores"][s][:, 1::2]) == (a > b))[m].mean()) for s in sources}
        return res

    if args.part in ("all", "main"):
        langs = make_languages(cfg["n_langs"], seed=seed)
        W = dict(langs=langs, tok=world_tokenizer(langs))
        tok = W["tok"]
        names = [L.name for L in langs]
        pivot = names[0]
        eos, pad = tok.eos_token_id, tok.pad_token_id
        g = torch.Generator().manual_seed(seed)

        # ---- the world with shared anchors: the policy (the chapter's book policy) and the larger RM base ----
        W["policy"], out["policy"] = make_policy(W, "shared anchors")
        phase("policy")
        W["rm_base"], out["rm_base"] = make_rm_base(W, langs, "all languages")
        phase("rm_base")
        log(f"policy {out['policy']['params']:,} parameters, RM base {out['rm_base']['params']:,}")

        # ---- preference pairs in every language, an RM per source language ----
        rms, out["rms"], pair_data, per_rm = world_rms(W, W["policy"], W["rm_base"], "shared")
        phase("rms")

        # ---- best-of-n over the source x target matrix ----
        evals = world_evals(W, W["policy"], rms, g)
        srcs = list(rms)          # the languages whose RM was trained in time (all of them unless the budget ran out)
        out["rm_sources"] = srcs
        out["sft_quality"] = {t: dict(mean_gold=float(e["gold"].mean()), share_perfect=float((e["gold"] == 1).mean()),
                                      oracle_best_of_max=float(e["gold"].max(1).mean())) for t, e in evals.items()}
        out["win_matrix"] = {t: {s: float(wins(e, s, NS[-1]).mean()) for s in srcs} for t, e in evals.items()}
        out["wins_at_max"] = {t: {s: r4(wins(e, s, NS[-1])) for s in srcs} for t, e in evals.items()}
        out["win_vs_n"] = {t: {s: [float(wins(e, s, n).mean()) for n in NS] for s in srcs} for t, e in evals.items()}
        out["gold_of_pick_vs_n"] = {t: {s: [float(best_of_n(e["scores"][s], e["gold"], n).mean()) for n in NS]
                                        for s in srcs} for t, e in evals.items()}
        out["oracle_vs_n"] = {t: [float(win_rate(e["gold"].reshape(len(e["gold"]), -1, n).max(-1), e["base"]).mean())
                                  for n in NS] for t, e in evals.items()}
        out["agreement_with_gold"] = agreement(evals, srcs)
        ref_pref = {}
        for t, e in evals.items():
            refs = e["tasks"].references.to(device)
            ref_pref[t] = {s: float((reward_scores(rms[s], e["prompts"], refs, eos, pad).cpu().numpy()[:, None]
                                     > e["scores"][s]).mean()) for s in srcs}
        out["prefers_reference"] = ref_pref
        log("best-of-%d win matrix (rows: RM source): %s" % (NS[-1], json.dumps(
            {s: {t: round(out['win_matrix'][t][s], 3) for t in names} for s in srcs})))
        phase("best_of_n")

        # ---- RL (RLOO, explicit KL) for every source/target pair, cut to fit the budget ----
        pairs_rl = [(s, t) for t in names for s in srcs]
        rl_prompts = {L.name: make_tasks(L, tok, cfg["rl_prompts"], seed=seed * 1000 + 700 + j).prompts.to(device)
                      for j, L in enumerate(langs)}
        stats = {(s, t): (float(evals[t]["scores"][s].mean()), float(evals[t]["scores"][s].std() + 1e-6))
                 for s, t in pairs_rl}

        def reward_fn(s, t):
            mu, sd = stats[(s, t)]
            return lambda p, y: (reward_scores(rms[s], p, y, eos, pad) - mu) / sd

        probe_pol = copy.deepcopy(W["policy"])
        probe = lambda n: rloo_train(probe_pol, W["policy"], reward_fn(srcs[0], names[-1]), rl_prompts[names[-1]], steps=n,
                                     k=cfg["rl_k"], batch_prompts=cfg["rl_batch"], beta=cfg["rl_beta"], lr=cfg["rl_lr"],
                                     max_new=MAX_NEW, eos_id=eos, pad_id=pad, seed=seed, desc="RLOO probe")
        probe(1)                                     # warm-up: the kernel compiles on its first call
        probe_steps, tp = 3, time.perf_counter()
        probe(probe_steps)
        per_step = (time.perf_counter() - tp) / probe_steps
        del probe_pol
        eval_cost = 3.0 if device.type == "cuda" else 0.5   # seconds to sample and judge one pair's evaluation (estimate)
        # leave time for the no-shared-pretraining ablation after RL (an RM base on L0 alone and one RM), and in
        # "all" for the second world
        mono_need = phases["rm_base"] + (per_rm or 0) + 15
        reserve = mono_need + (0.0 if args.part == "main" else 0.4 * args.budget_s)
        steps = int(min(cfg["rl_steps"], max(0, (left() - 10 - reserve) / len(pairs_rl) - eval_cost) / per_step))
        out["rl_steps_run"], out["rl_step_seconds_probe"] = steps, per_step
        log(f"RL: {per_step * 1000:.0f} ms per step (probe); {steps} steps per pair for {len(pairs_rl)} pairs "
            f"(preset {cfg['rl_steps']})")
        out["rl"] = {}
        R = cfg["rl_samples"]
        if steps >= 1:
            for s, t in pairs_rl:
                pol = copy.deepcopy(W["policy"])
                hist = rloo_train(pol, W["policy"], reward_fn(s, t), rl_prompts[t], steps=steps, k=cfg["rl_k"],
                                  batch_prompts=cfg["rl_batch"], beta=cfg["rl_beta"], lr=cfg["rl_lr"], max_new=MAX_NEW,
                                  eos_id=eos, pad_id=pad, seed=seed, desc=f"RLOO {s}->{t}")
                e = evals[t]
                comp = sample(pol, e["prompts"].repeat_interleave(R, 0), MAX_NEW, eos_id=eos, pad_id=pad, generator=g,
                              batch_size=4096)
                gold = gold_of(comp, e["tasks"], R, tok)
                w = win_rate(gold, e["base"])
                every = max(1, steps // 50)
                out["rl"][f"{s}->{t}"] = dict(steps=steps, win=r4(w), mean_gold=float(gold.mean()),
                                              reward=r4(np.array(hist["reward"])[::every]),
                                              kl=r4(np.array(hist["kl"])[::every]))
                log(f"RL {s}->{t}: win {w.mean():.3f}, mean gold {gold.mean():.3f} (SFT {e['base'].mean():.3f}), "
                    f"final KL {hist['kl'][-1]:.2f}")
                del pol
                path.write_text(json.dumps(out, indent=1))     # every finished pair survives a time-out
        phase("rl")

        # ---- ablation: no shared pretraining (L0's pairs, an RM on a base of the same size pretrained on L0 alone),
        # when time is left (the chapter's CPU run has it too) ----
        if left() > mono_need and pivot in pair_data:
            mono_base, out["rm_base_mono"] = make_rm_base(W, [langs[0]], "L0 only")
            mono_rm, out["rm_mono"] = train_rm(mono_base, pair_data[pivot][0], tok, pair_data[pivot][1],
                                               steps=cfg["rm_steps"], batch=cfg["rm_batch"], lr=cfg["rm_lr"],
                                               eval_every=cfg["rm_eval_every"], seed=seed, device=device)
            del mono_base
            for e in evals.values():
                score(e, "mono", mono_rm, cfg, tok)
            out["ablation_mono"] = {t: r4(wins(e, "mono", NS[-1])) for t, e in evals.items()}
            log("no shared pretraining: L0 RM win rate by target %s" % {t: round(float(np.mean(v)), 3)
                                                                      for t, v in out["ablation_mono"].items()})
        else:
            log(f"no time for the no-shared-pretraining ablation ({left():.0f} s left, needs about {mono_need:.0f} s)")
        phase("ablation_mono", final=args.part == "main")
        del W, rms, evals

    if args.part in ("all", "no_anchors"):
        # ---- ablation: no shared anchors (its own world: policy, RM base, RMs from L0 on; the same records) ----
        langs = make_languages(cfg["n_langs"], seed=seed, shared_anchors=False)
        NA = dict(langs=langs, tok=world_tokenizer(langs))
        names = [L.name for L in langs]
        NA["policy"], out["na_policy"] = make_policy(NA, "no shared anchors")
        NA["rm_base"], out["na_rm_base"] = make_rm_base(NA, langs, "no shared anchors")
        phase("na_models")
        eval_reserve = 30.0 if device.type == "cuda" else 0.0
        na_rms, out["na_rms"], _, _ = world_rms(NA, NA["policy"], NA["rm_base"], "no anchors", min_left=eval_reserve)
        phase("na_rms")
        na_evals = world_evals(NA, NA["policy"], na_rms, torch.Generator().manual_seed(seed))
        out["na_sft_quality"] = {t: dict(mean_gold=float(e["gold"].mean()), share_perfect=float((e["gold"] == 1).mean()))
                                 for t, e in na_evals.items()}
        out["na_rm_sources"] = list(na_rms)
        out["na_win_matrix"] = {t: {s: float(wins(e, s, NS[-1]).mean()) for s in na_rms} for t, e in na_evals.items()}
        out["na_wins_at_max"] = {t: {s: r4(wins(e, s, NS[-1])) for s in na_rms} for t, e in na_evals.items()}
        out["na_win_vs_n_all"] = {t: {s: [float(wins(e, s, n).mean()) for n in NS] for s in na_rms}
                                  for t, e in na_evals.items()}
        out["na_agreement_with_gold"] = agreement(na_evals, list(na_rms))
        pivot = names[0]
        out["ablation_no_anchors"] = {t: out["na_wins_at_max"][t][pivot] for t in names}
        out["na_win_vs_n"] = {t: out["na_win_vs_n_all"][t][pivot] for t in names}
        log("no shared anchors: win matrix (rows: RM source) %s" % json.dumps(
            {s: {t: round(out['na_win_matrix'][t][s], 3) for t in names} for s in na_rms}))
        phase("ablation_no_anchors", final=True)


if __name__ == "__main__":
    main()
