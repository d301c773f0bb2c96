"""Trains a tiny LM with tinylab.lm.train_lm; run under `accelerate launch` to check the multi-process path."""
import json, sys, tempfile
from pathlib import Path
import torch
from accelerate import PartialState
from tinylab.lm import TrainConfig, build_model, load_corpus, tiny_config, tokenize_blocks, train_lm, train_tokenizer

out = Path(sys.argv[1])
state = PartialState(cpu=not torch.cuda.is_available())
root = Path(tempfile.mkdtemp())
g = torch.Generator().manual_seed(0)
words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
for i in range(6):
    (root / f"d{i}.txt").write_text(" ".join(words[j] for j in torch.randint(len(words), (600,), generator=g)))
corpus = load_corpus(root, validation_fraction=0.2)
tok = train_tokenizer(corpus["train"]["text"], vocab_size=280)
train, val = (tokenize_blocks(corpus[s], tok, 16) for s in ("train", "validation"))
model = build_model(tiny_config(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, block_size=16, tokenizer=tok), seed=0)
h = train_lm(model, train, val, TrainConfig(steps=20, batch_size=4, lr=1e-2, eval_every=10, eval_batches=2))
if state.is_main_process:
    out.write_text(json.dumps({"num_processes": state.num_processes, "eval_loss": h.eval_loss, "tokens": h.tokens}))
