"""End-to-end GPU benchmark of the TriForce chapter (nbs/21_triforce.ipynb): wall-clock decoding speed of
`triforce_generate` against plain autoregressive decoding as the context grows, on one GPU, where the target's
KV cache outweighs its weights.

Two steps, from the repository root:
    python3 benchmarks/bench_triforce_e2e.py prepare --data .bench/triforce           # any machine with tinylab installed
    PYTHONPATH=. python3 benchmarks/bench_triforce_e2e.py run --data .bench/triforce --out book/results/triforce_e2e_h100.json

`prepare` tokenizes the chapter's corpus (Shakespeare, `tinylab.lm`) into one token stream (`tokens.npy`, the last
`validation` documents at its end). `run` needs only torch, triton, transformers, numpy and pandas: it trains a target
Llama (12 layers, 1024 wide, full multi-head attention, so every token adds 48 KiB of bf16 KV cache) and a
2-layer draft on the stream for a few minutes, with PoSE position skips (Zhu et al., arXiv 2309.10400) so that
1K-token training windows cover relative distances up to the longest context; then, at each context length,
it decodes the same prompts with
  - plain decoding, the model's own attention (SDPA) reading the full cache,
  - plain decoding through the chapter's kernel over all chunks (`autoregressive_generate`),
  - TriForce (`triforce_generate`): draft with a StreamingLLM cache -> target on a 4K retrieval cache -> target
    on the full cache, the paper's gamma1 = 2, gamma2 = 6, chunks of 8,
and reports decoding time (prefill excluded), tokens per second, acceptance rates and the speedup; plus what explains
it: each level's forward cost on the wall clock and in GPU kernel time, the share of the newest token's attention the
retrieval cache holds, and the target's loss with the whole context against its last 1K tokens. `--smoke` runs tiny
sizes on any device.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from tinylab.core import benchmark
from tinylab.triforce import (FlatKVCache, TriForceConfig, _forward, _now, _prefill, _triforce_attention, autoregressive_generate,
                              retrieval_selection, streaming_selection, triforce_generate)

SIZES = {  # target, draft, training and decoding settings; "smoke" checks the script anywhere in a minute
    "full":  dict(d=1024, layers=12, heads=8, draft_d=256, draft_layers=2, draft_heads=4, window=1024, batch=16,
                  steps=700, draft_steps=500, lr=6e-4, contexts=[16384, 65536, 262144, 524288], new_tokens=128,
                  prompts=2, budget=4096, sinks=16, draft_window=240, copy_prob=0.5, copy_len=(32, 256),
                  passage=320, cue=32),
    "smoke": dict(d=64, layers=2, heads=2, draft_d=32, draft_layers=1, draft_heads=2, window=64, batch=4,
                  steps=20, draft_steps=10, lr=3e-3, contexts=[256, 512], new_tokens=12,
                  prompts=1, budget=64, sinks=8, draft_window=32, copy_prob=0.5, copy_len=(4, 16), passage=40, cue=8),
}


def prepare(data: Path, vocab_size: int = 2048):
    "Tokenize the chapter's corpus into `tokens.npy` (uint16; train documents, then validation) and save the tokenizer."
    from tinylab.lm import load_corpus, train_tokenizer
    corpus = load_corpus("shakespeare")
    texts = {split: list(corpus[split]["text"]) for split in ("train", "validation")}
    tok = train_tokenizer(texts["train"], vocab_size=vocab_size)
    stream, n_val = [], 0
    for split in ("train", "validation"):
        for ids in tok(texts[split])["input_ids"]:
            stream += ids + [tok.eos_token_id]
            n_val += len(ids) + 1 if split == "validation" else 0
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "tokens.npy", np.asarray(stream, dtype=np.uint16))
    tok.save_pretrained(data / "tokenizer")
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "tokens": len(stream), "validation_tokens": n_val,
                                                "eos": tok.eos_token_id}))
    print(f"{len(stream):,} tokens ({n_val:,} validation) -> {data}")


def llama(vocab: int, d: int, layers: int, heads: int, max_pos: int, eos: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(8 * d / 3) // 64 * 64, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_pos,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa")


def pose_positions(batch: int, window: int, max_pos: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PoSE: each window is cut in two at a random point and the second part's positions skip ahead by a random
    amount. Returns (positions [batch, window], cuts [batch])."""
    cut = torch.randint(1, window, (batch, 1), generator=g)
    skip = torch.randint(0, max_pos - window + 1, (batch, 1), generator=g)
    pos = torch.arange(window).expand(batch, -1)
    return pos + (pos >= cut) * skip, cut[:, 0]


