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
import math
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
from tinylab.manyshot import (addition_task, answer_labels, baseline_accuracy, build_prompt, encode_prefix,  # noqa: E402
                              evaluate_generation, evaluate_icl, score_targets, linear_task, lookup_task, meta_training_mix, nested_orders, pack_frame,
                              parity_task, reinforced_shots, sentiment_task, shot, shot_counts, suffix_logits,
                              train_on_answers, word_tokenizer)
from datasets import Dataset  # noqa: E402  (the real one, or the stand-in)

transformers.logging.set_verbosity_error()

# the chapter's presets (nbs/30_manyshot.ipynb, PRESETS["gpu"]; tests/test_train_manyshot.py checks they agree)
GPU = dict(d_model=160, n_layers=4, n_heads=8, steps=40000, batch_size=8, lr=1e-3, block_size=4096,
           k_train=32, k_eval=128, k_short=256, n_features=[8, 16, 32], n_digits=3, parity_bits=20, inst=8,
           n_test=64, seeds=[0, 1, 2, 3, 4], k_add=128, add_test=64, ft_inst=4, ft_steps=100)
# this script's meta-training on top of the preset: the chapter's mix (`mix_prompts` prompts a call, cycled) and a
# linear-classification curriculum (`curriculum_share` of each batch; N cap 2, doubling every `curriculum_octave` steps);
# AdamW as tinylab.lm.train_lm, warm-up, constant, then cosine to 10% over the last `decay_frac` of the final call
GPU_TRAIN = dict(mix_prompts=96000, curriculum_share=0.5, curriculum_octave=2000, curriculum_cap=0, warmup=500, decay_frac=0.3,
                 log_every=10, eval_every=500)
SMOKE = dict(d_model=32, n_layers=2, n_heads=4, steps=12, batch_size=4, lr=3e-3, block_size=256,
             k_train=4, k_eval=16, k_short=32, n_features=[4], n_digits=2, parity_bits=4, inst=2,
             n_test=6, seeds=[0, 1, 2], k_add=16, add_test=4, ft_inst=1, ft_steps=4)
SMOKE_TRAIN = dict(mix_prompts=400, curriculum_share=0.5, curriculum_octave=4, curriculum_cap=0, warmup=3, decay_frac=0.3,
                   log_every=1, eval_every=6)
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


# ---------------------------------------------------------------------------------------------------------------
# the linear-classification curriculum (rows of fresh task instances, N growing with the step)
def n_cap(step: int, cfg: dict) -> int:
    "The largest N of the curriculum at `step`: 2, doubling every `curriculum_octave` steps, up to `curriculum_cap` (0: the preset's largest N)."
    return int(min(cfg.get("curriculum_cap") or max(cfg["n_features"]), 2 * 2 ** (step / cfg["curriculum_octave"])))


