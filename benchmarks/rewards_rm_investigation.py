"""Why best-of-n with the chapter's reward models loses to the SFT policy (nbs/31_rewards.ipynb, "Why the headline
fails here"). A CPU experiment at the chapter's `ci` sizes, one language (L0, whose raters' utility is the gold
judge's up to scale), one thread: it checks the raters against the gold judge, then trains reward models with
trl's RewardTrainer for longer and on more pairs, and measures each on held-out SFT sample pairs (against the
noisy labels and against the gold judge), on reference summaries against SFT samples, and by best-of-n.

    python benchmarks/rewards_rm_investigation.py   # ~6 minutes on 1 core; writes book/results/rewards_rm_investigation.json
    python benchmarks/rewards_rm_investigation.py --longer-pretraining   # ~5 minutes; adds "longer_pretraining" to it

The second asks whether the base LM is trained long enough: a base pretrained 4x longer (and its SFT policy 2x
longer), the quality of that SFT policy, and an RM on that base trained on the `ci` policy's labelled pairs.
"""
import copy, json, os, random, sys, time, warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
import numpy as np
import torch
import transformers, datasets
from datasets import Dataset

from tinylab.lm import TrainConfig, build_model, tiny_config, tokenize_blocks, train_lm
from tinylab.rewards import (LABELLERS, completion_words, gold_score, make_languages, make_tasks, meaning_counts,
                             parse_summary, preference_pairs, pretraining_texts, reward_scores, sample, train_reward_model,
                             train_sft, win_rate, best_of_n, world_tokenizer)

torch.set_num_threads(1); transformers.logging.set_verbosity_error(); datasets.disable_progress_bars()
CI = dict(n_langs=3, d_model=64, n_layers=2, block=64, pre_docs=600, pre_steps=300, sft_n=400, sft_steps=300)
RM_RUNS = [dict(pairs=1000, steps=120, lr=5e-4), dict(pairs=1000, steps=500, lr=1e-3), dict(pairs=3000, steps=500, lr=1e-3)]
OUT = Path(__file__).resolve().parents[1] / "book" / "results" / "rewards_rm_investigation.json"


def build(seed=0, n_layers=CI["n_layers"], pre_steps=CI["pre_steps"], sft_steps=CI["sft_steps"]):
    torch.manual_seed(seed)
    langs = make_languages(CI["n_langs"], seed=seed); tok = world_tokenizer(langs)
    docs = pretraining_texts(langs, CI["pre_docs"], seed=seed)
    split = Dataset.from_dict({"text": docs}).train_test_split(0.05, seed=seed)
    blocks, val = tokenize_blocks(split["train"], tok, CI["block"]), tokenize_blocks(split["test"], tok, CI["block"])
    config = tiny_config("llama", vocab_size=len(tok), d_model=CI["d_model"], n_layers=n_layers, n_heads=4,
                         block_size=CI["block"], tokenizer=tok)
    config.pad_token_id = tok.pad_token_id
    base = build_model(config, seed=seed)
    train_lm(base, blocks, val, TrainConfig(steps=pre_steps, batch_size=32, lr=3e-3, eval_every=100, seed=seed), desc="pretraining")
    base.eval()
    policy = copy.deepcopy(base)
    train_sft(policy, [make_tasks(L, tok, CI["sft_n"], seed=seed * 1000 + 100 + i) for i, L in enumerate(langs)],
              steps=sft_steps, lr=3e-3, seed=seed, desc="SFT")
    return langs, tok, base, policy


