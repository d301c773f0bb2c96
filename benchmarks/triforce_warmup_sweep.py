"""Does the TriForce target's copy warm-up form a copying circuit (issue #21)? One fresh target (the end-to-end
benchmark's `llama`, seed 0) trained on the copy warm-up alone (`train(..., copy_warmup=MAX_STEPS)`: repeated random
blocks until the loss falls below 0.7 ln V), printing its loss every 100 steps; the runs of
book/results/triforce_warmup_h200.json, one process each (several shared the H200 at once).

GPU:   PYTHONPATH=. python3 benchmarks/triforce_warmup_sweep.py D LAYERS HEADS LR MAX_STEPS [BATCH]
       e.g. 2048 4 16 1e-4 8000 (the end-to-end target at lr 1e-4, 32 windows of 256 tokens a step)"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_triforce_e2e import llama, train  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
for name, kind in (("d", int), ("layers", int), ("heads", int), ("lr", float), ("steps", int)):
    ap.add_argument(name, type=kind)
ap.add_argument("batch", type=int, nargs="?", default=32, help="copy windows a step")
args = ap.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = LlamaForCausalLM(llama(2048, args.d, args.layers, args.heads, 132096, 0)).to(dev)
print(f"d{args.d} L{args.layers} H{args.heads} lr{args.lr} batch{args.batch}", flush=True)
# one stream step on a dummy stream after the warm-up (train needs one); only the warm-up's losses are reported
w = train(model, torch.zeros(10**5, dtype=torch.long), 1, 8, 4096, args.lr, 132096, 0, dev, copy_batch=args.batch,
          copy_warmup=args.steps)["warmup"]
print(f"RESULT d{args.d} L{args.layers} H{args.heads} lr{args.lr} b{args.batch}: steps {len(w)}, last-20 loss "
      f"{np.mean(w[-20:]):.3f}, every 500: {[round(float(np.mean(w[i:i + 20])), 3) for i in range(0, len(w), 500)]}", flush=True)