def linear_rows(rng: np.random.Generator, n_rows: int, block: int, cap: int, k_train: int, tok) -> tuple[np.ndarray, np.ndarray]:
    """`n_rows` token rows of length `block`, each `<|endoftext|>`-separated prompts of the chapter's linear
    classification format (`linear_task` + `shot`: integer features in [-5, 5], `=`, `A`/`B`, `|`), one fresh
    hyperplane w ~ N(0, I) per prompt, K ~ U{1..k_train} shots a prompt; one N a row, floor(2^u) for u ~ U[0, log2(cap) + 1), capped at `cap` (about equal
    shares per octave).
    Returns the rows (uint8) and each row's N."""
    vals = np.asarray(tok.convert_tokens_to_ids([str(v) for v in range(-5, 6)]))
    eq, bar, a_, b_ = tok.convert_tokens_to_ids(["=", "|", "A", "B"])
    eos = tok.eos_token_id
    rows, ns = np.empty((n_rows, block), dtype=np.uint8), np.empty(n_rows, dtype=np.int64)
    for r in range(n_rows):
        N = int(min(cap, np.floor(2 ** rng.uniform(0, np.log2(cap) + 1))))
        L = N + 3
        ks = []
        while sum(k * L + 1 for k in ks) < block:
            ks.append(int(rng.integers(1, k_train + 1)))
        ks = np.asarray(ks)
        M = int(ks.sum())
        X = rng.integers(-5, 6, (M, N))
        W = rng.standard_normal((len(ks), N))
        y = (X * W[np.repeat(np.arange(len(ks)), ks)]).sum(1) > 0
        shots = np.concatenate([vals[X + 5], np.full((M, 1), eq), np.where(y, a_, b_)[:, None], np.full((M, 1), bar)], 1)
        stream = np.insert(shots.ravel(), np.cumsum(ks)[:-1] * L, eos)
        rows[r] = np.concatenate([[eos], stream])[:block]
        ns[r] = N
    return rows, ns


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    """Model weights (fp32) and AdamW's moments (bf16, to stay small) by parameter name, plus `state` (step, history,
    timings) as JSON metadata, in one safetensors file."""
    from safetensors.torch import save_file
    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"model.{name}"] = p.detach().float().cpu().contiguous()
        st = opt.state.get(p, {})
        if "exp_avg" in st:
            tensors[f"adam_m.{name}"] = st["exp_avg"].detach().to(torch.bfloat16).cpu().contiguous()
            tensors[f"adam_v.{name}"] = st["exp_avg_sq"].detach().to(torch.bfloat16).cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"state": json.dumps(state)})


