"""The Melodist chapter's headline over several training seeds (nbs/41_melodist.ipynb, tinylab.melodist).

The chapter trains one V2A model per text encoder, so its headline row (tri-tower against dual-tower text
pretraining, judged by prompt adherence of the generated accompaniments) resamples test songs, not training runs.
This script builds the data, the codec and the judges ONCE (the chapter's `book` preset, data seed 0), then for each
seed s = 0..S-1 trains, with seed s, both pairs of contrastive towers, the two V2A models (one per text encoder), and
(unless --no-two-stage) the SVS stage and the single-stage baseline; it generates the accompaniments of the same
held-out prompts and records, per seed and per test song, what the chapter's judges hear: each attribute right or
not (instrument, tempo, tonic, mode, density), text-to-audio retrieval hits, and the tempo / key agreement of the
two-stage pipeline and of the single-stage baseline. The chapter's recorded-run section decides its rows with
`tinylab.core.seed_interval` over the per-seed means.

The JSON (default book/results/melodist_seeds_cpu.json) is rewritten after every seed, so a run cut short keeps the
seeds it finished. --deadline HH:MM (UTC) starts no seed that the previous seed's time says would end after it.

CPU:   nice -n 10 env PYTHONPATH=. python3 benchmarks/melodist_seeds.py --seeds 3 --threads 1
Test:  PYTHONPATH=. python3 benchmarks/melodist_seeds.py --smoke --out /tmp/melodist_seeds_smoke.json"""
import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")      # tinylab.kernels imports triton; on a CPU it runs its interpreter

import numpy as np
import torch

from tinylab.core import seed_everything
from tinylab.melodist import (ATTRIBUTES, AttributeClassifier, MelCodec, Stage, ScoreEncoder, Towers, VocalEncoder,
                              codec_error, encode_prompts, log_mel, make_songs, score_frames, train_codec, train_stage,
                              train_towers)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "41_melodist.ipynb"
ACC_HEADS, VOC_HEADS = ["instrument", "tempo", "tonic", "mode", "density"], ["tempo", "tonic", "mode"]   # the chapter's
ADHERE, ADHERE_PROMPT = ("instrument", "tempo", "mode"), ("instrument", "density")                       # the chapter's
GATE_ERR, GATE_DROP = 0.35, 0.15                                                                          # the chapter's
SMOKE = dict(n_train=48, n_test=48, codec_steps=4, codec_lr=3e-3, tower_steps=2, stage_steps=2, batch=8, d_model=32,
             n_q=2, codebook_size=16, gate_audio=0, n_f0=0, n_listen=0, temperature=0.0)