def main():
    t0 = time.time()
    langs, tok, base, policy = build()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    W = lambda x: completion_words(x, tok)
    g = torch.Generator().manual_seed(5)
    out = {"setting": "ci sizes (3 languages, d_model 64, 2 layers, 300 pretraining + 300 SFT steps), seed 0, one thread",
           "raters": {}, "rm_runs": []}
    held = {}
    for li, L in enumerate(langs):              # the raters against the gold judge on pairs of SFT samples
        lab, ht = LABELLERS[li], make_tasks(L, tok, 400, seed=900 + li)
        a, b = (sample(policy, ht.prompts, 12, eos_id=eos, pad_id=pad, generator=g) for _ in range(2))
        ga = np.array([gold_score(W(x), r, L) for x, r in zip(a, ht.records)]); gb = np.array([gold_score(W(x), r, L) for x, r in zip(b, ht.records)])
        ua = np.array([lab.utility(W(x), r, L) for x, r in zip(a, ht.records)]); ub = np.array([lab.utility(W(x), r, L) for x, r in zip(b, ht.records)])
        rng = random.Random(1)
        lbl = np.array([lab.prefers_first(W(x), W(y), r, L, rng) for x, y, r in zip(a, b, ht.records)])
        m = ga != gb
        out["raters"][L.name] = dict(pairs_with_gold_difference=int(m.sum()),
                                     utility_agrees_with_gold=float(np.mean(np.sign(ua - ub)[m] == np.sign(ga - gb)[m])),
                                     noisy_label_agrees_with_gold=float(np.mean(lbl[m] == (ga > gb)[m])), sft_mean_gold=float(ga.mean()))
        held[L.name] = (ht, a, b, ga, gb, lbl, ua, ub)
        print(L.name, out["raters"][L.name], flush=True)
    L, li = langs[0], 0
    ht, a, b, ga, gb, lbl, ua, ub = held[L.name]
    ev = make_tasks(L, tok, 24, seed=400)
    comp = sample(policy, ev.prompts.repeat_interleave(72, 0), 12, eos_id=eos, pad_id=pad, generator=g)
    gold = np.array([gold_score(W(c), ev.records[k // 72], L) for k, c in enumerate(comp)]).reshape(24, 72)
    compN = comp.view(24, 72, -1)[:, :64].reshape(24 * 64, -1)
    cnt = [meaning_counts(parse_summary(W(c), L), ev.records[k // 64]) for k, c in enumerate(compN)]
    arr = {k: np.array([c[k] for c in cnt], float).reshape(24, 64) for k in ("correct", "wrong", "repeated", "junk")}
    arr["length"] = np.array([len(W(c)) for c in compN], float).reshape(24, 64)
    out["sft_samples"] = {k: float(v.mean()) for k, v in arr.items()} | {"gold": float(gold.mean())}
    for run in RM_RUNS:
        t = time.time()
        tasks = make_tasks(L, tok, run["pairs"], seed=300 + li)
        pairs = preference_pairs(policy, tasks, LABELLERS[li], tok, max_new=12, seed=li)
        rm, log = train_reward_model(base, pairs, tok, steps=run["steps"], lr=run["lr"], seed=li)
        sa, sb = (reward_scores(rm, ht.prompts, x, eos, pad).numpy() for x in (a, b))
        sr = reward_scores(rm, ht.prompts, ht.references, eos, pad).numpy()
        sc = reward_scores(rm, ev.prompts.repeat_interleave(64, 0), compN, eos, pad).view(24, 64).numpy()
        m, mu = ga != gb, ua != ub
        r = dict(run, language=L.name, labelled_pairs=len(pairs["index"]),
                 train_accuracy=float(np.mean([x["accuracy"] for x in log if "accuracy" in x][-2:])),
                 heldout_accuracy_labels=float(np.mean(((sa > sb) == lbl)[mu])),
                 heldout_accuracy_gold=float(np.mean(((sa > sb) == (ga > gb))[m])),
                 prefers_reference_to_sft=float(np.mean(sr > sa)),
                 win_vs_n={n: float(win_rate(best_of_n(sc, gold[:, :64], n), gold[:, 64:]).mean()) for n in (1, 2, 4, 16, 64)},
                 picks_at_64={k: float(best_of_n(sc, v, 64).mean()) for k, v in arr.items()}, seconds=time.time() - t)
        out["rm_runs"].append(r)
        print(r, flush=True)
    out["seconds"] = time.time() - t0
    out["device"] = "CPU, one thread (a 2-core machine shared with other jobs)"
    out["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    out["commit"] = os.environ.get("TINYLAB_COMMIT") or os.popen(f"git -C {Path(__file__).parent} rev-parse HEAD").read().strip()
    OUT.write_text(json.dumps(out, indent=1))
    print("wrote", OUT)


def longer_pretraining(pre_steps=4 * CI["pre_steps"], sft_steps=2 * CI["sft_steps"]):
    t0 = time.time()
    langs, tok, base_ci, policy_ci = build()
    _, _, base_long, policy_long = build(pre_steps=pre_steps, sft_steps=sft_steps)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    W = lambda x: completion_words(x, tok)
    L, g = langs[0], torch.Generator().manual_seed(5)
    ht = make_tasks(L, tok, 400, seed=900)
    res = dict(pre_steps=pre_steps, sft_steps=sft_steps, language=L.name)
    for name, pol in (("ci", policy_ci), ("long", policy_long)):
        x = sample(pol, ht.prompts, 12, eos_id=eos, pad_id=pad, generator=g)
        gx = np.array([gold_score(W(c), r, L) for c, r in zip(x, ht.records)])
        pairs = preference_pairs(pol, make_tasks(L, tok, 1000, seed=300), LABELLERS[0], tok, max_new=12, seed=0)
        res[f"sft_{name}"] = dict(mean_gold=float(gx.mean()), share_perfect=float((gx == 1).mean()),
                                  labelled_pairs_of_1000=len(pairs["index"]))
        print(name, res[f"sft_{name}"], flush=True)
    # an RM on the longer-pretrained base, trained on the ci policy's pairs, judged on the ci policy's samples
    pairs = preference_pairs(policy_ci, make_tasks(L, tok, 1000, seed=300), LABELLERS[0], tok, max_new=12, seed=0)
    a, b = (sample(policy_ci, ht.prompts, 12, eos_id=eos, pad_id=pad, generator=g) for _ in range(2))
    ga = np.array([gold_score(W(x), r, L) for x, r in zip(a, ht.records)]); gb = np.array([gold_score(W(x), r, L) for x, r in zip(b, ht.records)])
    ev = make_tasks(L, tok, 24, seed=400)
    comp = sample(policy_ci, ev.prompts.repeat_interleave(72, 0), 12, eos_id=eos, pad_id=pad, generator=g)
    gold = np.array([gold_score(W(c), ev.records[k // 72], L) for k, c in enumerate(comp)]).reshape(24, 72)
    compN = comp.view(24, 72, -1)[:, :64].reshape(24 * 64, -1)
    for name, base in (("ci base", base_ci), ("longer-pretrained base", base_long)):
        rm, log = train_reward_model(base, pairs, tok, steps=RM_RUNS[0]["steps"], lr=RM_RUNS[0]["lr"], seed=0)
        sa, sb = (reward_scores(rm, ht.prompts, x, eos, pad).numpy() for x in (a, b))
        sr = reward_scores(rm, ht.prompts, ht.references, eos, pad).numpy()
        sc = reward_scores(rm, ev.prompts.repeat_interleave(64, 0), compN, eos, pad).view(24, 64).numpy()
        m = ga != gb
        res[f"rm_on_{name.split()[0]}_base"] = dict(
            base=name, heldout_accuracy_gold=float(np.mean(((sa > sb) == (ga > gb))[m])),
            prefers_reference_to_sft=float(np.mean(sr > sa)),
            win_vs_n={n: float(win_rate(best_of_n(sc, gold[:, :64], n), gold[:, 64:]).mean()) for n in (1, 4, 16, 64)})
        print(res[f"rm_on_{name.split()[0]}_base"], flush=True)
    res["seconds"] = time.time() - t0
    out = json.loads(OUT.read_text())
    out["longer_pretraining"] = res
    OUT.write_text(json.dumps(out, indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    longer_pretraining() if "--longer-pretraining" in sys.argv else main()