def copy_across_cut(x: torch.Tensor, cut: torch.Tensor, prob: float, lengths: tuple[int, int], g: torch.Generator):
    """Long-range repeats: in a share `prob` of the windows, a passage of the first part (before the PoSE cut) is
    written again into the second part, whose positions lie far ahead, so the loss on the repeat rewards reading
    far back by content (an induction head over any distance). `x` [batch, window + 1] is changed in place."""
    lo, hi = lengths
    for row in range(x.shape[0]):
        L = int(torch.randint(lo, hi + 1, (), generator=g))
        c = int(cut[row])
        if torch.rand((), generator=g) >= prob or c < L or x.shape[1] - c < L:
            continue
        src = int(torch.randint(0, c - L + 1, (), generator=g))
        dst = int(torch.randint(c, x.shape[1] - L + 1, (), generator=g))
        x[row, dst:dst + L] = x[row, src:src + L].clone()
    return x


def train(model, tokens: torch.Tensor, steps: int, batch: int, window: int, lr: float, max_pos: int, seed: int, dev,
          copy_prob: float = 0.0, copy_len: tuple[int, int] = (32, 256)) -> list:
    """AdamW, bf16 autocast, cosine schedule; random windows of the training stream with PoSE positions, and in a
    share `copy_prob` of them a long-range repeat (`copy_across_cut`). Returns losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        start = torch.randint(0, len(tokens) - window - 1, (batch,), generator=g)
        x = torch.stack([tokens[s:s + window + 1] for s in start.tolist()])
        pos, cut = pose_positions(batch, window, max_pos, g)
        x, pos = copy_across_cut(x, cut, copy_prob, copy_len, g).to(dev), pos.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=x[:, :-1], position_ids=pos).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return losses


@torch.no_grad()
def sdpa_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Plain greedy decoding with the model's own attention over a FlatKVCache. Returns (new tokens, decode seconds).
    The decoding runs twice from the same prefill and the second is timed: on the H100 the first decode at each
    context length ran several times slower. Whether that is a one-off set-up or a cost SDPA pays at every new cache
    length (the second decode sees the same lengths again) this does not tell; the chapter says so."""
    prompt = ids.tolist()
    cache = FlatKVCache(model, len(prompt) + new_tokens)
    _forward(model, prompt[:-1], cache)

    def decode():
        cache.crop(len(prompt) - 1)
        seq, t0 = list(prompt), _now(model)
        logits = _forward(model, seq[-1:], cache)[-1]
        for _ in range(new_tokens):
            seq.append(int(logits.argmax()))
            if len(seq) - len(prompt) < new_tokens:
                logits = _forward(model, seq[-1:], cache)[-1]
        return torch.tensor(seq[len(prompt):]), _now(model) - t0

    decode()
    return decode()


def gpu_busy_ms(fns: dict, repeats: int = 5) -> dict:
    """Milliseconds the GPU spends running kernels (and copies) per call of each function, from the profiler's
    device timeline. Unlike the wall clock, this leaves out Python and launch overhead: it is what a step
    would cost with that overhead gone (CUDA graphs, as the paper uses), but for the gaps between kernels."""
    busy = {}
    for name, fn in fns.items():
        fn(); torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
        busy[name] = sum(e.time_range.elapsed_us() for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA) / repeats / 1e3
    return busy


