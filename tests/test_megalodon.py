"""The Megalodon model of chapter 11_megalodon: chunk-wise attention, streaming == one pass (also with the ablation
switches), the bounded inference state, what crosses a chunk boundary, the passkey task, config errors, and a few
training steps through tinylab.lm.train_lm."""
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from tinylab.lm import TrainConfig, count_params, train_lm
from tinylab.megalodon import (KEY, QUERY, ComplexEMA, MegalodonConfig, MegalodonForCausalLM, TimestepNorm,
                               chunk_attention, passkey_batch, rotary)


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


@pytest.mark.parametrize("kw", [dict(use_cema=False), dict(norm="layer"), dict(norm_attention=False),
                                dict(use_cema=False, norm="layer")], ids=["no-cema", "layer-norm", "plain-attn", "neither"])
def test_ablations_stream_like_one_pass(kw):
    torch.manual_seed(0)
    cfg = MegalodonConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, cema_ndim=4, chunk_size=8, **kw)
    model = MegalodonForCausalLM(cfg).double().eval()
    assert (model.layers[0].attn.cema is None) == (not cfg.use_cema)
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        state, outs, pos = [], [], 0
        for n in (5, 7, 9):
            out = model(ids[:, pos:pos + n], state=state, pos=pos)
            state, pos = out.state, pos + n
            outs.append(out.logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-9, rtol=1e-9)


def test_without_cema_and_timestep_norm_nothing_crosses_a_chunk():
    "Chunk attention alone: chunk 2's logits do not depend on chunk 1; with CEMA (or timestep norm) they do."
    ids = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[:, :8] = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(4))
    for kw, crosses in ((dict(use_cema=False, norm="layer"), False), (dict(norm="layer"), True), (dict(use_cema=False), True)):
        torch.manual_seed(0)
        model = MegalodonForCausalLM(MegalodonConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, cema_ndim=4,
                                                     chunk_size=8, **kw)).double().eval()
        with torch.no_grad():
            diff = (model(ids).logits[:, 8:] - model(other).logits[:, 8:]).abs().max().item()
        assert (diff > 1e-6) == crosses, (kw, diff)


def test_passkey_batch():
    ids, answer = passkey_batch(64, 8, 5, 30, n_chunks=3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (64, 24) and answer.shape == (64,)
    assert ((answer >= 2) & (answer < 7)).all() and (ids[:, -1] == answer).all() and (ids[:, -2] == QUERY).all()
    for row, a in zip(ids, answer):
        at = (row[:8] == KEY).nonzero().flatten()
        assert len(at) == 1 and at.item() < 7 and row[at + 1].item() == a        # the key and its passkey in chunk 1
        assert ((row[8:-2] >= 7)).all()                                          # filler only after chunk 1
    with pytest.raises(ValueError, match="n_chunks"):
        passkey_batch(2, 8, 5, 30, n_chunks=1)
    with pytest.raises(ValueError, match="vocab"):
        passkey_batch(2, 8, 5, 7)


def test_bad_norm_name():
    with pytest.raises(ValueError, match="norm must be"):
        MegalodonConfig(vocab_size=10, d_model=32, norm="group")
