"""The SSM chapter's recorded GPU rows (nbs/10_ssm.ipynb): Mamba's Table 1 (selective copying) and Table 2 (induction-heads
extrapolation) as far as one shared H200 and a few minutes allow, with the chapter's own models (tinylab.ssm: SSMLM on the
Mamba block, selective S6 through the Triton selective scan, or the LTI S4D layer; `gate=False` is the paper's "no gate"
architecture) and, for induction heads, a matched-size attention model (a Llama with rotary positions, tinylab.lm's config).

Selective copying follows the paper's setting as the chapter quotes it (Mamba, arXiv 2312.00752v2, Table 1 / appendix):
context 4096, 16 tokens to copy, 16 token ids (noise, marker and 14 colours), 2 layers, d_model 64. The paper trains
400K steps at lr 1e-4, batch 64; this run cannot, so it trains at a higher lr with a smaller batch until the held-out
accuracy plateaus (or the time budget ends), records the curve, and saves a checkpoint that a later run resumes from
(--resume). A second length (1024) is run for the two Mamba-block models as a fallback that surely fits.
The first H200 run (batch 1, kept as book/results/ssm_h200_batch1.json) left every model near guessing: S6 made a few
hundred steps while its backward's PyTorch scan (chunks of 64 steps) shared the GPU with many processes. The settings
now use chunks of 512 (256 for induction heads), larger batches and a higher learning rate, and the plateau rule waits
longer (induction heads learn after a long flat phase). The recorded run (book/results/ssm_h200.json) is batch 2, with
the two S6 selective-copying jobs resumed in a batch 3 with only the two of them on the GPU (416 ms/step at context
4096, against 1,230 ms/step beside seven other jobs): sharing the GPU, not kernel launches, was the main cost.

Induction heads (Table 2): trained at 256 tokens (vocab 16 plus the trigger), evaluated at 2^6 .. 2^16 tokens (2^14 for
attention, whose eager-free SDPA still pays T^2 time); per held-out example 0/1 scores are kept so the chapter can
bootstrap.

Each (task, model) trains in its own process (the GPU script starts them together and `merge` writes the JSON):
  PYTHONPATH=. python3 benchmarks/train_ssm.py train --job copy4096:s6 --work W --budget-s 360
  PYTHONPATH=. python3 benchmarks/train_ssm.py merge --work W --out $OUT/ssm/ssm_h200.json --tar $OUT/ssm/ssm_ckpt.tar.gz
CPU check (well under a minute):  python benchmarks/train_ssm.py smoke --out /tmp/ssm_smoke.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tarfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__" and ("smoke" in sys.argv[1:2] or "--smoke" in sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tinylab.ssm import SSMLM, induction_heads, selective_copying  # noqa: E402

# the models: (label, SSMLM keyword arguments or "attention")
MODELS = {
    "s6": ("S6, Mamba block", dict(mixer="selective")),
    "s4d": ("S4D, Mamba block (gated LTI)", dict(mixer="s4d")),
    "s6_nogate": ("S6, no gate", dict(mixer="selective", gate=False)),
    "s4d_nogate": ("S4D, no gate", dict(mixer="s4d", gate=False)),
    "attn": ("attention (Llama, RoPE)", "attention"),
}
# the settings; smoke sizes replace them on the CPU
TASKS = {
    "copy4096": dict(task="copy", copy_len=4096, copy_tokens=16, copy_vocab=14, batch=16, lr=5e-3, n_eval=512, eval_every=100,
                     d_model=64, n_layers=2, d_state=16, warmup=200, min_steps=8000, patience=40, max_steps=400_000, chunk=512),
    "copy1024": dict(task="copy", copy_len=1024, copy_tokens=16, copy_vocab=14, batch=32, lr=5e-3, n_eval=512, eval_every=100,
                     d_model=64, n_layers=2, d_state=16, warmup=200, min_steps=8000, patience=40, max_steps=400_000, chunk=512),
    "induction": dict(task="induction", seq_len=256, vocab=16, batch=128, lr=2e-3, n_eval=256, eval_every=100,
                      d_model=64, n_layers=2, d_state=16, warmup=200, min_steps=8000, patience=40, max_steps=400_000, chunk=256,
                      test_lengths=[2 ** k for k in range(6, 17)], attn_max_len=2 ** 14, eval_tokens=2 ** 20),
}
SMOKE = {
    "copy4096": dict(copy_len=24, copy_tokens=4, copy_vocab=6, batch=8, n_eval=32, eval_every=5, d_model=16, d_state=4,
                     warmup=2, min_steps=10, patience=3, max_steps=12, chunk=8),
    "copy1024": dict(copy_len=16, copy_tokens=4, copy_vocab=6, batch=8, n_eval=32, eval_every=5, d_model=16, d_state=4,
                     warmup=2, min_steps=10, patience=3, max_steps=12),
    "induction": dict(seq_len=16, vocab=6, batch=8, n_eval=32, eval_every=5, d_model=16, d_state=4, warmup=2, min_steps=10,
                      patience=3, max_steps=12, test_lengths=[8, 16, 32], attn_max_len=32, eval_tokens=2 ** 12),
}
JOBS = ["copy4096:s6", "copy4096:s4d", "copy4096:s6_nogate", "copy4096:s4d_nogate", "copy1024:s6", "copy1024:s4d",
        "induction:s6", "induction:s4d", "induction:attn"]


def setting(task_key: str, smoke: bool) -> dict:
    cfg = dict(TASKS[task_key])
    if smoke:
        cfg.update(SMOKE[task_key])
    return cfg


def make_batch(cfg: dict, n: int, g: torch.Generator, length: int | None = None):
    if cfg["task"] == "copy":
        return selective_copying(n, cfg["copy_len"], cfg["copy_tokens"], cfg["copy_vocab"], g)
    return induction_heads(n, length or cfg["seq_len"], cfg["vocab"], g)


def vocab_of(cfg: dict) -> int:
    return cfg["copy_vocab"] + 2 if cfg["task"] == "copy" else cfg["vocab"] + 1


def block_of(cfg: dict) -> int:
    return cfg["copy_len"] + cfg["copy_tokens"] if cfg["task"] == "copy" else cfg["seq_len"]


def attention_model(vocab: int, cfg: dict, target_params: int, seed: int):
    "A Llama (tinylab.lm's tiny_config) whose MLP width matches `target_params`, with SDPA attention."
    try:
        from tinylab.lm import build_model, tiny_config
    except ImportError:  # the GPU image has no `datasets`: the many-shot script's stand-in
        import importlib.util
        spec = importlib.util.spec_from_file_location("train_manyshot", ROOT / "benchmarks" / "train_manyshot.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.install_datasets_shim()
        from tinylab.lm import build_model, tiny_config
    d, L = cfg["d_model"], cfg["n_layers"]
    lc = tiny_config(vocab_size=vocab, d_model=d, n_layers=L, n_heads=max(2, d // 16), block_size=block_of(cfg),
                     attn_implementation="sdpa")
    base = sum(p.numel() for p in build_model(lc).parameters()) - 3 * d * lc.intermediate_size * L
    lc.intermediate_size = max(8, round((target_params - base) / (3 * d * L)))
    return build_model(lc, seed=seed)


def build(model_key: str, cfg: dict, seed: int, device):
    vocab = vocab_of(cfg)
    torch.manual_seed(seed)
    kind = MODELS[model_key][1]
    if kind == "attention":
        torch.manual_seed(seed)
        ref = SSMLM(vocab, cfg["d_model"], cfg["n_layers"], d_state=cfg["d_state"], mixer="selective")
        target = sum(p.numel() for p in ref.parameters())
        model = attention_model(vocab, cfg, target, seed)
    else:
        # chunk: steps per chunk of the backward's PyTorch scan; long chunks mean few kernel launches (batch 1 was launch-bound)
        model = SSMLM(vocab, cfg["d_model"], cfg["n_layers"], d_state=cfg["d_state"], chunk=cfg.get("chunk", 64), **kind)
    return model.to(device)


def logits_of(model, ids):
    out = model(ids) if isinstance(model, SSMLM) else model(input_ids=ids)
    return out if torch.is_tensor(out) else out.logits


@torch.no_grad()
def item_scores(model, x, y, device, batch: int) -> np.ndarray:
    "Per example, the fraction of its scored positions (targets != -100) predicted exactly."
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        mask = yb != -100
        pred = logits_of(model, xb).argmax(-1)
        out.append((((pred == yb) & mask).sum(1) / mask.sum(1)).float().cpu().numpy())
    model.train()
    return np.concatenate(out)


def eval_batch(cfg: dict, length: int) -> int:
    return max(1, min(256, cfg.get("eval_tokens", 2 ** 20) // max(1, length)))


def versions() -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), cuda=torch.version.cuda)
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            info[name] = f"unavailable ({type(e).__name__})"
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return info


def train_job(job: str, work: Path, budget_s: float, smoke: bool, resume: Path | None, seed: int = 0,
              eval_budget_s: float = 40.0) -> dict:
    t_job = time.perf_counter()
    task_key, model_key = job.split(":")
    cfg = setting(task_key, smoke)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = job.replace(":", "__")
    model = build(model_key, cfg, seed, device)
    if smoke and isinstance(model, SSMLM) and model.blocks[0].mixer == "selective":
        # on a CPU "auto" is the sequential reference; check the Triton path (its interpreter) on one short forward
        xs = make_batch(cfg, 2, torch.Generator().manual_seed(1))[0][:, :12]
        with torch.no_grad():
            ref = model(xs)
            for blk in model.blocks:
                blk.backend = "triton"
            tri = model(xs)
            for blk in model.blocks:
                blk.backend = "auto"
        torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    # constant lr after a linear warm-up: the run ends on a plateau or on the clock, not at a planned step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]))
    g = torch.Generator().manual_seed(seed + 1000)
    hist = {"step": [], "acc": [], "loss_step": [], "loss": [], "wall_s": []}
    step, resumed_from, wall_before = 0, None, 0.0
    ck = (resume / f"{name}.pt") if resume else None
    if ck is not None and ck.exists():
        state = torch.load(ck, map_location=device, weights_only=False)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        g.set_state(state["gen"].cpu()); hist = state["hist"]; step = state["step"]; wall_before = state.get("train_s", 0.0)
        resumed_from = dict(path=str(ck), step=step)
    eval_x, eval_y = make_batch(cfg, cfg["n_eval"], torch.Generator().manual_seed(12345))
    ebatch = eval_batch(cfg, eval_x.shape[1])
    params = sum(p.numel() for p in model.parameters())
    print(f"[{job}] {MODELS[model_key][0]}: {params} params, device {device}, start step {step}", flush=True)

    def plateau_reason():
        acc = hist["acc"]
        if len(acc) >= 3 and min(acc[-3:]) >= 0.995:
            return "solved (3 evaluations >= 99.5%)"
        P = cfg["patience"]
        if step >= cfg["min_steps"] and len(acc) > P and max(acc[-P:]) <= max(acc[:-P]) + 0.01:
            return f"plateau (best of the last {P} evaluations not 1 point above the earlier best)"
        return None

    def save(reason):
        state = dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), gen=g.get_state(), hist=hist,
                     step=step, train_s=wall_before + train_s, job=job, cfg=cfg, reason=reason)
        torch.save(state, work / f"{name}.pt")

    if not hist["step"]:
        s = item_scores(model, eval_x, eval_y, device, ebatch)
        hist["step"].append(0); hist["acc"].append(float(s.mean())); hist["wall_s"].append(0.0)
    t0 = time.perf_counter()
    train_s, reason, losses = 0.0, None, []
    step_times = []
    while True:
        if step >= cfg["max_steps"]:
            reason = "max_steps"; break
        if time.perf_counter() - t0 > budget_s:
            reason = "time budget"; break
        ts = time.perf_counter()
        x, y = make_batch(cfg, cfg["batch"], g)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = logits_of(model, x)
        mask = y != -100
        loss = F.cross_entropy(logits[mask], y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        step += 1
        losses.append(loss.detach())
        if step % cfg["eval_every"] == 0:
            scores = item_scores(model, eval_x, eval_y, device, ebatch)
            train_s = time.perf_counter() - t0
            hist["step"].append(step); hist["acc"].append(float(scores.mean()))
            hist["loss"].append(float(torch.stack(losses).mean())); hist["loss_step"].append(step); losses = []
            hist["wall_s"].append(wall_before + train_s)
            step_times.append(time.perf_counter() - ts)
            if len(hist["step"]) % 10 == 0 or smoke:
                print(f"[{job}] step {step} acc {hist['acc'][-1]:.3f} loss {hist['loss'][-1]:.3f} {train_s:.0f}s", flush=True)
            reason = plateau_reason()
            if reason:
                break
            if len(hist["step"]) % 5 == 0:
                save(None)
    train_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    save(reason)
    final = item_scores(model, eval_x, eval_y, device, ebatch)
    row = dict(job=job, task=task_key, model=MODELS[model_key][0], model_key=model_key, params=params, steps=step,
               stop=reason, plateau=bool(reason and reason != "time budget" and reason != "max_steps"),
               final_acc=float(final.mean()), best_acc=float(max(hist["acc"] + [float(final.mean())])), items=[round(float(v), 4) for v in final],
               curve={k: hist[k] for k in ("step", "acc", "wall_s")}, loss_curve={"step": hist["loss_step"], "loss": hist["loss"]},
               train_s=wall_before + train_s, this_run_train_s=train_s, resumed_from=resumed_from,
               ms_per_step=1000 * train_s / max(1, step - (resumed_from or {}).get("step", 0)),
               peak_mem_MB=(torch.cuda.max_memory_allocated() / 2 ** 20) if device.type == "cuda" else None, setting=cfg)
    if cfg["task"] == "induction":
        t_eval, ext, ext_items, ext_n = time.perf_counter(), {}, {}, {}
        cap = cfg["attn_max_len"] if model_key == "attn" else max(cfg["test_lengths"])
        for L in cfg["test_lengths"]:
            if L > cap:
                ext[str(L)] = None; continue
            if time.perf_counter() - t_eval > eval_budget_s:
                ext[str(L)] = None; continue
            n = cfg["n_eval"] if L <= 2 ** 14 else max(16, cfg["n_eval"] // 4)
            xl, yl = make_batch(cfg, n, torch.Generator().manual_seed(777 + L), length=L)
            try:
                eb = max(1, min(256, 2 ** 16 // L)) if model_key == "attn" else eval_batch(cfg, L)  # a T x T mask stays small
                sc = item_scores(model, xl, yl, device, eb)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache(); ext[str(L)] = None; continue
            ext[str(L)] = float(sc.mean()); ext_items[str(L)] = [int(round(v)) for v in sc]; ext_n[str(L)] = n
        row.update(extrapolation=ext, extrapolation_items=ext_items, extrapolation_n=ext_n,
                   extrapolation_s=time.perf_counter() - t_eval)
    row["job_s"] = time.perf_counter() - t_job
    (work / f"{name}.json").write_text(json.dumps(row))
    print(f"[{job}] done: {step} steps, final {row['final_acc']:.3f}, best {row['best_acc']:.3f}, stop: {reason}, "
          f"{row['ms_per_step']:.0f} ms/step", flush=True)
    return row


def merge(work: Path, out: Path, tar: Path | None, args: dict, t_start: float | None = None) -> dict:
    rows, errors = [], []
    ran = [job for job in JOBS if (work / f"{job.replace(':', '__')}.json").exists() or (work / f"{job.replace(':', '__')}.log").exists()]
    for job in ran:  # the jobs this run started (each leaves a log or a result)
        p = work / f"{job.replace(':', '__')}.json"
        if p.exists():
            rows.append(json.loads(p.read_text()))
        else:
            log = work / f"{job.replace(':', '__')}.log"
            errors.append(dict(job=job, error="no result", log_tail=log.read_text()[-1500:] if log.exists() else None))
    res = dict(versions(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("TINYLAB_COMMIT"), script="benchmarks/train_ssm.py", args=args,
               settings={k: TASKS[k] for k in TASKS}, jobs=ran, rows=rows, errors=errors,
               paper=dict(table1={"no gate": {"S4": 18.3, "S6": 97.0}, "H3": {"S4": 57.0, "S6": 99.7},
                                  "Mamba": {"S4": 56.4, "S6": 99.8}},
                          table1_setting="context 4096, 16 tokens, vocab 16, 2 layers, D 64, 400K steps, lr 1e-4, batch 64",
                          table2_setting="induction heads, trained at 256 tokens, tested to 2^20"))
    if t_start is not None:
        res["wall_s"] = time.time() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if tar is not None:
        with tarfile.open(tar, "w:gz") as tf:
            for p in sorted(work.glob("*.pt")):
                tf.add(p, arcname=f"ssm_ckpt/{p.name}")
    print(f"merged {len(rows)} rows, {len(errors)} errors -> {out}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--job", required=True, choices=JOBS)
    t.add_argument("--work", required=True, type=Path)
    t.add_argument("--budget-s", type=float, default=360.0)
    t.add_argument("--eval-budget-s", type=float, default=40.0)
    t.add_argument("--resume", type=Path, default=None, help="folder with <task>__<model>.pt from an earlier run")
    t.add_argument("--smoke", action="store_true")
    m = sub.add_parser("merge")
    m.add_argument("--work", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--tar", type=Path, default=None)
    m.add_argument("--t-start", type=float, default=None, help="epoch seconds the GPU script started")
    m.add_argument("--note", default="")
    s = sub.add_parser("smoke", help="every job at tiny sizes on this machine, then merge")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    if a.cmd == "train":
        a.work.mkdir(parents=True, exist_ok=True)
        train_job(a.job, a.work, a.budget_s, a.smoke, a.resume, eval_budget_s=a.eval_budget_s)
    elif a.cmd == "merge":
        merge(a.work, a.out, a.tar, dict(note=a.note), a.t_start)
    else:
        import tempfile
        work = a.work or Path(tempfile.mkdtemp(prefix="ssm_smoke_"))
        work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        t0 = time.time()
        for job in JOBS:
            try:
                train_job(job, work, 30.0, True, None, eval_budget_s=10.0)
            except Exception:  # noqa: BLE001
                (work / f"{job.replace(':', '__')}.log").write_text(traceback.format_exc())
                print(traceback.format_exc(), file=sys.stderr)
        # a resumed run continues from the checkpoint
        train_job("copy1024:s6", work, 30.0, True, work, eval_budget_s=10.0)
        merge(work, a.out, work / "ckpt.tar.gz", dict(smoke=True), t0)


if __name__ == "__main__":
    main()