def attention_share(queries: dict, cache: FlatKVCache, n: int, selection) -> dict:
    """Share of the full-cache attention of the newest token (softmax over all n cached keys, mean over layers
    and heads) that falls on the tokens the level-2 cache reads, on as many of the most recent tokens, and on
    as many of the best tokens of each head (the most any selection of that size could hold)."""
    shares = {"retrieval cache": [], "most recent tokens": [], "best tokens": []}
    for layer, q in queries.items():
        k = cache.k[layer][0, :, :n].float()                                         # (Hkv, n, D)
        H, D = q.shape[1], q.shape[2]
        qg = q[0].float().view(k.shape[0], H // k.shape[0], D)                       # (Hkv, G, D)
        p = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, k) * D ** -0.5, dim=-1)   # (Hkv, G, n)
        chunks = selection.for_layer(layer, n)[0].long()                             # (Hkv, M)
        tok = chunks[..., None] * selection.chunk_size + torch.arange(selection.chunk_size, device=k.device)
        read = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)           # (Hkv, n): tokens level 2 reads
        read.scatter_(1, tok.flatten(1).clamp_max(n - 1), True)
        m = int(read.sum(1).max())
        shares["retrieval cache"].append((p * read[:, None]).sum(-1).mean().item())
        shares["most recent tokens"].append(p[..., -m:].sum(-1).mean().item())
        shares["best tokens"].append(p.topk(m, dim=-1).values.sum(-1).mean().item())
    return {name: float(np.mean(v)) for name, v in shares.items()}


