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
it decodes two prompts (held-out text, and a far repeat whose continuation is a passage from the prompt's start)
at temperature 0 and 0.6 with
  - plain decoding as CUDA graphs over a static cache, reading it with the chapter's kernel or with SDPA,
  - TriForce as CUDA graphs (`cuda_graphs=True`): draft with a StreamingLLM cache -> target on a 4K retrieval
    cache -> target on the full cache, the paper's gamma1 = 2, gamma2 = 6, chunks of 8,
  - both eagerly (no graphs) at two contexts, to show what the graphs remove,
and reports decoding time (prefill and graph capture excluded), acceptance rates and whether greedy outputs equal
plain decoding's; plus what explains it: each level's step cost (wall clock per call and the graph's GPU time), the
share of the newest token's attention the retrieval cache holds, and the target's loss with the whole context
against its last 1K tokens. `--smoke` runs tiny
sizes on any device.

`diagnose` asks whether the target uses its long context (issue #21): its loss on held-out text, on a far repeat
and on a needle of random tokens, with the whole context and with the last 1K tokens, the attention the retrieval
cache holds, and greedy decoding of the needle. Its training options (off by default, so that `run` trains the
recorded target): `--sink` (a BOS token starts every window and prompt), `--log-skips` (log-uniform PoSE skips),
`--copy-batch N` (N short windows of repeated random blocks beside every step), `--copy-warmup N` (up to N steps
on those windows alone first, until the model copies; `--warmup-lr` its learning rate), `--copy-window` (those
windows' length, 256 tokens by default: their blocks, and so the distance a copy looks back, are 8 tokens to a
quarter of it); `run --needle` makes the far repeat a needle.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from tinylab.core import benchmark
from tinylab.triforce import (FlatKVCache, GraphLevels, TriForceConfig, _forward, _prefill, _triforce_attention,
                              autoregressive_generate, compile_layers, retrieval_selection, triforce_generate)

# the training and prompt options of issue #21's diagnosis, all off by default (`run` trains the recorded target)
OPTIONS_OFF = dict(sink=False, needle=False, log_skips=False, copy_batch=0, copy_warmup=0, warmup_lr=None, only=None,
                   compile=False)

SIZES = {  # target, draft, training and decoding settings; "smoke" checks the script anywhere in a minute
    # the target: 4 wide layers, so that a step's cost is its weights and KV reads rather than its kernel count
    # (12 layers of 1024, the earlier target, cost ~1.4 ms a step in kernels alone, at any context)
    "full":  dict(d=2048, layers=4, heads=16, draft_d=256, draft_layers=2, draft_heads=4, window=4096, batch=8,
                  steps=400, draft_steps=500, lr=6e-4, contexts=[16384, 65536, 131072, 262144, 524288], new_tokens=128,
                  budget=4096, sinks=16, draft_window=240, copy_prob=0.5, copy_len=(32, 256),
                  copy_random=True, passage=320, cue=32, temperatures=[0.0, 0.6], eager_contexts=[16384, 131072],
                  refresh_every=10**9, copy_window=256, **OPTIONS_OFF),
    "smoke": dict(d=64, layers=2, heads=2, draft_d=32, draft_layers=1, draft_heads=2, window=64, batch=4,
                  steps=20, draft_steps=10, lr=3e-3, contexts=[256, 512], new_tokens=12,
                  budget=64, sinks=8, draft_window=32, copy_prob=0.5, copy_len=(4, 16), copy_random=True,
                  passage=40, cue=8, temperatures=[0.0, 0.6], eager_contexts=[256], refresh_every=10**9, copy_window=64,
                  **OPTIONS_OFF),
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


def pose_positions(batch: int, window: int, max_pos: int, g: torch.Generator,
                   log_skips: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PoSE: each window is cut in two at a random point and the second part's positions skip ahead by a random
    amount, uniform up to `max_pos` as in the paper, or with `log_skips` log-uniform (as many windows skip 10-100
    positions as 10K-100K: distances of every scale are seen, the short ones where reading far back is first learnt).
    Returns (positions [batch, window], cuts [batch])."""
    cut = torch.randint(1, window, (batch, 1), generator=g)
    span = max_pos - window + 1
    if log_skips:
        skip = (torch.rand((batch, 1), generator=g) * math.log(span)).exp().long() - 1
    else:
        skip = torch.randint(0, span, (batch, 1), generator=g)
    pos = torch.arange(window).expand(batch, -1)
    return pos + (pos >= cut) * skip, cut[:, 0]


def copy_across_cut(x: torch.Tensor, cut: torch.Tensor, prob: float, lengths: tuple[int, int], g: torch.Generator,
                    vocab: int | None = None):
    """Long-range repeats: in a share `prob` of the windows, a passage of the first part (before the PoSE cut) is
    written again into the second part, whose positions lie far ahead, so the loss on the repeat rewards reading
    far back by content (an induction head over any distance). With `vocab`, the passage is first replaced by
    random tokens (a needle no text statistics predict: only a copy does, and a corpus cannot be memorised around
    it). `x` [batch, window + 1] is changed in place."""
    lo, hi = lengths
    for row in range(x.shape[0]):
        L = int(torch.randint(lo, hi + 1, (), generator=g))
        c = int(cut[row])
        if torch.rand((), generator=g) >= prob or c <= L or x.shape[1] - c < L:
            continue
        src = int(torch.randint(1, c - L + 1, (), generator=g))          # (token 0 is the window's first token, kept)
        dst = int(torch.randint(c, x.shape[1] - L + 1, (), generator=g))
        if vocab is not None:
            x[row, src:src + L] = torch.randint(0, vocab, (L,), generator=g)
        x[row, dst:dst + L] = x[row, src:src + L].clone()
    return x


def repeat_window(x: torch.Tensor, vocab: int, g: torch.Generator, lengths: tuple[int, int]) -> torch.Tensor:
    """A window of random tokens (after its first, the BOS) written as blocks that each come twice in a row, [a a b b ...],
    of lengths drawn from `lengths`: half the tokens are copies of the token one block back, a dense signal for a
    copying circuit (an induction head), close by rather than spread over a long window. `x` [window + 1] changes
    in place."""
    i = 1
    while i < len(x):
        a = torch.randint(1, vocab, (int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g)),), generator=g)
        for start in (i, i + len(a)):
            x[start:start + len(a)] = a[:max(len(x) - start, 0)]
        i += 2 * len(a)
    return x


def lm_loss(model, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    "Next-token loss of `model` on windows `x` [batch, window + 1] (on its device), in bf16 autocast on a GPU."
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(input_ids=x[:, :-1], position_ids=position_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def copy_windows_loss(model, n: int, window: int, g: torch.Generator, dev) -> torch.Tensor:
    """The loss on `n` windows of `window` random tokens after a BOS, in blocks of 8 to `window / 4` tokens each written
    twice in a row (`repeat_window`): at chance, ln V, a model that cannot copy; about half that, one that can."""
    r = torch.zeros(n, window + 1, dtype=torch.long)
    for row in r:
        repeat_window(row, model.config.vocab_size, g, (8, max(16, window // 4)))
    r[:, 0] = model.config.bos_token_id
    return lm_loss(model, r.to(dev))


def train(model, tokens: torch.Tensor, steps: int, batch: int, window: int, lr: float, max_pos: int, seed: int, dev,
          copy_prob: float = 0.0, copy_len: tuple[int, int] = (32, 256), copy_random: bool = False, sink: bool = False,
          log_skips: bool = False, copy_batch: int = 0, copy_window: int = 256, copy_warmup: int = 0,
          warmup_lr: float | None = None) -> dict:
    """AdamW, bf16 autocast, cosine schedule; random windows of the training stream with PoSE positions, and in a
    share `copy_prob` of them a long-range repeat (`copy_across_cut`; of random tokens with `copy_random`). With `sink`,
    every window starts with the BOS token at position 0, as a document does: a fixed first token on which heads
    with nothing to read can park their attention (an attention sink), instead of spreading it over the context.
    With `copy_batch`, every step also trains on that many short windows (`copy_window` tokens) of random tokens in
    repeated blocks (`copy_windows_loss`), and with `copy_warmup` the training starts with up to that many steps on
    such windows alone, until their loss falls below 0.7 ln V: a copying circuit (an induction head) forms there,
    after a plateau, and the repeats across the cut then teach it to read far back in text. The warm-up runs at
    `warmup_lr` (default `lr`): a wide target needs a smaller one (on the H200 the 4 x 2048 target's circuit formed at
    1e-4, not at 3e-4 or more in 3000 steps). Returns the losses:
    "stream" (the stream's windows), "copy" (the copy batch's) and "warmup" (the copy-only steps')."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")

    def update(loss):
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    losses, copy_losses, warmup_losses, t0 = [], [], [], time.perf_counter()
    for step in range(copy_warmup):
        for group in opt.param_groups:
            group["lr"] = (lr if warmup_lr is None else warmup_lr) * min(1, (step + 1) / 50)
        warm = copy_windows_loss(model, copy_batch or 32, copy_window, g, dev)
        update(warm)
        warmup_losses.append(warm.item())
        formed = len(warmup_losses) >= 20 and np.mean(warmup_losses[-20:]) < 0.7 * math.log(model.config.vocab_size)
        if step % 100 == 0 or formed:
            print(f"  copy warm-up {step:4d} loss {warm.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if formed:
            break
    for group in opt.param_groups:
        group["lr"] = lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        start = torch.randint(0, len(tokens) - window - 1, (batch,), generator=g)
        x = torch.stack([tokens[s:s + window + 1] for s in start.tolist()])
        pos, cut = pose_positions(batch, window, max_pos, g, log_skips)
        vocab = model.config.vocab_size if copy_random else None
        if sink:
            x[:, 0] = model.config.bos_token_id
        x, pos = copy_across_cut(x, cut, copy_prob, copy_len, g, vocab).to(dev), pos.to(dev)
        loss = total = lm_loss(model, x, pos)
        if copy_batch:
            copy_loss = copy_windows_loss(model, copy_batch, copy_window, g, dev)
            total = loss + copy_loss
            copy_losses.append(copy_loss.item())
        update(total)
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            copies = f", copy windows {copy_loss.item():.3f}" if copy_batch else ""
            print(f"  step {step:4d} loss {loss.item():.3f}{copies} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return dict(stream=losses, copy=copy_losses, warmup=warmup_losses)


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
    "The steps whose cost is measured at each context, by the stable keys the JSON uses, with what each one is."
    return {"draft": "draft, 1 token (StreamingLLM cache)", "middle": f"target, {tf.gamma1 + 1} tokens, retrieval cache",
            "full1": "target, 1 token, full cache (chunk kernel)", "full1_sdpa": "target, 1 token, full cache (SDPA)",
            "check": f"target, {tf.gamma2 + 1} tokens, full cache", "rebuild": "retrieval cache rebuild (all layers)"}


@torch.no_grad()
def attention_at_end(target, ids: list[int], tf: TriForceConfig) -> dict:
    "Where the newest token's attention goes, on `ids` (`attention_share`, against the retrieval cache of that token)."
    full, record = FlatKVCache(target, len(ids) + 1), {}
    _prefill(target, ids, full, record)
    n, queries = full.get_seq_length(), {layer: q[:, :, -1] for layer, q in record.items()}
    return attention_share(queries, full, n, retrieval_selection(queries, full, n, tf.budget, tf.chunk_size))


@torch.no_grad()
def level_costs(target, draft, ids: list[int], tf: TriForceConfig, dev, compiled: bool = False) -> dict:
    """`step_costs` of the models as they decode; with `compiled` layers (`compile_layers`) also with eager layers,
    under the keys `wall_ms_eager_layers` and `gpu_ms_eager_layers`."""
    costs = step_costs(target, draft, ids, tf, dev)
    if compiled:
        compile_layers(target, draft, enable=False)
        costs.update({f"{k}_eager_layers": v for k, v in step_costs(target, draft, ids, tf, dev).items()})
        compile_layers(target, draft)
    return costs


@contextmanager
def prefilled_steps(target, draft, ids: list[int], tf: TriForceConfig):
    """Each level's fixed-shape step after a prefill of `ids`, as the decoding loop calls it: yields (levels, steps),
    `steps` mapping the `level_passes` keys but the rebuild to (step, undo, graph): the call, what rolls its cache back
    after it, and the captured CUDA graph it replays once it has run (`levels.graphs`, or the SDPA levels')."""
    full, dcache = FlatKVCache(target, len(ids) + 16), FlatKVCache(draft, len(ids) + 16)
    record = {}
    _prefill(target, ids, full, record); _forward(draft, ids[:-1], dcache)
    n, nd = full.get_seq_length(), dcache.get_seq_length()
    with GraphLevels(target, draft, full, dcache, tf) as levels, GraphLevels(target, draft, full, dcache, tf, sdpa=True) as sdpa, \
            _triforce_attention(target, draft):
        levels.rebuild(-1, record)
        crop_full, crop_draft = (lambda: full.crop(n)), (lambda: dcache.crop(nd))
        graph = lambda lv, key: lambda: lv.graphs[key]
        yield levels, {
            "draft": (lambda: levels.draft([1]), crop_draft, graph(levels, ("draft", 1))),
            "middle": (lambda: levels.middle([1] * (tf.gamma1 + 1)), crop_full, graph(levels, ("middle", tf.gamma1 + 1))),
            "full1": (lambda: levels.full([1]), crop_full, graph(levels, ("full", 1))),
            "full1_sdpa": (lambda: sdpa.full([1]), crop_full, graph(sdpa, ("full", 1))),
            "check": (lambda: levels.full([1] * (tf.gamma2 + 1)), crop_full, graph(levels, ("full", tf.gamma2 + 1)))}


@torch.no_grad()
def step_costs(target, draft, ids: list[int], tf: TriForceConfig, dev) -> dict:
    """Milliseconds of each level's step (keyed as `level_passes` says) as the decoding loop calls it, a CUDA graph
    replayed over static caches: wall clock per call (median, `tinylab.core.benchmark`, input copy included) and,
    on a GPU, the graph's own GPU time (`triton.testing.do_bench` of its replay)."""
    with prefilled_steps(target, draft, ids, tf) as (levels, steps):
        fns = {name: (lambda step=step, undo=undo: (step(), undo())) for name, (step, undo, _) in steps.items()}
        fns["rebuild"] = lambda: levels.rebuild(0)          # from the check's queries (the last full pass)
        costs = {"wall_ms": benchmark(fns, warmup=2, repeats=20, device=dev)["ms"].to_dict()}
        if dev.type == "cuda":
            from triton.testing import do_bench
            graphs = {name: graph() for name, (_, _, graph) in steps.items()}
            graphs["rebuild"] = levels.graphs[("rebuild", tf.gamma2 + 1)]
            costs["gpu_ms"] = {k: do_bench(g.graph.replay, warmup=3, rep=40, return_mode="median") for k, g in graphs.items()}
    return costs


def show(row: dict):
    "One measured row, printed as it comes."
    line = (f"{row['context']:>7} {row['prompt']:<13} T={row['temperature']:<3} {row['method']:<34} "
            f"{row['new_tokens'] / row['decode_s']:7.1f} tok/s")
    if "draft_acceptance" in row:
        line += f", accepted {row['draft_acceptance']:.2f} / {row['middle_acceptance']:.2f}, {row['tokens_per_round']:.2f} tokens per check"
    if "same_as_plain" in row:
        line += f", same as plain: {row['same_as_plain']}"
    print(line, flush=True)


METHODS = {  # stable keys of the decoding methods in the JSON -> what each is
    "plain_sdpa": "plain decoding, SDPA, CUDA graphs",
    "plain": "plain decoding, chunk kernel, CUDA graphs",
    "triforce": "TriForce, CUDA graphs",
    "triforce_streaming": "TriForce with StreamingLLM at level 2 (the ablation), CUDA graphs",
    "plain_eager": "plain decoding, chunk kernel, eager",
    "triforce_eager": "TriForce, eager",
}


# the training record's settings (the rest are its results)
TRAINING_SETTINGS = ("steps", "draft_steps", "batch", "window", "lr", "copy_prob", "copy_len", "copy_random", "sink", "log_skips",
                     "copy_batch", "copy_window", "copy_warmup", "warmup_lr")


def _free(dev):
    "Give back the memory of the last generation's caches and graphs before the next allocates its own."
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


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
    copies = dict(copy_prob=S["copy_prob"], copy_len=tuple(S["copy_len"]), copy_random=S["copy_random"], sink=S["sink"],
                  log_skips=S["log_skips"])
    print("training the target"); th = train(target, train_tokens, S["steps"], S["batch"], S["window"], S["lr"], max_pos, seed, dev,
                                             **copies, copy_batch=S["copy_batch"], copy_window=S["copy_window"],
                                             copy_warmup=S["copy_warmup"], warmup_lr=S["warmup_lr"])
    print("training the draft"); dh = train(draft, train_tokens, S["draft_steps"], S["batch"], S["window"], 3 * S["lr"], max_pos,
                                            seed + 1, dev, **copies)
    tl, cl, wl, dl = th["stream"], th["copy"], th["warmup"], dh["stream"]
    train_seconds = time.perf_counter() - t0
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    target, draft = target.to(dtype).eval(), draft.to(dtype).eval()

    # validation loss of the trained models on held-out windows (contiguous positions), a sanity check
    with torch.no_grad():
        n_windows = max(1, min(8, n_val // (S["window"] + 1)))   # as many whole windows as the held-out text holds, up to 8
        xs = torch.stack([tokens[len(tokens) - n_val + i * S["window"]:][:S["window"] + 1] for i in range(n_windows)]).to(dev)
        val = {name: lm_loss(m, xs).item() for name, m in (("target", target), ("draft", draft))}
    print(f"validation loss: {val}", flush=True)
    record = dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                  target=dict(layers=S["layers"], d_model=S["d"], heads=S["heads"], params=sum(p.numel() for p in target.parameters()),
                              kv_bytes_per_token=2 * S["layers"] * S["d"] * torch.finfo(dtype).bits // 8),
                  draft=dict(layers=S["draft_layers"], d_model=S["draft_d"], params=sum(p.numel() for p in draft.parameters())),
                  training=dict(steps=S["steps"], draft_steps=S["draft_steps"], batch=S["batch"], window=S["window"], lr=S["lr"],
                                copy_prob=S["copy_prob"], copy_len=list(S["copy_len"]), copy_random=S["copy_random"], sink=S["sink"],
                                log_skips=S["log_skips"], copy_batch=S["copy_batch"], copy_window=S["copy_window"],
                                copy_warmup=S["copy_warmup"], warmup_lr=S["warmup_lr"], copy_warmup_steps=len(wl),
                                copy_warmup_final_loss=float(np.mean(wl[-20:])) if wl else None,
                                final_loss=float(np.mean(tl[-20:])), copy_window_final_loss=float(np.mean(cl[-20:])) if cl else None, draft_final_loss=float(np.mean(dl[-20:])),
                                seconds=train_seconds, validation_loss=val))
    return dict(target=target, draft=draft, tokens=tokens, n_val=n_val, record=record, bos=eos if S["sink"] else None)


def held_out_prompt(tokens: torch.Tensor, n_val: int, ctx: int, p: int, prompts: int, bos: int | None = None) -> torch.Tensor:
    """A `ctx`-token prompt ending in held-out text (prompt `p` of `prompts`), padded from the start of the stream;
    its first token is `bos` when given (as the training windows start, `train(sink=True)`)."""
    end = len(tokens) - p * (n_val // max(prompts, 1))
    ids = tokens[max(end - ctx, 0):end]
    ids = torch.cat([tokens[:ctx - len(ids)], ids]) if len(ids) < ctx else ids.clone()
    if bos is not None:
        ids[0] = bos
    return ids


def repeat_prompt(ids: torch.Tensor, passage: int, cue: int, needle: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt whose continuation is far back: a `passage`-token passage from the first 5% of `ids` is repeated at
    the end, cut after its first `cue` tokens. With `needle` (the vocabulary size), the passage is first overwritten
    with random tokens: a needle in the text that no language statistics predict, only a copy (the paper's needle
    retrieval, its Table 1). Returns (prompt [ctx], the passage's rest, which a model that reads its whole context
    can copy, and the prompt with the whole passage, on whose end `context_loss` measures it)."""
    ctx, a = len(ids), len(ids) // 20
    if needle is not None:
        ids = ids.clone()
        ids[a:a + passage] = torch.randint(1, needle, (passage,), generator=torch.Generator().manual_seed(seed))
    src = ids[a:a + passage]
    return torch.cat([ids[:ctx - cue], src[:cue]]), src[cue:], torch.cat([ids[:ctx - cue], src])


def run(data: Path, out: Path | None, size: str, seed: int = 0, **overrides):
    S = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_and_train(data, S, seed, dev)
    target, draft, tokens, n_val = built["target"], built["draft"], built["tokens"], built["n_val"]
    # the retrieval cache is selected once, from the prompt, and the new tokens are appended to it, as the official
    # code does (its graph cache is initialised after the prefill and only updated with new tokens)
    tf = TriForceConfig(budget=S["budget"], sinks=S["sinks"], window=S["draft_window"], refresh_every=S["refresh_every"])
    t0 = time.perf_counter()
    if S["compile"]:
        compile_layers(target, draft)
    for cuda_graphs in (False, True):                      # compile the kernels (and with --compile, the layers)
        autoregressive_generate(target, tokens[:300], 40, cuda_graphs=cuda_graphs)
        triforce_generate(target, draft, tokens[:300], 40, tf, cuda_graphs=cuda_graphs)
    print(f"warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    result = dict(**built["record"], date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), size=size, step="run",
                  triforce=dict(gamma1=tf.gamma1, gamma2=tf.gamma2, budget=tf.budget, chunk_size=tf.chunk_size,
                                sinks=tf.sinks, window=tf.window, refresh_every=tf.refresh_every),
                  max_new_tokens=S["new_tokens"],
                  methods=METHODS, passes=level_passes(tf), repeat=dict(passage=S["passage"], cue=S["cue"], needle=S["needle"]),
                  rows=[], levels={}, only=S["only"], compiled_layers=S["compile"], command=" ".join(["python3", *sys.argv]),
                  commit=os.environ.get("TINYLAB_COMMIT"))
    rows = result["rows"]
    needle = target.config.vocab_size if S["needle"] else None
    for ctx in S["contexts"]:
        if S["only"] and ctx not in S["only"]:             # decoded by another process (see `merge`)
            continue
        text = held_out_prompt(tokens, n_val, ctx, 0, 1, built["bos"])
        repeat, rest, with_passage = repeat_prompt(text, S["passage"], S["cue"], needle, seed)
        prompts = {"held-out text": text, "far repeat": repeat}
        if ctx == max(S["contexts"]) and len(S["contexts"]) > 1:   # the longest: the far repeat only (prefills take the time)
            del prompts["held-out text"]
        for kind, ids in prompts.items():
            for T in S["temperatures"]:
                gen = lambda: torch.Generator(dev).manual_seed(seed)   # the same random numbers for every method
                n = S["new_tokens"]
                runs = {"plain": lambda: autoregressive_generate(target, ids, n, T, gen(), cuda_graphs=True),
                        "triforce": lambda: triforce_generate(target, draft, ids, n, TriForceConfig(**{**tf.__dict__, "temperature": T}),
                                                              gen(), cuda_graphs=True),
                        "plain_sdpa": lambda: autoregressive_generate(target, ids, n, T, gen(), cuda_graphs=True, sdpa=True)}
                if T == 0:
                    runs["triforce_streaming"] = lambda: triforce_generate(
                        target, draft, ids, n, TriForceConfig(**{**tf.__dict__, "middle": "streaming"}), cuda_graphs=True)
                    if ctx in S["eager_contexts"]:
                        runs["plain_eager"] = lambda: autoregressive_generate(target, ids, n, T)
                        runs["triforce_eager"] = lambda: triforce_generate(target, draft, ids, n, tf)
                outputs = {}
                for method, fn in runs.items():
                    seq, st = fn()
                    outputs[method] = seq
                    row = dict(context=ctx, prompt=kind, temperature=T, method=method, new_tokens=st.new_tokens,
                               decode_s=st.decode_seconds, prefill_s=st.prefill_seconds, setup_s=st.setup_seconds)
                    if method.startswith("triforce"):
                        row.update(draft_acceptance=st.draft_acceptance, middle_acceptance=st.middle_acceptance,
                                   tokens_per_round=st.tokens_per_round, rounds=st.rounds, draft_proposed=st.draft_proposed,
                                   middle_proposed=st.middle_proposed)
                    if T == 0 and method != "plain":
                        row["same_as_plain"] = bool(torch.equal(seq, outputs["plain"]))
                    if kind == "far repeat":
                        row["copied"] = int((seq[ctx:ctx + len(rest)] == rest[:len(seq) - ctx]).sum())
                    rows.append(row); show(row)
                    del seq; _free(dev)
                if T == 0 and not torch.equal(outputs["triforce"], outputs["plain"]):   # where they part, how close the top two were
                    fast, plain = outputs["triforce"], outputs["plain"]
                    i = int((fast[:len(plain)] != plain[:len(fast)]).nonzero()[0])
                    with torch.no_grad():
                        top2 = target(input_ids=plain[None, :i].to(dev)).logits[0, -1].float().topk(2).values
                    rows[-len(runs) + 1].update(first_difference=i - ctx, top2_logit_gap_there=float(top2[0] - top2[1]))
                    _free(dev)
        if out is not None:                                # the rows first: a failure in the diagnostics keeps them
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
        result["levels"][str(ctx)] = {**level_costs(target, draft, text.tolist(), tf, dev, S["compile"]),
                                      "attention_share": attention_at_end(target, text.tolist(), tf),
                                      "attention_share_far_repeat": attention_at_end(target, repeat.tolist(), tf),
                                      "loss": context_loss(target, text.tolist()),
                                      "loss_far_repeat": context_loss(target, with_passage.tolist(), tail=S["passage"] - S["cue"])}
        print(f"  level costs and diagnostics: {result['levels'][str(ctx)]}", flush=True)
        _free(dev)
        if dev.type == "cuda":                             # what stays allocated between contexts (the models, ideally)
            result["levels"][str(ctx)]["allocated_gib_after"] = torch.cuda.memory_allocated(dev) / 2**30
            print(f"  {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB allocated after {ctx}", flush=True)
        if out is not None:                                # after every context, so a cut-off run keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def merge(parts: list[Path], out: Path) -> dict:
    """One record from the records of a run split over processes with `--only` (one per GPU): each trained a target
    and draft by the same recipe (the merge refuses parts whose settings differ) and decoded its own contexts.
    Training on a GPU is not bitwise repeatable (the first part's trained models are the record's `training`; each
    part keeps its own, with its command): a context's rows and diagnostics all come from one part's models."""
    recs = [json.loads(p.read_text()) for p in parts]
    same = lambda r: {k: v for k, v in r.items() if k not in ("rows", "levels", "command", "training", "only", "date")}
    recipe = lambda r: {k: v for k, v in r["training"].items() if k in TRAINING_SETTINGS}
    for p, r in zip(parts[1:], recs[1:]):
        if same(r) != same(recs[0]) or recipe(r) != recipe(recs[0]):
            raise ValueError(f"{p} is not a part of the same run as {parts[0]}: its settings differ")
    merged = {**recs[0], "rows": [row for r in recs for row in r["rows"]],
              "levels": {k: v for r in recs for k, v in r["levels"].items()},
              "parts": [dict(file=p.name, only=r["only"], command=r["command"], training=r["training"])
                        for p, r in zip(parts, recs)]}
    for key in ("only", "command"):
        merged.pop(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    print(f"merged {len(parts)} parts into {out}: contexts {sorted(int(k) for k in merged['levels'])}")
    return merged


def diagnose(data: Path, out: Path | None, size: str, seed: int = 0, **overrides):
    """Does the trained target use its long context (issue #21)? At each context: the target's loss on held-out text,
    on a far repeat of text and on a needle of random tokens (`repeat_prompt`) with the whole context and with its last
    1K tokens; the share of the newest token's attention the retrieval cache holds at the end of each prompt; and
    greedy TriForce against plain decoding on the needle (identical output, acceptance of both levels, how much of the
    passage is copied)."""
    S = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_and_train(data, S, seed, dev)
    target, draft, tokens, n_val = built["target"], built["draft"], built["tokens"], built["n_val"]
    tf = TriForceConfig(budget=S["budget"], sinks=S["sinks"], window=S["draft_window"])
    result = dict(**built["record"], date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), size=size, step="diagnose",
                  triforce=dict(gamma1=tf.gamma1, gamma2=tf.gamma2, budget=tf.budget, chunk_size=tf.chunk_size,
                                sinks=tf.sinks, window=tf.window), repeat=dict(passage=S["passage"], cue=S["cue"]), contexts={},
                  command=" ".join(["python3", *sys.argv]), commit=os.environ.get("TINYLAB_COMMIT"))
    for ctx in S["contexts"]:
        text = held_out_prompt(tokens, n_val, ctx, 0, 1, built["bos"])
        tail = S["passage"] - S["cue"]
        row = {"loss, held-out text": context_loss(target, text.tolist()),
               "attention share, held-out text": attention_at_end(target, text.tolist(), tf)}
        for kind, needle in (("far repeat", None), ("needle", target.config.vocab_size)):
            prompt, rest, with_passage = repeat_prompt(text, S["passage"], S["cue"], needle, seed)
            row[f"loss, {kind}"] = context_loss(target, with_passage.tolist(), tail=tail)
            row[f"attention share, {kind}"] = attention_at_end(target, prompt.tolist(), tf)
        n = min(S["new_tokens"], len(rest))
        plain, st_plain = autoregressive_generate(target, prompt, n)
        fast, st = triforce_generate(target, draft, prompt, n, tf)
        row["needle, greedy"] = dict(new_tokens=n, copied=int((plain[ctx:ctx + n] == rest[:n]).sum()),
                                     same_as_plain=bool(torch.equal(fast, plain)), draft_acceptance=st.draft_acceptance,
                                     middle_acceptance=st.middle_acceptance, tokens_per_round=st.tokens_per_round,
                                     plain_decode_s=st_plain.decode_seconds, triforce_decode_s=st.decode_seconds)
        if not row["needle, greedy"]["same_as_plain"]:   # where they part, and how close the target's top two were
            i = int((fast[:len(plain)] != plain[:len(fast)]).nonzero()[0])
            with torch.no_grad():
                top2 = target(input_ids=plain[None, :i].to(dev)).logits[0, -1].float().topk(2).values
            row["needle, greedy"].update(first_difference=i - ctx, top2_logit_gap_there=float(top2[0] - top2[1]))
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
    ap.add_argument("step", choices=["prepare", "run", "diagnose", "merge"])
    ap.add_argument("--data", type=Path, default=Path(".bench/triforce"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script runs")
    ap.add_argument("--contexts", type=int, nargs="+", help="override the context lengths")
    ap.add_argument("--steps", type=int, help="override the target's (and draft's) training steps")
    ap.add_argument("--new-tokens", type=int, help="override the tokens generated per prompt")
    ap.add_argument("--copy-prob", type=float, help="override the share of training windows with a long-range repeat")
    ap.add_argument("--layers", type=int, help="override the target's layers")
    ap.add_argument("--d-model", type=int, help="override the target's width")
    ap.add_argument("--heads", type=int, help="override the target's heads")
    ap.add_argument("--window", type=int, help="override the training window (tokens)")
    ap.add_argument("--batch", type=int, help="override the training batch (windows)")
    ap.add_argument("--sink", action="store_const", const=True, help="start every training window and prompt with the BOS token")
    ap.add_argument("--needle", action="store_const", const=True, help="run: the far repeat's passage is a needle of random tokens")
    ap.add_argument("--lr", type=float, help="override the learning rate")
    ap.add_argument("--log-skips", action="store_const", const=True, help="PoSE skips log-uniform rather than uniform (the paper's)")
    ap.add_argument("--copy-batch", type=int, help="short windows of repeated random blocks trained beside every batch (the target)")
    ap.add_argument("--copy-warmup", type=int, help="at most this many steps on copy windows alone before the stream (the target)")
    ap.add_argument("--warmup-lr", type=float, help="the copy warm-up's learning rate (default: --lr)")
    ap.add_argument("--copy-window", type=int, help="override the copy windows' length (tokens; blocks of 8 to a quarter of it)")
    ap.add_argument("--only", type=int, nargs="+", help="run: decode only these of the contexts (the training and prompts "
                    "stay those of the whole list), for one process per GPU; `merge` joins their records")
    ap.add_argument("--parts", type=Path, nargs="+", help="merge: the records of one run split with --only")
    ap.add_argument("--compile", action="store_const", const=True, help="run: decode with compiled layers (`compile_layers`); "
                    "each step's cost is also timed with eager layers")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.data)
    elif args.step == "merge":
        merge(args.parts, args.out)
    else:
        (run if args.step == "run" else diagnose)(args.data, args.out, "smoke" if args.smoke else "full",
                                                  contexts=args.contexts, steps=args.steps, draft_steps=args.steps,
                                                  new_tokens=args.new_tokens, copy_prob=args.copy_prob, layers=args.layers,
                                                  d=args.d_model, heads=args.heads, window=args.window, batch=args.batch,
                                                  sink=args.sink, lr=args.lr,
                                                  log_skips=args.log_skips, copy_batch=args.copy_batch, needle=args.needle,
                                                  copy_warmup=args.copy_warmup, warmup_lr=args.warmup_lr,
                                                  copy_window=args.copy_window, only=args.only,
                                                  compile=args.compile)