def checkpoint_state(path: Path) -> dict:
    "The `state` (step, history, calls so far) a checkpoint of `save_checkpoint` carries, without loading its tensors."
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def load_checkpoint(path: Path, model, opt) -> dict:
    "Restore what `save_checkpoint` wrote into `model` and `opt` (moments back to fp32); returns its `state`."
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        names = set(f.keys())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(f.get_tensor(f"model.{name}").to(p.device))
                if f"adam_m.{name}" in names:
                    opt.state[p] = {"step": torch.tensor(float(state["step"])),
                                    "exp_avg": f.get_tensor(f"adam_m.{name}").float().to(p.device),
                                    "exp_avg_sq": f.get_tensor(f"adam_v.{name}").float().to(p.device)}
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole run (this call), seconds")
    p.add_argument("--eval-reserve-s", type=float, default=200.0, help="seconds kept for the evaluation after training")
    p.add_argument("--steps", type=int, default=None, help="stop training at this global step (default: the time budget decides)")
    p.add_argument("--ckpt-out", default=None,
                   help="a call that does not end meta-training: train for the whole budget, save the checkpoint here, "
                        "write a small progress JSON to --out, and skip the evaluation")
    p.add_argument("--resume", default=None, help="a later call: continue meta-training from this checkpoint (then evaluate, "
                                                  "unless --ckpt-out names the next checkpoint)")
    p.add_argument("--workers", type=int, default=None, help="processes for the data (default: 4 on a GPU)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for the tests)")
    p.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                   help="the evaluation's attention: auto = the shared-prefix kernel on a GPU, SDPA elsewhere; on = the kernel "
                        "(on a CPU only under TRITON_INTERPRET=1, to test the path); off = SDPA over the expanded cache")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override meta-training settings of GPU_TRAIN (e.g. curriculum_octave=3000 lr=5e-4); recorded in args")
    args = p.parse_args(argv)
    cfg = {**SMOKE, **SMOKE_TRAIN} if args.smoke else {**GPU, **GPU_TRAIN}
    for kv in args.set:
        key, value = kv.split("=", 1)
        if key not in {**GPU_TRAIN, "lr": 0}:
            raise SystemExit(f"--set: {key!r} is not a meta-training setting ({sorted(GPU_TRAIN) + ['lr']})")
        cfg[key] = type(cfg[key])(float(value)) if isinstance(cfg[key], (int, float)) else value
    if args.smoke and args.steps is None:
        args.steps = cfg["steps"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    workers = args.workers or (1 if args.smoke else min(4, os.cpu_count() or 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    phases, seed = {}, args.seed
    final = args.ckpt_out is None                       # this call ends meta-training (and evaluates)
    call = 1 + len(checkpoint_state(Path(args.resume))["calls"]) if args.resume else 1   # each call draws new data
    seed_everything(seed + 1000 * (call - 1))
    tok = word_tokenizer()
    log(f"device {device}, datasets {'stand-in' if SHIM else 'package'}, workers {workers}, call {call}"
        f"{' (resumes ' + args.resume + ')' if args.resume else ''}, preset {cfg}")

    # -- data: the chapter's mix (meta_training_mix -> tokenize_blocks) made in processes forked before CUDA starts,
    #    while the GPU already trains on the curriculum's rows; the classical baselines run there too (final call)
    t = time.perf_counter()
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers)
    n_mix = cfg["mix_prompts"]
    first_chunk = 10_000 * (call - 1)                  # each call's mix is new task instances
    n_chunks = max(1, workers, n_mix // 4000)
    jobs = [(n_mix // n_chunks, 1000 * (seed + 1) + first_chunk + c, cfg) for c in range(n_chunks)]
    mix_async = pool.map_async(_chunk, jobs, chunksize=1) if pool is not None else None
    base_jobs = [(N, inst, cfg) for N in cfg["n_features"] for inst in range(cfg["inst"])]
    base_async = pool.map_async(_baseline_job, base_jobs, chunksize=1) if pool is not None and final else None
    if pool is not None:
        pool.close()
    val_docs = meta_training_mix(300, cfg["k_train"], MIX, seed=seed + 1, n_features=cfg["n_features"], n_digits=[cfg["n_digits"]])
    val_blocks = torch.tensor(tokenize_blocks(val_docs, tok, cfg["block_size"]).with_format(None)["input_ids"], dtype=torch.long)
    mix_blocks, words = None, []
    if mix_async is None:
        parts = [_chunk(j) for j in jobs]
        mix_blocks, words = torch.from_numpy(np.concatenate([b for b, _ in parts])), [w for _, w in parts]
    phases["data"] = time.perf_counter() - t

    # -- the model, new or resumed, and the optimizer of tinylab.lm.train_lm (AdamW, betas 0.9/0.95, decay on matrices)
    from tinylab.lm import _param_groups
    model = build_model(tiny_config("llama", vocab_size=len(tok), d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                                    n_heads=cfg["n_heads"], block_size=8192, tokenizer=tok), seed=seed).to(device)
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=cfg["lr"], betas=(0.9, 0.95))
    state = dict(step=0, train_loss=[], eval_steps=[], eval_loss=[], probe=[], seconds=0.0, tokens=0, calls=[],
                 mix_words=[], curriculum_rows=0, mix_rows=0)
    if args.resume:
        state = load_checkpoint(Path(args.resume), model, opt)
        for c in state["calls"]:   # checkpoints of the first version did not record their curriculum: it was GPU_TRAIN's
            if "curriculum_octave" not in c:
                c.update(set=[], curriculum_octave=GPU_TRAIN["curriculum_octave"], curriculum_cap=GPU_TRAIN["curriculum_cap"],
                         curriculum_share=GPU_TRAIN["curriculum_share"],
                         n_cap_end=n_cap(c["steps"], {**cfg, "curriculum_octave": GPU_TRAIN["curriculum_octave"], "curriculum_cap": 0}))
        log(f"resumed at step {state['step']} ({state['seconds']:.0f} s of training so far)")
    eq_id, bar_id, a_id, b_id = tok.convert_tokens_to_ids(["=", "|", "A", "B"])

    @torch.no_grad()
    def validate(step):
        model.eval()
        losses = []
        for i in range(0, min(len(val_blocks), cfg["batch_size"] * 4), cfg["batch_size"]):
            ids = val_blocks[i:i + cfg["batch_size"]].to(device)
            losses.append(model(input_ids=ids, labels=answer_labels(ids, eq_id, bar_id, tok.eos_token_id)).loss.item())
        model.train()
        state["eval_steps"].append(step); state["eval_loss"].append(round(float(np.mean(losses)), 4))

    # -- meta-training: answer-token loss (the chapter's answer_labels); each batch = rows of the linear curriculum
    #    (fresh instances, N growing with the step) + blocks of the chapter's mix once they are ready
    train_end = args.budget_s - (0 if not final else args.eval_reserve_s)
    rng, mix_rng = np.random.default_rng(seed + 7919 * call), np.random.default_rng(seed + 104_729 * call)
    n_cur = max(1, round(cfg["curriculum_share"] * cfg["batch_size"]))
    warmup, decay_from = cfg["warmup"], None
    t = time.perf_counter()
    t_loop = t
    call_steps, hard_stopped = 0, False
    probe_acc, probe_n = {}, {}
    # the curriculum's rows are made in a thread, ahead of the GPU (numpy; the main thread mostly waits on CUDA)
    import queue
    import threading
    rows_q, stop_evt = queue.Queue(maxsize=16), threading.Event()
    next_step, mix_ready = [state["step"] + 1], threading.Event()
    def producer():
        while not stop_evt.is_set():
            cap_ = n_cap(next_step[0], cfg)
            item = (cap_, *linear_rows(rng, n_cur if mix_ready.is_set() else cfg["batch_size"], cfg["block_size"], cap_, cfg["k_train"], tok))
            while not stop_evt.is_set():
                try:
                    rows_q.put(item, timeout=0.1); break
                except queue.Full:
                    pass
    if mix_blocks is not None:
        mix_ready.set()
    threading.Thread(target=producer, daemon=True).start()
    if state["step"] == 0:
        validate(0)
    model.train()
    while True:
        now = time.perf_counter()
        if args.steps is not None and state["step"] >= args.steps:
            break
        if args.steps is None and now - T0 > train_end:
            break
        if mix_blocks is None and mix_async is not None and mix_async.ready():
            parts = mix_async.get()
            mix_blocks, words = torch.from_numpy(np.concatenate([b for b, _ in parts])), [w for _, w in parts]
            mix_ready.set()
            log(f"the chapter's mix is ready: {n_mix:,} prompts -> {len(mix_blocks):,} blocks ({now - t:.0f} s, step {state['step']})")
        step = state["step"] + 1
        # learning rate: warm-up, constant, then (final call) cosine to 10% over the last `decay_frac` of its training time
        lr = cfg["lr"] * min(1.0, step / warmup)
        if final:
            frac = (now - t_loop) / max(1e-9, train_end - (t_loop - T0)) if args.steps is None else call_steps / max(1, args.steps - state["step"] + call_steps)
            if frac > 1 - cfg["decay_frac"]:
                decay_from = decay_from or step
                q = min(1.0, (frac - (1 - cfg["decay_frac"])) / cfg["decay_frac"])
                lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q))
        for g in opt.param_groups:
            g["lr"] = lr
        next_step[0] = step
        cap, rows, ns = rows_q.get()
        n_lin = min(len(rows), n_cur if mix_blocks is not None else cfg["batch_size"])
        rows, ns = rows[:n_lin], ns[:n_lin]
        ids = torch.from_numpy(rows).long()
        if n_lin < cfg["batch_size"]:
            pick = torch.from_numpy(mix_rng.integers(0, len(mix_blocks), cfg["batch_size"] - n_lin))
            ids = torch.cat([ids, mix_blocks[pick].long()])
            state["mix_rows"] += cfg["batch_size"] - n_lin
        state["curriculum_rows"] += n_lin
        ids = ids.to(device, non_blocking=True)
        labels = answer_labels(ids, eq_id, bar_id, tok.eos_token_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            logits = model(input_ids=ids).logits
        lg, tg = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        state["step"] = step; call_steps += 1
        state["tokens"] += ids.numel()
        # the probe: label accuracy of the curriculum rows' linear shots in the second half of each row, by N
        with torch.no_grad():
            lab = tg[:n_lin]
            is_lbl = (lab == a_id) | (lab == b_id)
            is_lbl[:, : cfg["block_size"] // 2] = False
            ok = ((lg[:n_lin, :, [a_id, b_id]].argmax(-1) == (lab == b_id).long()) & is_lbl).sum(1)
            cnt = is_lbl.sum(1)
        if step % cfg["log_every"] == 0 or step == 1:
            state["train_loss"].append([step, round(loss.item(), 4), round(lr, 6), cap])
        for nn_, o, c in zip(ns.tolist(), ok.tolist(), cnt.tolist()):
            b = "N<=4" if nn_ <= 4 else "N=5-15" if nn_ < 16 else "N>=16"
            probe_acc[b] = probe_acc.get(b, 0) + o; probe_n[b] = probe_n.get(b, 0) + c
        if step % cfg["eval_every"] == 0:
            validate(step)
            pr = {b: round(probe_acc[b] / max(1, probe_n[b]), 3) for b in sorted(probe_acc)}
            state["probe"].append([step, pr])
            probe_acc, probe_n = {}, {}
            log(f"step {step}: loss {loss.item():.4f}, val {state['eval_loss'][-1]:.4f}, lr {lr:.2e}, N cap {cap}, "
                f"probe (2nd-half label acc.) {pr}, {1e3 * (time.perf_counter() - t_loop) / call_steps:.1f} ms/step")
    stop_evt.set()
    state["seconds"] += time.perf_counter() - t_loop
    state["calls"].append(dict(call=call, steps=call_steps, seconds=round(time.perf_counter() - t_loop, 1),
                               ms_per_step=round(1e3 * (time.perf_counter() - t_loop) / max(1, call_steps), 2),
                               decay_from=decay_from, set=list(args.set), curriculum_octave=cfg["curriculum_octave"],
                               curriculum_cap=cfg["curriculum_cap"], curriculum_share=cfg["curriculum_share"], n_cap_end=n_cap(state["step"], cfg), device=torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"))
    if mix_blocks is None and mix_async is not None:      # training was shorter than the mix's making (smoke)
        parts = mix_async.get()
        words = [w for _, w in parts]
    state["mix_words"] += words
    phases["training"] = time.perf_counter() - t
    if state["step"] % cfg["eval_every"]:
        validate(state["step"])
    log(f"trained {call_steps} steps in this call ({state['step']} in all) in {phases['training']:.0f} s; "
        f"val loss {state['eval_loss'][:1]} -> {state['eval_loss'][-1:]}; probe {state['probe'][-1:]}")

    if not final:
        save_checkpoint(Path(args.ckpt_out), model, opt, state)
        progress = dict(script="benchmarks/train_manyshot.py", chapter="manyshot", part=f"call {call} (meta-training only)",
                        device=state["calls"][-1]["device"], torch=torch.__version__, transformers=transformers.__version__,
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args=vars(args), preset=cfg,
                        params=count_params(model), phases=phases, **{k: state[k] for k in ("step", "eval_steps", "eval_loss", "probe", "calls")})
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(progress, separators=(",", ":")))
        if pool is not None:
            pool.terminate()
        log(f"saved {args.ckpt_out} ({Path(args.ckpt_out).stat().st_size / 2**20:.2f} MiB) and {out}")
        return
    model = model.eval()
    hist_steps = [s for s, *_ in state["train_loss"]]
    train = dict(steps=state["step"], train_loss=[l for _, l, *_ in state["train_loss"]], train_steps=hist_steps,
                 lr=[r for _, _, r, _ in state["train_loss"]], n_cap=[c for *_, c in state["train_loss"]],
                 eval_steps=state["eval_steps"], eval_loss=state["eval_loss"], seconds=state["seconds"],
                 tokens=state["tokens"], probe=state["probe"], calls=state["calls"])
    steps = state["step"]
    mix = mix_summary(state["mix_words"])
    n_prompts, n_blocks = n_mix * len(state["calls"]), state["mix_rows"] + state["curriculum_rows"]

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
    # where a kernel-vs-SDPA difference comes from (GPU): the same comparison with the model's matmuls in IEEE fp32
    # instead of TF32, and each path against a float64 run of the whole model (SDPA, math backend) as the reference
    precision = None
    if use_kernel and (device.type == "cuda" or os.environ.get("TINYLAB_TEST_PRECISION") == "1"):
      try:
        def set_tf32(on):
            torch.backends.cuda.matmul.allow_tf32 = on
            torch.backends.cudnn.allow_tf32 = on
        model64 = copy.deepcopy(model).double()
        kv64 = encode_prefix(model64, tok.convert_tokens_to_ids(build_prompt(pool_c, order_c, cfg["k_train"])))
        precision = {}
        for tf32 in (True, False):
            set_tf32(tf32)
            kv32 = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(pool_c, order_c, cfg["k_train"])))
            e = dict(kernel_vs_sdpa=0.0, kernel_vs_fp64=0.0, sdpa_vs_fp64=0.0, label_nll_kernel_vs_sdpa=0.0)
            for k in cache_ks[1:]:
                length = len(build_prompt(pool_c, order_c, k))
                a = suffix_logits(model, kv32, length, q, use_kernel=True).double().log_softmax(-1)
                b = suffix_logits(model, kv32, length, q, use_kernel=False).double().log_softmax(-1)
                r = suffix_logits(model64, kv64, length, q, use_kernel=False).log_softmax(-1)
                e["kernel_vs_sdpa"] = max(e["kernel_vs_sdpa"], (a - b).abs().max().item())
                e["kernel_vs_fp64"] = max(e["kernel_vs_fp64"], (a - r).abs().max().item())
                e["sdpa_vs_fp64"] = max(e["sdpa_vs_fp64"], (b - r).abs().max().item())
                lbl = q[:, -1:]
                e["label_nll_kernel_vs_sdpa"] = max(e["label_nll_kernel_vs_sdpa"],
                                                    (a[:, -2].gather(1, lbl) - b[:, -2].gather(1, lbl)).abs().max().item())
            e["max_abs_logprob_fp64"] = r.abs().max().item()
            precision["tf32" if tf32 else "ieee"] = e
        set_tf32(True)
        del model64, kv64
        log(f"precision of the kernel check: {precision}")
      except Exception as exc:   # a diagnosis only: never lose the run to it
        set_tf32(True) if "set_tf32" in locals() else None
        precision = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"precision check failed: {precision['error']}")
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
    add_runs, reinforced_kept, k_add, d = {}, None, cfg["k_add"], cfg["n_digits"]
    problems = addition_task(d, 2 * k_add, seed=50_000)
    def write_record(add_runs, reinforced_kept, skipped):
        phases["total"] = time.perf_counter() - T0

        import triton  # noqa: F401  (versions only; present on both machines)
        record = dict(
            script="benchmarks/train_manyshot.py", chapter="manyshot", scale="smoke" if args.smoke else "gpu",
            device=torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            torch=torch.__version__, triton=sys.modules["triton"].__version__, transformers=transformers.__version__,
            python=platform.python_version(), datasets="stand-in" if SHIM else sys.modules["datasets"].__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args=vars(args), preset=cfg, mix=MIX, mix_table=mix,
            params=count_params(model), tokens=train["tokens"], steps=train["steps"], calls=state["calls"],
            ms_per_step=[c["ms_per_step"] for c in state["calls"]], hard_stopped=hard_stopped, skipped=skipped, train=train, phases=phases,
            curriculum=dict(share=cfg["curriculum_share"], octave=cfg["curriculum_octave"], rows=state["curriculum_rows"], mix_rows=state["mix_rows"],
                            n_cap_final=n_cap(steps, cfg), format="the chapter's linear_task + shot format, fresh hyperplane per prompt, "
                            "one N a row log-uniform on [1, N cap], N cap = 2 doubling every `octave` steps"),
            n_prompts=n_prompts, n_blocks=n_blocks, cache_check=dict(max_abs_dnll=cache_err, ks=cache_ks, N=N0),
            loss="answers", eval_attention="shared-prefix kernel" if use_kernel else "sdpa (DynamicCache)",
            kernel_check=dict(max_abs_dlogp=kernel_err, ks=cache_ks[1:], N=N0, kernel=use_kernel, precision=precision),
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

    # a record without addition first, so a call stopped during the (slowest) addition part still leaves every other row
    write_record({}, None, skipped + ["addition (not reached yet)"])
    t = time.perf_counter()
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

    write_record(add_runs, reinforced_kept, skipped)


if __name__ == "__main__":
    main()
