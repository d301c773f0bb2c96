"""The Megalodon model of chapter 11_megalodon: chunk-wise attention, streaming == one pass, the
bounded inference state, config errors, and a few training steps through tinylab.lm.train_lm."""
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from tinylab.lm import TrainConfig, count_params, train_lm
from tinylab.megalodon import (ComplexEMA, MegalodonConfig, MegalodonForCausalLM, TimestepNorm, chunk_attention,
                               rotary)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = MegalodonConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, cema_ndim=4, chunk_size=8)
    return MegalodonForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("T,chunk", [(1, 4), (10, 4), (8, 8), (13, 32)])
def test_chunk_attention_is_block_diagonal_causal(T, chunk):
    q, k, v = torch.randn(3, 2, 2, T, 8).unbind(0)
    i = torch.arange(T)
    mask = (i[:, None] // chunk == i[None] // chunk) & (i[None] <= i[:, None])
    pos = i % chunk
    ref = F.scaled_dot_product_attention(rotary(q, pos), rotary(k, pos), v, attn_mask=mask, scale=1.0)
    torch.testing.assert_close(chunk_attention(q, k, v, chunk), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pieces", [(29,), (5, 1, 11, 12), (8, 8, 8, 5), (1,) * 29], ids=["whole", "uneven", "aligned", "tokens"])
def test_streaming_equals_one_pass(tiny, pieces):
    ids = torch.randint(0, 61, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny(ids).logits
        state, outs, pos = [], [], 0
        for n in pieces:
            out = tiny(ids[:, pos:pos + n], state=state, pos=pos)
            state, pos = out.state, pos + n
            outs.append(out.logits)
            # never more than one (unfinished) chunk of keys and values is kept
            assert all(s.k is None or s.k.shape[2] < tiny.config.chunk_size for s in state[:-1])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-9, rtol=1e-9)


def test_loss_and_params(tiny):
    ids = torch.randint(0, 61, (2, 16))
    out = tiny(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - math.log(61)) < 0.5
    assert count_params(tiny) == sum(p.numel() for p in tiny.parameters())


def test_cema_layer_is_stable():
    p, q, eta = ComplexEMA(16, 8).coeffs()
    assert (q.abs() < 1).all() and (p > 0).all() and (p < 1).all()
    assert q.shape == eta.shape == (16, 8)


def test_trains_with_train_lm():
    torch.manual_seed(0)
    cfg = MegalodonConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=1, cema_ndim=4, chunk_size=8)
    model = MegalodonForCausalLM(cfg)
    blocks = Dataset.from_dict({"input_ids": [[i % 7 + j for i in range(16)] for j in range(16)]}).with_format("torch")
    h = train_lm(model, blocks, blocks, TrainConfig(steps=25, batch_size=8, lr=1e-2, eval_every=25, eval_batches=1))
    assert h.eval_loss[-1] < 0.7 * h.eval_loss[0], h.eval_loss


@pytest.mark.parametrize("kw,match", [(dict(d_model=30, n_heads=4), "divisible"), (dict(d_model=32, norm_groups=5), "norm_groups")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MegalodonConfig(vocab_size=10, **kw)


def test_bad_timestep_norm_groups():
    with pytest.raises(ValueError, match="must divide"):
        TimestepNorm(10, 3)