@torch.no_grad()
def context_loss(model, ids: list[int], tail: int = 256, short: int = 1024) -> dict:
    """The target's next-token loss on the last `tail` tokens of `ids`, reading the whole context before them and
    reading only the `short` tokens before them: a model that uses long contexts does better with the whole."""
    tail, short = min(tail, len(ids) // 4), min(short, len(ids) // 2)       # (short prompts, as in --smoke)
    def loss(seq):
        cache = FlatKVCache(model, len(seq))
        _forward(model, seq[:-tail], cache)
        logits = _forward(model, seq[-tail:], cache)[:-1].float()
        return F.cross_entropy(logits, torch.tensor(seq[-tail + 1:], device=logits.device)).item()
    return {"whole context": loss(ids), f"last {short} tokens": loss(ids[-(short + tail):])}


def level_passes(tf: TriForceConfig) -> dict:
    "The forward passes whose cost is measured at each context, by the stable keys the JSON uses, with what each one is."
    return {"draft": "draft, 1 token (StreamingLLM cache)", "middle": f"target, {tf.gamma1 + 1} tokens, retrieval cache",
            "full1": "target, 1 token, full cache", "check": f"target, {tf.gamma2 + 1} tokens, full cache",
            "build": "retrieval cache build (all layers)"}


def _one_pass(model, cache: FlatKVCache, tokens: list[int], select):
    "A forward pass of `tokens` that leaves `cache` as it found it (the tokens are appended, then rolled back)."
    n0 = cache.get_seq_length()
    return lambda: (_forward(model, tokens, cache, select=select), cache.crop(n0))


@torch.no_grad()
def level_costs(target, draft, ids: list[int], tf: TriForceConfig, dev) -> dict:
    """Milliseconds of one forward pass of each level at this context (keyed as `level_passes` says): wall clock
    (median of 5, `tinylab.core.benchmark`) and, on a GPU, kernel time; and where the newest token's attention goes."""
    full, dcache = FlatKVCache(target, len(ids) + 16), FlatKVCache(draft, len(ids) + 16)
    record = {}
    _prefill(target, ids, full, record); _forward(draft, ids[:-1], dcache)
    with _triforce_attention(target, draft):
        n, queries = full.get_seq_length(), {l: q[:, :, -1] for l, q in record.items()}
        retrieval = retrieval_selection(queries, full, n, tf.budget, tf.chunk_size)
        streaming = streaming_selection(dcache.get_seq_length(), len(dcache.k), 1, dcache.k[0].shape[1], tf.sinks, tf.window,
                                        tf.chunk_size, dev)
        fns = {"draft": _one_pass(draft, dcache, [1], streaming),
               "middle": _one_pass(target, full, [1] * (tf.gamma1 + 1), retrieval),
               "full1": _one_pass(target, full, [1], None),
               "check": _one_pass(target, full, [1] * (tf.gamma2 + 1), None),
               "build": lambda: retrieval_selection(queries, full, n, tf.budget, tf.chunk_size)}
        costs = {"wall_ms": benchmark(fns, warmup=1, repeats=5, device=dev)["ms"].to_dict(),
                 "attention_share": attention_share(queries, full, n, retrieval)}
        if dev.type == "cuda":
            costs["gpu_busy_ms"] = gpu_busy_ms(fns)
        return costs


def show(row: dict):
    "One measured row, printed as it comes."
    line = f"{row['context']:>7} {row['method']:<40} {row['new_tokens'] / row['decode_s']:7.1f} tok/s, prefill {row.get('prefill_s', 0):6.2f} s"
    if "draft_acceptance" in row:
        line += f", accepted {row['draft_acceptance']:.2f} / {row['middle_acceptance']:.2f}, {row['tokens_per_round']:.2f} tokens per check"
    print(line, flush=True)


def build_and_train(data: Path, S: dict, seed: int, dev: torch.device) -> dict:
    """The target and draft Llamas, trained on the stream (with long-range repeats in a share `copy_prob` of the
    windows), in bf16 on a GPU; with the token stream and a record of the training."""
    meta = json.loads((data / "meta.json").read_text())
    tokens = torch.from_numpy(np.load(data / "tokens.npy").astype(np.int64))
    n_val = meta["validation_tokens"]
    train_tokens = tokens[:-n_val]
    max_pos = max(S["contexts"]) + 1024
    V, eos = meta["vocab_size"], meta["eos"]
    torch.manual_seed(seed)
    target = LlamaForCausalLM(llama(V, S["d"], S["layers"], S["heads"], max_pos, eos)).to(dev)
    draft = LlamaForCausalLM(llama(V, S["draft_d"], S["draft_layers"], S["draft_heads"], max_pos, eos)).to(dev)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{device}; target {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M, "
          f"draft {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters", flush=True)
    t0 = time.perf_counter()
    copies = dict(copy_prob=S["copy_prob"], copy_len=tuple(S["copy_len"]))
    print("training the target"); tl = train(target, train_tokens, S["steps"], S["batch"], S["window"], S["lr"], max_pos, seed, dev, **copies)
    print("training the draft"); dl = train(draft, train_tokens, S["draft_steps"], S["batch"], S["window"], 3 * S["lr"], max_pos, seed + 1, dev, **copies)
    train_seconds = time.perf_counter() - t0
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    target, draft = target.to(dtype).eval(), draft.to(dtype).eval()

    # validation loss of the trained models on held-out windows (contiguous positions), a sanity check
    with torch.no_grad():
        xs = torch.stack([tokens[len(tokens) - n_val + i * S["window"]:][:S["window"] + 1] for i in range(8)]).to(dev)
        val = {name: F.cross_entropy(m(input_ids=xs[:, :-1]).logits.float().flatten(0, 1), xs[:, 1:].flatten()).item()
               for name, m in (("target", target), ("draft", draft))}
    print(f"validation loss: {val}", flush=True)
    record = dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                  target=dict(layers=S["layers"], d_model=S["d"], heads=S["heads"], params=sum(p.numel() for p in target.parameters()),
                              kv_bytes_per_token=2 * S["layers"] * S["d"] * torch.finfo(dtype).bits // 8),
                  draft=dict(layers=S["draft_layers"], d_model=S["draft_d"], params=sum(p.numel() for p in draft.parameters())),
                  training=dict(steps=S["steps"], draft_steps=S["draft_steps"], batch=S["batch"], window=S["window"],
                                copy_prob=S["copy_prob"], copy_len=list(S["copy_len"]),
                                final_loss=float(np.mean(tl[-20:])), draft_final_loss=float(np.mean(dl[-20:])),
                                seconds=train_seconds, validation_loss=val))
    return dict(target=target, draft=draft, tokens=tokens, n_val=n_val, record=record)


def held_out_prompt(tokens: torch.Tensor, n_val: int, ctx: int, p: int, prompts: int) -> torch.Tensor:
    "A `ctx`-token prompt ending in held-out text (prompt `p` of `prompts`), padded from the start of the stream."
    end = len(tokens) - p * (n_val // max(prompts, 1))
    ids = tokens[max(end - ctx, 0):end]
    return torch.cat([tokens[:ctx - len(ids)], ids]) if len(ids) < ctx else ids


def repeat_prompt(ids: torch.Tensor, passage: int, cue: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt whose continuation is far back: a `passage`-token passage from the first 5% of `ids` is repeated at
    the end, cut after its first `cue` tokens. Returns (prompt [ctx], the passage's rest, which a model that reads
    its whole context can copy). The text loss of `context_loss` on (prompt minus cue + whole passage) measures it."""
    ctx = len(ids)
    a = ctx // 20
    src = ids[a:a + passage]
    return torch.cat([ids[:ctx - cue], src[:cue]]), src[cue:]


def run(data: Path, out: Path | None, size: str, seed: int = 0, **overrides):
    S = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_and_train(data, S, seed, dev)
    target, draft, tokens, n_val = built["target"], built["draft"], built["tokens"], built["n_val"]

    tf = TriForceConfig(budget=S["budget"], sinks=S["sinks"], window=S["draft_window"])
    variants = {"TriForce": tf, "TriForce, retrieval cache built once": TriForceConfig(
        budget=S["budget"], sinks=S["sinks"], window=S["draft_window"], refresh_every=10**9)}
    t0 = time.perf_counter()
    autoregressive_generate(target, tokens[:300], 40); triforce_generate(target, draft, tokens[:300], 40, tf)  # compile the kernels
    print(f"warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    rows, costs = [], {}
    for ctx in S["contexts"]:
        for p in range(S["prompts"] if ctx < max(S["contexts"]) else 1):   # one prompt at the longest, for time
            ids = held_out_prompt(tokens, n_val, ctx, p, S["prompts"])   # the prompt ends in held-out text
            n = S["new_tokens"]
            ref, t_sdpa = sdpa_generate(target, ids.to(dev), n)
            rows.append(dict(context=ctx, prompt=p, method="plain decoding, SDPA", new_tokens=n, decode_s=t_sdpa)); show(rows[-1])
            plain, st = autoregressive_generate(target, ids, n)
            rows.append(dict(context=ctx, prompt=p, method="plain decoding, our kernel", new_tokens=st.new_tokens,
                             decode_s=st.decode_seconds, prefill_s=st.prefill_seconds, same_as_sdpa=bool(torch.equal(plain[ctx:], ref.cpu())))); show(rows[-1])
            for name, cfg in variants.items():
                fast, st = triforce_generate(target, draft, ids, n, cfg)
                rows.append(dict(context=ctx, prompt=p, method=name, new_tokens=st.new_tokens, decode_s=st.decode_seconds,
                                 prefill_s=st.prefill_seconds, draft_acceptance=st.draft_acceptance,
                                 middle_acceptance=st.middle_acceptance, tokens_per_round=st.tokens_per_round,
                                 rounds=st.rounds, draft_proposed=st.draft_proposed, middle_proposed=st.middle_proposed,
                                 same_as_plain=bool(torch.equal(fast, plain)))); show(rows[-1])
        costs[ctx] = {**level_costs(target, draft, ids.tolist(), tf, dev), "loss": context_loss(target, ids.tolist())}
        print(f"  level costs and diagnostics: {costs[ctx]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result = dict(**built["record"], date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), size=size,
                      triforce=dict(gamma1=tf.gamma1, gamma2=tf.gamma2, budget=tf.budget, chunk_size=tf.chunk_size,
                                    sinks=tf.sinks, window=tf.window, temperature=tf.temperature),
                      passes=level_passes(tf), rows=rows, levels={str(k): v for k, v in costs.items()})
        if out is not None:                                # after every context, so a cut-off run keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def diagnose(data: Path, out: Path | None, size: str, seed: int = 0, **overrides):
    """Does the trained target use its long context (issue #21)? At each context: the target's loss on held-out text
    and on a far repeat (`repeat_prompt`) with the whole context and with its last 1K tokens; the share of the newest
    token's attention the retrieval cache holds at the end of each prompt; and greedy TriForce against plain decoding
    on the repeat prompt (identical output, acceptance of both levels, how much of the passage is copied)."""
    S = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_and_train(data, S, seed, dev)
    target, draft, tokens, n_val = built["target"], built["draft"], built["tokens"], built["n_val"]
    tf = TriForceConfig(budget=S["budget"], sinks=S["sinks"], window=S["draft_window"])
    result = dict(**built["record"], date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), size=size, step="diagnose",
                  triforce=dict(gamma1=tf.gamma1, gamma2=tf.gamma2, budget=tf.budget, chunk_size=tf.chunk_size,
                                sinks=tf.sinks, window=tf.window), repeat=dict(passage=S["passage"], cue=S["cue"]), contexts={})
    for ctx in S["contexts"]:
        text = held_out_prompt(tokens, n_val, ctx, 0, 1)
        prompt, rest = repeat_prompt(text, S["passage"], S["cue"])
        with_passage = torch.cat([prompt[:-S["cue"]], text[ctx // 20:ctx // 20 + S["passage"]]])
        row = {"loss, held-out text": context_loss(target, text.tolist()),
               "loss, far repeat": context_loss(target, with_passage.tolist(), tail=S["passage"] - S["cue"]),
               "attention share, held-out text": level_costs(target, draft, text.tolist(), tf, dev)["attention_share"],
               "attention share, far repeat": level_costs(target, draft, prompt.tolist(), tf, dev)["attention_share"]}
        n = min(S["new_tokens"], len(rest))
        plain, st_plain = autoregressive_generate(target, prompt, n)
        fast, st = triforce_generate(target, draft, prompt, n, tf)
        row["far repeat, greedy"] = dict(new_tokens=n, copied=int((plain[ctx:ctx + n] == rest[:n]).sum()),
                                         same_as_plain=bool(torch.equal(fast, plain)), draft_acceptance=st.draft_acceptance,
                                         middle_acceptance=st.middle_acceptance, tokens_per_round=st.tokens_per_round,
                                         plain_decode_s=st_plain.decode_seconds, triforce_decode_s=st.decode_seconds)
        if not row["far repeat, greedy"]["same_as_plain"]:   # where they part, and how close the target's top two were
            i = int((fast[:len(plain)] != plain[:len(fast)]).nonzero()[0])
            with torch.no_grad():
                top2 = target(input_ids=plain[None, :i].to(dev)).logits[0, -1].float().topk(2).values
            row["far repeat, greedy"].update(first_difference=i - ctx, top2_logit_gap_there=float(top2[0] - top2[1]))
        result["contexts"][str(ctx)] = row
        print(f"{ctx:>7}: {json.dumps(row)}", flush=True)
        if out is not None:                                # after every context, so a cut-off run keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run", "diagnose"])
    ap.add_argument("--data", type=Path, default=Path(".bench/triforce"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script runs")
    ap.add_argument("--contexts", type=int, nargs="+", help="override the context lengths")
    ap.add_argument("--steps", type=int, help="override the target's (and draft's) training steps")
    ap.add_argument("--new-tokens", type=int, help="override the tokens generated per prompt")
    ap.add_argument("--copy-prob", type=float, help="override the share of training windows with a long-range repeat")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.data)
    else:
        (run if args.step == "run" else diagnose)(args.data, args.out, "smoke" if args.smoke else "full",
                                                  contexts=args.contexts, steps=args.steps, draft_steps=args.steps,
                                                  new_tokens=args.new_tokens, copy_prob=args.copy_prob)
