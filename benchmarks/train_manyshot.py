"""Meta-train the many-shot ICL chapter's model (nbs/30_manyshot.ipynb) at its `gpu` preset on one GPU and evaluate
every claim row of the chapter on it, writing one JSON the chapter renders beside its CPU run.

Everything is the chapter's own code (tinylab.manyshot: tasks, meta-training mix, nested prompts, shared-prefix
scoring, baselines, Reinforced/Unsupervised ICL; tinylab.lm: tokenize_blocks, build_model, train_lm). The GPU image
has no `datasets`: when it is missing (or TINYLAB_FAKE_DATASETS=1), a small in-memory stand-in with the few methods
these functions use is registered as `datasets` before tinylab is imported.

The JSON holds per-item scores (task, inst, seed, K, item: correct, NLL) so the chapter bootstraps over items, the
k-NN / logistic-regression baselines at every K and N, addition (given, Reinforced, Unsupervised ICL), fine-tuning
against ICL, the training curve, wall time per phase, device, versions, date, commit (env TINYLAB_COMMIT) and args.

Meta-training's loss is on the answer tokens only (the chapter's `train_on_answers`); on a GPU every query of the
evaluation attends to the shared prefix through the shared-prefix attention kernel (the chapter's `suffix_logits`,
plugged in through transformers' AttentionInterface), checked against the SDPA path on the same model first.

Training stops early to fit --budget-s: a short calibration measures the time per step, and the step count is cut so
that data + training + the evaluation reserve fit; a hard stop inside training guards the rest.

GPU:   PYTHONPATH=. python3 benchmarks/train_manyshot.py --out $OUT/manyshot_h200.json
CPU:   PYTHONPATH=. python3 benchmarks/train_manyshot.py --smoke --out /tmp/manyshot_smoke.json"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

T0 = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------------------------
# a stand-in for `datasets` (the GPU image lacks it): only what tinylab.lm / tinylab.manyshot call
def install_datasets_shim() -> None:
    class Dataset:
        def __init__(self, columns: dict, fmt: str | None = None):
            self._cols = {k: list(v) for k, v in columns.items()}
            self._fmt = fmt

        @classmethod
        def from_dict(cls, columns):
            return cls(columns)

        @property
        def column_names(self):
            return list(self._cols)

        def __len__(self):
            return len(next(iter(self._cols.values()))) if self._cols else 0

        def _row(self, i):
            row = {k: v[i] for k, v in self._cols.items()}
            if self._fmt == "torch":
                import torch
                row = {k: torch.tensor(v) for k, v in row.items()}
            return row

        def __getitem__(self, key):
            if isinstance(key, str):
                return self._cols[key]
            return self._row(int(key))

        def __iter__(self):
            return (self._row(i) for i in range(len(self)))

        def select(self, indices):
            indices = list(indices)
            return Dataset({k: [v[i] for i in indices] for k, v in self._cols.items()}, self._fmt)

        def map(self, fn, batched=False, batch_size=1000, remove_columns=None, **_):
            if not batched:
                raise NotImplementedError("the datasets stand-in maps batched only")
            n, out = len(self), {}
            batch_size = batch_size or n or 1
            for s in range(0, n, batch_size):
                res = fn({k: v[s:s + batch_size] for k, v in self._cols.items()})
                for k, v in res.items():
                    out.setdefault(k, []).extend(v)
            keep = {k: v for k, v in self._cols.items() if k not in (remove_columns or []) and k not in out}
            if keep and out and len(next(iter(out.values()))) != n:
                raise ValueError("a batched map that changes the number of rows must remove the other columns")
            return Dataset({**keep, **out}, self._fmt)

        def with_format(self, fmt=None, **_):
            return Dataset(self._cols, fmt)

    class DatasetDict(dict):
        pass

    def load_dataset(*a, **k):
        raise RuntimeError("load_dataset is not available without the `datasets` package")

    mod = types.ModuleType("datasets")
    mod.Dataset, mod.DatasetDict, mod.load_dataset, mod.__version__ = Dataset, DatasetDict, load_dataset, "stand-in"
    sys.modules["datasets"] = mod


SHIM = os.environ.get("TINYLAB_FAKE_DATASETS") == "1" or importlib.util.find_spec("datasets") is None
if SHIM:
    install_datasets_shim()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tinylab.core import seed_everything  # noqa: E402
from tinylab.lm import TrainConfig, build_model, count_params, tiny_config, tokenize_blocks, train_lm  # noqa: E402
from tinylab.manyshot import (addition_task, baseline_accuracy, build_prompt, encode_prefix,  # noqa: E402
                              evaluate_generation, evaluate_icl, score_targets, linear_task, lookup_task, meta_training_mix, nested_orders, pack_frame,
                              parity_task, reinforced_shots, sentiment_task, shot, shot_counts, suffix_logits,
                              train_on_answers, word_tokenizer)
from datasets import Dataset  # noqa: E402  (the real one, or the stand-in)

transformers.logging.set_verbosity_error()

# the chapter's presets (nbs/30_manyshot.ipynb, PRESETS["gpu"]; tests/test_train_manyshot.py checks they agree)
GPU = dict(d_model=128, n_layers=4, n_heads=4, steps=6000, batch_size=32, lr=1e-3, block_size=1024,
           k_train=32, k_eval=128, k_short=256, n_features=[8, 16, 32], n_digits=3, parity_bits=20, inst=8,
           n_test=64, seeds=[0, 1, 2, 3, 4], k_add=128, add_test=64, ft_inst=4, ft_steps=100)
SMOKE = dict(d_model=32, n_layers=2, n_heads=4, steps=12, batch_size=4, lr=3e-3, block_size=256,
             k_train=4, k_eval=16, k_short=32, n_features=[4], n_digits=2, parity_bits=4, inst=2,
             n_test=6, seeds=[0, 1, 2], k_add=16, add_test=4, ft_inst=1, ft_steps=4)
MIX = dict(linear=0.45, lookup=0.3, sentiment=0.1, addition=0.15)   # the chapter's MIX


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Blocks(torch.utils.data.Dataset):
    "Training blocks as one uint8 tensor (the vocabulary has < 256 words); rows are {'input_ids': LongTensor}."
    column_names = ["input_ids"]

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i].long()}

    def select(self, idx):
        return Blocks(self.ids[list(idx)])


def _chunk(job):
    "One chunk of the meta-training stream (a process of its own): token blocks as a uint8 array."
    n, seed, cfg = job
    docs = meta_training_mix(n, cfg["k_train"], MIX, seed=seed, n_features=cfg["n_features"], n_digits=[cfg["n_digits"]])
    tok = word_tokenizer()
    blocks = tokenize_blocks(docs, tok, cfg["block_size"]).with_format(None)["input_ids"]
    words = {}
    for text, task in zip(docs["text"], docs["task"]):
        p, t = words.get(task, (0, 0))
        words[task] = (p + 1, t + len(text.split()))
    return np.asarray(blocks, dtype=np.uint8).reshape(-1, cfg["block_size"]), words


def _baseline_job(job):
    "k-NN and logistic regression on the shots of one linear-classification instance (a process of its own)."
    N, inst, cfg = job
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        data = linear_task(N, 2 * cfg["k_eval"] + cfg["n_test"], seed=10_000 + 100 * N + inst)
        pool, test = data.select(range(2 * cfg["k_eval"])), data.select(range(2 * cfg["k_eval"], len(data)))
        b = baseline_accuracy(pool, test, nested_orders(2 * cfg["k_eval"], cfg["k_eval"], cfg["seeds"]), shot_counts(cfg["k_eval"]))
    return b.assign(inst=inst, task=f"linear N={N}")


def make_blocks(n_prompts: int, cfg: dict, seed: int, first_chunk: int, pool=None, workers: int = 1):
    """Token blocks from `n_prompts` meta-training prompts in chunks (chunk c has mix seed 1000 (seed + 1) + c, so
    chunks and the validation prompts are different task instances), spread over `pool` when given."""
    n_chunks = max(1, workers, n_prompts // 4000)
    sizes = [n_prompts // n_chunks + (c < n_prompts % n_chunks) for c in range(n_chunks)]
    jobs = [(s, 1000 * (seed + 1) + first_chunk + c, cfg) for c, s in enumerate(sizes) if s > 0]
    parts = pool.map(_chunk, jobs) if pool is not None else [_chunk(j) for j in jobs]
    return [b for b, _ in parts], [w for _, w in parts], first_chunk + len(jobs)


def mix_summary(words: list[dict]) -> dict:
    mix = {}
    for w in words:
        for task, (p, t) in w.items():
            a, b = mix.get(task, (0, 0)); mix[task] = (a + p, b + t)
    total = sum(t for _, t in mix.values()) or 1
    return {task: dict(prompts=p, tokens=t, share=round(t / total, 3)) for task, (p, t) in sorted(mix.items())}


class OutOfTime(Exception):
    pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--steps", type=int, default=None, help="meta-training steps (default: the preset's 6000)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole run, seconds")
    p.add_argument("--eval-reserve-s", type=float, default=160.0, help="seconds kept for the evaluation after training")
    p.add_argument("--data-frac", type=float, default=1.0,
                   help="prompts generated, as a fraction of the blocks that the steps consume (< 1 repeats blocks)")
    p.add_argument("--workers", type=int, default=None, help="processes for the data (default: CPU count, at most 16)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for the tests)")
    p.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                   help="the evaluation's attention: auto = the shared-prefix kernel on a GPU, SDPA elsewhere; on = the kernel "
                        "(on a CPU only under TRITON_INTERPRET=1, to test the path); off = SDPA over the expanded cache")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else GPU)
    if args.steps is not None:
        cfg["steps"] = args.steps
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    workers = args.workers or (1 if args.smoke else min(16, os.cpu_count() or 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    phases, seed = {}, args.seed
    seed_everything(seed)
    tok = word_tokenizer()
    log(f"device {device}, datasets {'stand-in' if SHIM else 'package'}, workers {workers}, preset {cfg}")

    # -- data, part 1: enough blocks to calibrate, in a pool forked before CUDA starts (its rate is measured too)
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers)
    t = time.perf_counter()
    def need(steps):   # the chapter's formula: ~9 words a shot, K ~ k_train / 2 shots a prompt, times --data-frac
        return int(args.data_frac * steps * cfg["batch_size"] * cfg["block_size"] // (cfg["k_train"] * 9)) + 100
    n_first = min(need(cfg["steps"]), max(4000 * workers, need(60)))
    parts, words, next_chunk = make_blocks(n_first, cfg, seed, 0, pool, workers)
    val_docs = meta_training_mix(300, cfg["k_train"], MIX, seed=seed + 1, n_features=cfg["n_features"], n_digits=[cfg["n_digits"]])
    val_blocks = Blocks(torch.tensor(tokenize_blocks(val_docs, tok, cfg["block_size"]).with_format(None)["input_ids"], dtype=torch.uint8))
    data_s = time.perf_counter() - t
    prompts_per_s = n_first / data_s
    phases["data"] = data_s
    log(f"{n_first:,} prompts -> {sum(len(b) for b in parts):,} blocks of {cfg['block_size']} in {data_s:.1f} s "
        f"({prompts_per_s:,.0f} prompts/s over {workers} process(es))")

    def new_model():
        return build_model(tiny_config("llama", vocab_size=len(tok), d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                                       n_heads=cfg["n_heads"], block_size=8192, tokenizer=tok), seed=seed)

    # -- calibration: time per step on a throwaway model, then the steps that fit the budget with their data
    t = time.perf_counter()
    n_cal = 3 if args.smoke else 40
    cal_blocks = Blocks(torch.from_numpy(np.concatenate(parts)))
    cal_model = new_model()
    train_on_answers(cal_model, tok)
    if device.type == "cuda":   # a few steps first, so CUDA's start-up does not count as step time
        train_lm(cal_model, cal_blocks, val_blocks, TrainConfig(steps=5, batch_size=cfg["batch_size"], lr=cfg["lr"], eval_every=5,
                                                                eval_batches=1, seed=seed, mixed_precision=args.mixed_precision), desc="warm-up")
    cal = train_lm(cal_model, cal_blocks, val_blocks, TrainConfig(steps=n_cal, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                                                   eval_every=n_cal, eval_batches=1, seed=seed,
                                                                   mixed_precision=args.mixed_precision), desc="calibration")
    step_s = cal.seconds / n_cal
    phases["calibration"] = time.perf_counter() - t
    left = args.budget_s - (time.perf_counter() - T0) - args.eval_reserve_s
    data_per_step = (need(1000) - 100) / 1000 / prompts_per_s          # seconds of data generation per training step
    fit = max(1, int(0.9 * left / (step_s + data_per_step)))
    steps = min(cfg["steps"], fit)
    log(f"calibration: {1e3 * step_s:.1f} ms/step (+{1e3 * data_per_step:.1f} ms of data); {left:.0f} s for data and "
        f"training -> {steps} of {cfg['steps']} steps")

    # -- data, part 2: the rest of the prompts for those steps
    t = time.perf_counter()
    n_prompts = max(need(steps), n_first)
    if n_prompts > n_first:
        more, more_words, next_chunk = make_blocks(n_prompts - n_first, cfg, seed, next_chunk, pool, workers)
        parts += more; words += more_words
    # the classical baselines need no model: they run in the data processes while the GPU trains
    base_jobs = [(N, inst, cfg) for N in cfg["n_features"] for inst in range(cfg["inst"])]
    base_async = pool.map_async(_baseline_job, base_jobs, chunksize=1) if pool is not None else None
    if pool is not None:
        pool.close()
    blocks = Blocks(torch.from_numpy(np.concatenate(parts)))
    mix = mix_summary(words)
    phases["data"] += time.perf_counter() - t
    log(f"{n_prompts:,} prompts -> {len(blocks):,} blocks in all ({phases['data']:.0f} s of data)")

    # -- meta-training (the chapter's train_lm), with a hard stop at the budget
    model = new_model()
    train_on_answers(model, tok)   # the chapter's loss: the answer tokens only
    deadline = args.budget_s - args.eval_reserve_s + 0.5 * args.eval_reserve_s

    def guard(module, inputs):
        if module.training and time.perf_counter() - T0 > deadline:
            raise OutOfTime
    handle = model.register_forward_pre_hook(guard)
    t = time.perf_counter()
    hard_stopped = False
    try:
        hist = train_lm(model, blocks, val_blocks, TrainConfig(steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                                               eval_every=max(steps // 10, 1), seed=seed,
                                                               mixed_precision=args.mixed_precision),
                        desc=f"meta-training {count_params(model) / 1e6:.2f}M")
        train = dict(steps=hist.steps[-1] if hist.steps else 0, train_loss=[round(x, 4) for x in hist.train_loss],
                     eval_steps=hist.eval_steps, eval_loss=[round(x, 4) for x in hist.eval_loss], seconds=hist.seconds,
                     tokens=hist.tokens)
    except OutOfTime:
        hard_stopped = True
        train = dict(steps=None, train_loss=[], eval_steps=[], eval_loss=[], seconds=time.perf_counter() - t, tokens=None)
    handle.remove()
    phases["training"] = time.perf_counter() - t
    model = model.to(device).eval()
    log(f"trained {train['steps']} steps in {phases['training']:.0f} s; val loss {train['eval_loss'][:1]} -> {train['eval_loss'][-1:]}")

    # -- the chapter's check, on this machine and this transformers: scores through the cropped shared cache equal
    #    the whole prompt and query encoded in one pass (a cache silently ignored would score every K as K = 0)
    t = time.perf_counter()
    N0 = cfg["n_features"][0]
    data = linear_task(N0, 64 + 16, seed=99_999)
    pool_c, test_c = data.select(range(64)), data.select(range(64, 80))
    order_c = nested_orders(64, cfg["k_train"], [0])[0]
    kv = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(pool_c, order_c, cfg["k_train"])))
    q = torch.tensor([tok.convert_tokens_to_ids([*ex["x"], "=", *ex["y"]]) for ex in test_c], device=model.device)
    cache_err, cache_ks = 0.0, shot_counts(cfg["k_train"])
    for k in cache_ks:
        prompt = tok.convert_tokens_to_ids(build_prompt(pool_c, order_c, k))
        nll, _ = score_targets(model, kv, len(prompt), q, 1)
        with torch.no_grad():
            full = model(torch.cat([torch.tensor([prompt], device=model.device).expand(len(q), -1), q], 1)).logits[:, -2].float().log_softmax(-1)
        cache_err = max(cache_err, (nll + full.gather(1, q[:, -1:])[:, 0]).abs().max().item())
    # the evaluation's attention on this machine (the kernel on a GPU) against the model's own SDPA over the expanded cache
    kernel_err, use_kernel = 0.0, {"auto": device.type == "cuda", "on": True, "off": False}[args.kernel]
    for k in cache_ks[1:]:
        length = len(build_prompt(pool_c, order_c, k))
        a = suffix_logits(model, kv, length, q, use_kernel=use_kernel).float().log_softmax(-1)
        b = suffix_logits(model, kv, length, q, use_kernel=False).float().log_softmax(-1)
        kernel_err = max(kernel_err, (a - b).abs().max().item())
    phases["cache_check"] = time.perf_counter() - t
    log(f"shared-cache scores vs full re-encoding: max |dNLL| {cache_err:.1e} over K = {cache_ks}; "
        f"{'kernel' if use_kernel else 'SDPA'} vs SDPA log-probabilities: max |diff| {kernel_err:.1e}")

    # -- evaluation: the chapter's rows, every K of the nested shot sets, per task, instance, seed and item
    seeds = cfg["seeds"]
    out_of_time = lambda: time.perf_counter() - T0 > args.budget_s  # noqa: E731
    skipped = []

    def run_icl(name, make, n_inst, k_max, **kw):
        ks, frames = shot_counts(k_max), []
        for inst in range(n_inst):
            data = make(inst, 2 * k_max + cfg["n_test"])
            pool, test = data.select(range(2 * k_max)), data.select(range(2 * k_max, len(data)))
            df = evaluate_icl(model, tok, pool, test, nested_orders(2 * k_max, k_max, seeds), ks, use_kernel=use_kernel, **kw)
            frames.append(df.assign(inst=inst))
        return pd.concat(frames).assign(task=name)

    t = time.perf_counter()
    runs = []
    jobs = [(f"linear N={N}", (lambda i, n, N=N: linear_task(N, n, seed=10_000 + 100 * N + i)), cfg["k_eval"]) for N in cfg["n_features"]]
    jobs += [(name, (lambda i, n, labels=labels: sentiment_task(n, seed=20_000 + i, labels=labels)), cfg["k_short"])
             for name, labels in [("sentiment", ("pos", "neg")), ("sentiment flipped", ("neg", "pos")), ("sentiment abstract", ("C", "D"))]]
    jobs += [("lookup", lambda i, n: lookup_task(n, seed=30_000 + i), cfg["k_short"]),
             ("parity", lambda i, n: parity_task(cfg["parity_bits"], n, seed=40_000 + i), cfg["k_eval"])]
    for name, make, k_max in jobs:
        if out_of_time():
            skipped.append(name); continue
        runs.append(run_icl(name, make, cfg["inst"], k_max))
        log(f"ICL {name}: accuracy by K {runs[-1].groupby('k').correct.mean().round(3).to_dict()}")
    icl = pd.concat(runs, ignore_index=True)
    phases["icl"] = time.perf_counter() - t

    t = time.perf_counter()
    base = base_async.get() if base_async is not None else [_baseline_job(j) for j in base_jobs]
    if pool is not None:
        pool.join()
    base = pd.concat(base, ignore_index=True)
    phases["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    add_runs, reinforced_kept, k_add, d = {}, None, cfg["k_add"], cfg["n_digits"]
    problems = addition_task(d, 2 * k_add, seed=50_000)
    if out_of_time():
        skipped.append("addition")
    else:
        add_test = addition_task(d, cfg["add_test"], seed=50_001)
        given = addition_task(d, 2 * k_add, seed=50_000, style="given")
        sampling_prompt = build_prompt(addition_task(d, 4, seed=50_002, style="given"), range(4), 4)
        reinforced = reinforced_shots(model, tok, problems, sampling_prompt, samples=2, temperature=1.0, seed=seed)
        reinforced_kept = len(reinforced)
        k_rein = min(k_add, 2 ** int(np.log2(len(reinforced)))) if len(reinforced) else 0
        add_runs["given rationales"] = evaluate_generation(model, tok, given, add_test, nested_orders(len(given), k_add, seeds), shot_counts(k_add),
                                                           use_kernel=use_kernel)
        if k_rein >= 1 and not out_of_time():
            add_runs["Reinforced ICL"] = evaluate_generation(model, tok, reinforced, add_test, nested_orders(len(reinforced), k_rein, seeds),
                                                             shot_counts(k_rein), use_kernel=use_kernel)
        if not out_of_time():
            add_runs["Unsupervised ICL"] = evaluate_generation(model, tok, problems, add_test, nested_orders(len(problems), k_add, seeds),
                                                               shot_counts(k_add), preamble=["problems", ":"], answers=False, use_kernel=use_kernel)
        for m, df in add_runs.items():
            log(f"addition, {m}: accuracy by K {df.groupby('k').correct.mean().round(3).to_dict()}")
    phases["addition"] = time.perf_counter() - t

    t = time.perf_counter()
    k_ft, ft_rows = cfg["k_train"], []
    for inst in range(cfg["ft_inst"]):
        if out_of_time():
            skipped.append(f"fine-tuning inst {inst}"); continue
        data = linear_task(N0, 2 * cfg["k_eval"] + cfg["n_test"], seed=10_000 + 100 * N0 + inst)
        pool, test = data.select(range(2 * cfg["k_eval"])), data.select(range(2 * cfg["k_eval"], len(data)))
        order = nested_orders(2 * cfg["k_eval"], cfg["k_eval"], seeds)[seeds[0]][:k_ft]
        shots = pool.select(order)
        rng = np.random.default_rng(inst)
        ft_docs = Dataset.from_dict({"text": [" ".join(t for i in rng.permutation(k_ft) for t in shot(shots[int(i)]["x"], shots[int(i)]["y"]))
                                              for _ in range(64)]})
        ft_blocks = tokenize_blocks(ft_docs, tok, 64)
        tuned = copy.deepcopy(model).train()
        train_lm(tuned, ft_blocks, ft_blocks.select(range(8)), TrainConfig(steps=cfg["ft_steps"], batch_size=8, lr=1e-3, warmup=0,
                                                                              eval_every=cfg["ft_steps"], eval_batches=1, seed=seed),
                 desc="fine-tuning")
        tuned.eval()
        ft = evaluate_icl(tuned, tok, pool, test, {0: order}, [0], use_kernel=use_kernel)
        ic = evaluate_icl(model, tok, pool, test, {0: order}, [k_ft], use_kernel=use_kernel)
        ft_rows.append(pd.DataFrame({"inst": inst, "item": ft["item"].values, "fine-tuned (0-shot)": ft["correct"].values,
                                     f"ICL ({k_ft} shots)": ic["correct"].values}))
    ft_table = pd.concat(ft_rows, ignore_index=True) if ft_rows else pd.DataFrame()
    phases["finetune"] = time.perf_counter() - t
    phases["total"] = time.perf_counter() - T0

    import triton  # noqa: F401  (versions only; present on both machines)
    record = dict(
        script="benchmarks/train_manyshot.py", chapter="manyshot", scale="smoke" if args.smoke else "gpu",
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__, triton=sys.modules["triton"].__version__, transformers=transformers.__version__,
        python=platform.python_version(), datasets="stand-in" if SHIM else sys.modules["datasets"].__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args=vars(args), preset=cfg, mix=MIX, mix_table=mix,
        params=count_params(model), tokens=train["tokens"], steps=train["steps"], planned_steps=steps,
        calibration_ms_per_step=1e3 * step_s, hard_stopped=hard_stopped, skipped=skipped, train=train, phases=phases,
        n_prompts=n_prompts, n_blocks=len(blocks), cache_check=dict(max_abs_dnll=cache_err, ks=cache_ks, N=N0),
        loss="answers", eval_attention="shared-prefix kernel" if use_kernel else "sdpa (DynamicCache)",
        kernel_check=dict(max_abs_dlogp=kernel_err, ks=cache_ks[1:], N=N0, kernel=use_kernel),
        icl=pack_frame(icl[["task", "inst", "seed", "k", "item", "correct", "nll"]]),
        baselines=pack_frame(base[["task", "method", "inst", "seed", "k", "item", "correct"]]),
        addition={m: pack_frame(df[["seed", "k", "item", "correct"]]) for m, df in add_runs.items()},
        reinforced_kept=reinforced_kept, problems=len(problems),
        finetune=dict(N=N0, k=k_ft, steps=cfg["ft_steps"], inst=len(ft_rows), rows=pack_frame(ft_table) if len(ft_table) else None),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, separators=(",", ":")))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB); phases {({k: round(v, 1) for k, v in phases.items()})}")


if __name__ == "__main__":
    main()