def chapter_presets(path: Path = NOTEBOOK) -> dict:
    "The chapter's `PRESETS` dict, read from the notebook's source (so the script cannot drift from the chapter)."
    for cell in json.loads(path.read_text())["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and "PRESETS = {" in src:
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PRESETS":
                    return eval(compile(ast.Expression(node.value), str(path), "eval"), {"dict": dict})
    raise ValueError(f"no PRESETS assignment in {path}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    if os.environ.get("TINYLAB_COMMIT"):
        return os.environ["TINYLAB_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        return head or "unknown (no git)"
    except Exception:  # no git on the machine
        return "unknown"


def log(msg: str):
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def write(record: dict, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)                                   # atomic: a reader never sees half a file


def setup(cfg, data_seed: int = 0) -> dict:
    "Data, codec, tokens and judges, once: what every seed shares (the chapter's cells, as glue)."
    t0 = time.perf_counter()
    train_ds, train_audio = make_songs(cfg["n_train"], seed=data_seed)
    test_ds, test_audio = make_songs(cfg["n_test"], seed=10_000 + data_seed, balanced=True)
    mels = {split: {k: torch.from_numpy(log_mel(v)) for k, v in audio.items()}
            for split, audio in (("train", train_audio), ("test", test_audio))}
    log(f"data: {cfg['n_train']} + {cfg['n_test']} songs in {time.perf_counter() - t0:.0f} s")
    t1 = time.perf_counter()
    seed_everything(data_seed)
    codec = MelCodec(n_q=cfg["n_q"], codebook_size=cfg["codebook_size"])
    train_codec(codec, torch.cat([mels["train"]["vocal"], mels["train"]["accomp"]]), cfg["codec_steps"], cfg["batch"],
                cfg["codec_lr"], seed=data_seed)
    rec_err = {k: codec_error(codec, mels["test"][k]) for k in ("vocal", "accomp")}
    log(f"codec: {time.perf_counter() - t1:.0f} s, relative error {rec_err}")
    acc_clf = AttributeClassifier(ACC_HEADS).fit(mels["train"]["accomp"], train_ds[:])
    voc_clf = AttributeClassifier(VOC_HEADS).fit(mels["train"]["vocal"], train_ds[:])
    truth = {k: np.array(test_ds[k]) for k in ATTRIBUTES}
    decoded = {k: codec.decode(codec.encode(mels["test"][k])) for k in ("vocal", "accomp")}

    def accuracy(clf, x):
        pred = clf.predict(x)
        return {k: float(np.mean(pred[k] == truth[k])) for k in clf.names}
    gate = {"accompaniment, true": accuracy(acc_clf, mels["test"]["accomp"]),
            "accompaniment, codec": accuracy(acc_clf, decoded["accomp"]),
            "vocal, true": accuracy(voc_clf, mels["test"]["vocal"]), "vocal, codec": accuracy(voc_clf, decoded["vocal"])}
    drop = max(max(gate[f"{t}, true"][k] - gate[f"{t}, codec"][k] for k in gate[f"{t}, true"]) for t in ("accompaniment", "vocal"))
    codec_ok = bool(max(rec_err.values()) < GATE_ERR and drop <= GATE_DROP)
    tokens = {split: {k: codec.encode(mels[split][k]) for k in ("vocal", "accomp")} for split in ("train", "test")}
    ids = {split: encode_prompts(ds["prompt"]) for split, ds in (("train", train_ds), ("test", test_ds))}
    frames = {split: torch.from_numpy(np.stack([score_frames(json.loads(s), g) for s, g in zip(ds["score"], ds["singer"])]))
              for split, ds in (("train", train_ds), ("test", test_ds))}
    return dict(train_ds=train_ds, test_ds=test_ds, mels=mels, codec=codec, rec_err=rec_err, gate=gate, codec_ok=codec_ok,
                acc_clf=acc_clf, voc_clf=voc_clf, truth=truth, tokens=tokens, ids=ids, frames=frames,
                setup_seconds=time.perf_counter() - t0)


@torch.no_grad()
def retrieval_hits(tw: Towers, ids, m) -> list[int]:
    "Per prompt: 1 if its own clip is the nearest of its block of 48 (the chapter's R@1; accompaniments for tri, mixtures for dual)."
    t = torch.nn.functional.normalize(tw.text(ids), dim=-1)
    a = torch.nn.functional.normalize(tw.audio["accomp"](m["accomp"]) if tw.kind == "tri" else tw.audio["mix"](m["mix"]), dim=-1)
    hits = []
    for s in range(0, len(ids), 48):
        sim = t[s:s + 48] @ a[s:s + 48].T
        hits += (sim.argmax(1) == torch.arange(len(sim))).int().tolist()
    return hits


def run_seed(S: dict, cfg: dict, seed: int, two_stage: bool) -> dict:
    "Towers, V2A (and SVS + single stage) trained with `seed`; per-song judgements of their generations."
    t0, seconds = time.perf_counter(), {}
    codec, tokens, ids, mels, K = S["codec"], S["tokens"], S["ids"], S["mels"], cfg["n_q"]
    towers, text_emb = {}, {}
    for kind in ("tri", "dual"):
        t1 = time.perf_counter()
        seed_everything(seed)
        towers[kind] = Towers(kind)
        train_towers(towers[kind], ids["train"], mels["train"], cfg["tower_steps"], seed=seed)
        with torch.no_grad():
            text_emb[kind] = {s: towers[kind].text(ids[s]) for s in ids}
        seconds[f"{kind}-tower"] = time.perf_counter() - t1
    r1 = {k: retrieval_hits(towers[k], ids["test"], mels["test"]) for k in towers}
    mst_kw = dict(d_model=cfg["d_model"], max_frames=tokens["train"]["vocal"].shape[1])

    def fit(name, stage, codes, cond_in, prefix):
        t1 = time.perf_counter()
        losses = train_stage(stage, codes, cond_in, prefix, cfg["stage_steps"], cfg["batch"], seed=seed)
        seconds[name] = time.perf_counter() - t1
        return losses[-1]
    final_loss, v2a = {}, {}
    for kind in ("tri", "dual"):
        seed_everything(seed)
        v2a[kind] = Stage(VocalEncoder(K, cfg["codebook_size"], cfg["d_model"]), K, cfg["codebook_size"], cfg["d_model"], 64, **mst_kw)
        final_loss[f"V2A ({kind})"] = fit(f"V2A ({kind})", v2a[kind], tokens["train"]["accomp"], tokens["train"]["vocal"],
                                          text_emb[kind]["train"])
    t1 = time.perf_counter()
    gen_kw = dict(temperature=cfg["temperature"], gen=torch.Generator().manual_seed(seed))
    # the headline: accompaniments for the test songs' true vocals under their prompts, per text encoder
    correct = {}
    for kind in v2a:
        pred = S["acc_clf"].predict(codec.decode(v2a[kind].generate(tokens["test"]["vocal"], text_emb[kind]["test"], **gen_kw)))
        correct[kind] = {a: (pred[a] == S["truth"][a]).astype(int).tolist() for a in ACC_HEADS}
    seconds["generate V2A"] = time.perf_counter() - t1
    out = dict(seed=seed, correct=correct, r1=r1, final_loss=final_loss)
    if two_stage:
        def agreement(voc_codes, acc_codes):
            pv, pa = S["voc_clf"].predict(codec.decode(voc_codes)), S["acc_clf"].predict(codec.decode(acc_codes))
            return dict(tempo=(pv["tempo"] == pa["tempo"]).astype(int).tolist(),
                        key=((pv["tonic"] == pa["tonic"]) & (pv["mode"] == pa["mode"])).astype(int).tolist())
        seed_everything(seed)
        svs = Stage(ScoreEncoder(cfg["d_model"]), K, cfg["codebook_size"], cfg["d_model"], **mst_kw)
        final_loss["SVS"] = fit("SVS", svs, tokens["train"]["vocal"], S["frames"]["train"], None)
        seed_everything(seed)
        single = Stage(ScoreEncoder(cfg["d_model"]), 2 * K, cfg["codebook_size"], cfg["d_model"], 64, **mst_kw)
        final_loss["single stage"] = fit("single stage", single, torch.cat([tokens["train"]["vocal"], tokens["train"]["accomp"]], -1),
                                         S["frames"]["train"], text_emb["tri"]["train"])
        t1 = time.perf_counter()
        voc_gen = svs.generate(S["frames"]["test"], **gen_kw)
        acc_gen = v2a["tri"].generate(voc_gen, text_emb["tri"]["test"], **gen_kw)
        both = single.generate(S["frames"]["test"], text_emb["tri"]["test"], **gen_kw)
        out["agree"] = {"two-stage": agreement(voc_gen, acc_gen), "single stage": agreement(both[..., :K], both[..., K:])}
        seconds["generate two-stage"] = time.perf_counter() - t1
    seconds["seed"] = time.perf_counter() - t0
    out["seconds"] = seconds
    out["summary"] = summarise(out)
    return out


def summarise(r: dict) -> dict:
    "Per-seed means: adherence (headline attributes), prompt-only adherence, each attribute, R@1, alignment."
    s = {}
    for kind, c in r["correct"].items():
        s[f"adherence {kind}"] = float(np.mean([np.mean(c[a]) for a in ADHERE]))
        s[f"prompt-only adherence {kind}"] = float(np.mean([np.mean(c[a]) for a in ADHERE_PROMPT]))
        s.update({f"{a} {kind}": float(np.mean(c[a])) for a in c})
        s[f"R@1 {kind}"] = float(np.mean(r["r1"][kind]))
    for name, ag in r.get("agree", {}).items():
        s[f"alignment {name}"] = float(np.mean((np.array(ag["tempo"]) + np.array(ag["key"])) / 2))
        s[f"tempo agreement {name}"], s[f"key agreement {name}"] = float(np.mean(ag["tempo"])), float(np.mean(ag["key"]))
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="train seeds 0..S-1 (after --first-seed)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--scale", default="book", choices=("ci", "book", "gpu"), help="the chapter's preset")
    p.add_argument("--n-test", type=int, default=None, help="held-out songs (a multiple of 48); default: the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-two-stage", action="store_true", help="skip SVS and the single-stage baseline")
    p.add_argument("--deadline", default=None, help="HH:MM UTC: start no seed the last seed's time says would end later")
    p.add_argument("--out", default=str(ROOT / "book" / "results" / "melodist_seeds_cpu.json"))
    p.add_argument("--smoke", action="store_true", help="tiny models and data, 2 seeds (seconds; for the tests)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        cfg, args.seeds = dict(SMOKE), min(args.seeds, 2)
    else:
        cfg = dict(chapter_presets()[args.scale])
    if args.n_test is not None:
        if args.n_test % 48:
            raise ValueError(f"--n-test must be a multiple of 48, got {args.n_test}")
        cfg["n_test"] = args.n_test
    out = Path(args.out)
    now = datetime.datetime.now(datetime.timezone.utc)
    deadline = None
    if args.deadline:
        h, m = map(int, args.deadline.split(":"))
        deadline = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if deadline < now:
            deadline += datetime.timedelta(days=1)
    record = dict(script="benchmarks/melodist_seeds.py", device=f"{cpu_name()} ({torch.get_num_threads()} torch thread"
                  f"{'s' * (torch.get_num_threads() != 1)}, {os.cpu_count()} cores)", cpu=cpu_name(),
                  threads=torch.get_num_threads(), cores=os.cpu_count(), torch=torch.__version__,
                  python=platform.python_version(), date=now.isoformat(timespec="seconds"), commit=commit(),
                  args=vars(args), scale="smoke" if args.smoke else args.scale, config=cfg,
                  note=("data, codec and judges built once (data seed 0); per seed: both pairs of towers, both V2A models"
                        + ("" if args.no_two_stage else ", SVS and the single-stage baseline") + ", trained with that seed"),
                  heads=dict(accompaniment=ACC_HEADS, adhere=list(ADHERE), adhere_prompt=list(ADHERE_PROMPT)),
                  seeds=[], complete=False)
    log(f"{record['device']}, torch {torch.__version__}, preset {record['scale']}: {cfg}")
    S = setup(cfg)
    record.update(codec_error=S["rec_err"], gate=S["gate"], codec_gate_passed=S["codec_ok"], setup_seconds=S["setup_seconds"],
                  test_items=[dict(prompt=r["prompt"], **{k: r[k] for k in ATTRIBUTES}) for r in S["test_ds"]])
    write(record, out)
    log(f"setup {S['setup_seconds']:.0f} s; codec gate {'passed' if S['codec_ok'] else 'FAILED'}")
    last = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if deadline is not None and last is not None:
            eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.1 * last)
            if eta > deadline:
                log(f"stopping before seed {seed}: at {last:.0f} s a seed it would end {eta:%H:%M} UTC, after {args.deadline}")
                record["stopped"] = f"before seed {seed}: deadline {args.deadline} UTC"
                break
        r = run_seed(S, cfg, seed, not args.no_two_stage)
        last = r["seconds"]["seed"]
        record["seeds"].append(r)
        record["seconds"] = time.perf_counter() - T0
        write(record, out)
        log(f"seed {seed}: {last:.0f} s; " + ", ".join(f"{k} {v:.3f}" for k, v in r["summary"].items()
                                                    if k.startswith(("adherence", "prompt-only", "alignment", "R@1"))))
    record["complete"] = len(record["seeds"]) == args.seeds
    record["seconds"] = time.perf_counter() - T0
    write(record, out)
    log(f"wrote {out}: {len(record['seeds'])} seeds in {record['seconds']:.0f} s")
    return record


T0 = time.perf_counter()

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
