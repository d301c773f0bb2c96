"""Where a TriForce step's time goes (issue #21), on one GPU: the kernels of each level's step by kind, and what a
decoding loop adds to a step's GPU time. The target and draft are `bench_triforce_e2e.py`'s (4 layers of 2048, and
2 of 256), with random weights (a step's cost does not depend on them) and compiled layers (`compile_layers`).

At each context:
  - kernels: each level's step (`bench_triforce_e2e.level_passes`) run eagerly under `torch.profiler`, the same
    kernels its CUDA graph replays; their GPU time and count by kind (matrix products, the compiled layers' fused
    kernels, our attention kernel, other PyTorch kernels);
  - the decoding loop's layers of cost, per step of each level: the graph's GPU time (replays back to back), a
    replay followed by a synchronisation (what a loop that reads the next token must wait for), the step as the
    decoders ran it before they drew tokens on the GPU (the next-token distribution copied to the CPU and sampled
    there, then copied back as the next input), and as they run it now (greedy token drawn on the GPU and fed to the
    next step there, steps queued back to back, one wait at the end of 64), against the per-token decode time of
    `autoregressive_generate` itself.
Usage: PYTHONPATH=. python3 benchmarks/profile_triforce_steps.py --out book/results/triforce_profile_h200.json
(`--smoke`: tiny sizes on any device, to check the script runs)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_triforce_e2e import SIZES, level_passes, llama, prefilled_steps          # noqa: E402
from tinylab.core import benchmark                                                   # noqa: E402
from tinylab.triforce import TriForceConfig, autoregressive_generate, compile_layers, draw, to_probs  # noqa: E402

KINDS = {  # kernel kind -> substrings of the kernel names that mark it (the first match wins; else "other")
    "attention (ours)": ("sparse_decode", "combine_splits"),
    "matrix products": ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas"),
    "compiled layers (fused)": ("triton_",),
}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KINDS.items() if any(m in low for m in marks)), "other")


def kernels(fn, repeats: int) -> dict:
    "GPU microseconds and count per call of `fn`'s kernels, by kind (`kind_of`), with the five costliest kernel names."
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    us, count, by_name = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0 and "memcpy" not in e.name.lower():
            us[kind_of(e.name)] += e.device_time_total / repeats; count[kind_of(e.name)] += 1
            by_name[e.name] += e.device_time_total / repeats
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return dict(us=dict(us), count={k: v // repeats for k, v in count.items()}, top=[[n[:120], t] for n, t in top])


@torch.no_grad()
def profile_context(target, draft, ids: list[int], tf: TriForceConfig, new_tokens: int, dev) -> dict:
    out = {}
    with prefilled_steps(target, draft, ids, tf) as (levels, steps):
        n_tokens = {"draft": 1, "middle": tf.gamma1 + 1, "full1": 1, "check": tf.gamma2 + 1}
        level = {"draft": levels.draft, "middle": levels.middle, "full1": levels.full, "check": levels.full}
        for name in ("draft", "middle", "full1", "check"):
            step, undo, graph = steps[name]
            step(); undo()                                           # captures the graph
            g = graph()
            eager = lambda: (g.fn(g.inputs), undo())                 # the captured function, run eagerly
            out[name] = {"kernels": kernels(eager, 5)}
            replay_sync = lambda: (g.graph.replay(), torch.cuda.synchronize())

            def cpu_sampled(step=step, undo=undo):
                "the old loop: distribution to the CPU, sampled there, the token copied back as the next input"
                x = int(torch.multinomial(to_probs(step()[-1], 0.0).cpu(), 1)); undo()
                return x

            def drawn_on_gpu(step=level[name], undo=undo, t=n_tokens[name], n=64):
                "the loop now: each token drawn on the GPU and fed to the next step there; one wait after n steps"
                x = torch.ones(1, dtype=torch.long, device=dev)
                for _ in range(n):
                    x = draw(to_probs(step(x.expand(t))[-1], 0.0)).view(1); undo()
                torch.cuda.synchronize()
            out[name]["gpu_ms"] = do_bench(g.graph.replay, warmup=3, rep=40, return_mode="median")
            out[name]["wall_ms"] = benchmark({"replay + sync": replay_sync, "loop step, sampled on the CPU": cpu_sampled},
                                             warmup=3, repeats=30, device=dev)["ms"].to_dict()
            out[name]["wall_ms"]["loop step, drawn on the GPU"] = benchmark(
                {"x": drawn_on_gpu}, warmup=1, repeats=5, device=dev)["ms"]["x"] / 64
    prompt = torch.tensor(ids)
    _, st = autoregressive_generate(target, prompt, new_tokens, cuda_graphs=True)
    out["full1"]["wall_ms"]["autoregressive_generate, per token"] = st.decode_seconds * 1e3 / st.new_tokens
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 131072])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (on a GPU)")
    args = ap.parse_args()
    S, dev = SIZES["smoke" if args.smoke else "full"], torch.device("cuda")
    contexts = [256, 512] if args.smoke else args.contexts
    torch.manual_seed(0)
    max_pos = max(contexts) + 1024
    target = LlamaForCausalLM(llama(2048, S["d"], S["layers"], S["heads"], max_pos, 0)).to(dev, torch.bfloat16).eval()
    draft = LlamaForCausalLM(llama(2048, S["draft_d"], S["draft_layers"], S["draft_heads"], max_pos, 0)).to(dev, torch.bfloat16).eval()
    tf = TriForceConfig(budget=S["budget"], sinks=S["sinks"], window=S["draft_window"])
    compile_layers(target, draft)
    t0 = time.perf_counter()
    warm = torch.randint(1, 2048, (300,))
    autoregressive_generate(target, warm, 40, cuda_graphs=True)
    rec = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, script="benchmarks/profile_triforce_steps.py",
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), commit=os.environ.get("TINYLAB_COMMIT"),
               command=" ".join(["python3", *sys.argv]), compiled_layers=True, random_weights=True,
               target=dict(layers=S["layers"], d_model=S["d"]), draft=dict(layers=S["draft_layers"], d_model=S["draft_d"]),
               passes={k: v for k, v in level_passes(tf).items() if k in ("draft", "middle", "full1", "check")},
               kinds={k: list(v) for k, v in KINDS.items()}, new_tokens=args.new_tokens, contexts={})
    print(f"warm-up {time.perf_counter() - t0:.0f} s", flush=True)
    for ctx in contexts:
        ids = torch.randint(1, 2048, (ctx,)).tolist()
        rec["contexts"][str(ctx)] = profile_context(target, draft, ids, tf, args.new_tokens, dev)
        print(ctx, json.dumps(rec["contexts"][str(ctx)]), flush=True)
        torch.cuda.empty_cache()
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
