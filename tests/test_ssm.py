"""tinylab.ssm: discretisation, S4D's two views, the Mamba block and language model, and the synthetic tasks."""
import math

import pytest
import torch

import numpy as np

from tinylab.core import FAILS, HOLDS, INCONCLUSIVE, decide
from tinylab.ssm import (S4D, MambaBlock, SSMLM, associative_recall, discretize, fft_conv, induction_heads, joint_outcome,
                         reaches, s4d_kernel, s4d_recurrent, selective_copying, speedup_outcome, ssm_recurrence)

F64 = torch.float64


def test_zoh_exact_for_constant_input():
    a, b = discretize(torch.tensor([[-2.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64), 0.25)
    y = ssm_recurrence(a, b, torch.tensor([[1.0]], dtype=F64), 0.0, torch.ones(6, dtype=F64))
    t = 0.25 * torch.arange(1, 7, dtype=F64)
    torch.testing.assert_close(y, 1.5 * (1 - torch.exp(-2 * t)))


def test_bilinear_is_second_order():
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=F64)
    B = torch.ones(2, 1, dtype=F64)
    errs = []
    for dt in (0.1, 0.05, 0.025):
        exact, _ = discretize(A, B, dt, "zoh")
        approx, _ = discretize(A, B, dt, "bilinear")
        n = round(1 / dt)
        errs.append((torch.linalg.matrix_power(exact, n) - torch.linalg.matrix_power(approx, n)).abs().max().item())
    assert 3.5 < errs[0] / errs[1] < 4.5 and 3.5 < errs[1] / errs[2] < 4.5, errs


@pytest.mark.parametrize("A,B,dt,method,match", [
    (torch.zeros(2, 3), torch.zeros(2, 1), 0.1, "zoh", "square"),
    (torch.zeros(2, 2), torch.zeros(3, 1), 0.1, "zoh", "B must have shape"),
    (torch.eye(2), torch.zeros(2, 1), 0.0, "zoh", "dt must be positive"),
    (torch.eye(2), torch.zeros(2, 1), 0.1, "euler", "method"),
])
def test_discretize_bad_inputs(A, B, dt, method, match):
    with pytest.raises(ValueError, match=match):
        discretize(A, B, dt, method)


@pytest.mark.parametrize("batch,T,D,d_state", [(1, 1, 1, 2), (2, 63, 5, 8), (3, 100, 7, 16)])
def test_s4d_convolution_equals_recurrence(batch, T, D, d_state):
    torch.manual_seed(T)
    layer = S4D(D, d_state).double()
    u = torch.randn(batch, T, D, dtype=F64)
    log_dt, A, C = layer.params()
    torch.testing.assert_close(layer(u), s4d_recurrent(u, log_dt, A, C, layer.D), atol=1e-10, rtol=1e-10)


def test_s4d_kernel_matches_impulse_response():
    torch.manual_seed(0)
    layer = S4D(3, 8).double()
    log_dt, A, C = layer.params()
    impulse = torch.zeros(1, 20, 3, dtype=F64); impulse[:, 0] = 1
    torch.testing.assert_close(s4d_recurrent(impulse, log_dt, A, C)[0].T, s4d_kernel(log_dt, A, C, 20))


def test_fft_conv_is_causal_and_not_circular():
    K = torch.zeros(1, 8); K[0, 1] = 1.0  # a one-step delay
    u = torch.arange(1.0, 9.0).view(1, 8, 1)
    torch.testing.assert_close(fft_conv(u, K), torch.cat([torch.zeros(1, 1, 1), u[:, :-1]], 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixer", ["selective", "s4d"])
def test_mamba_lm_shapes_causality_and_gradients(mixer):
    torch.manual_seed(0)
    lm = SSMLM(11, d_model=16, n_layers=2, d_state=4, mixer=mixer)
    ids = torch.randint(11, (2, 17))
    logits = lm(ids)
    assert logits.shape == (2, 17, 11)
    ids2 = ids.clone(); ids2[:, 9] = (ids2[:, 9] + 1) % 11
    torch.testing.assert_close(lm(ids2)[:, :9], logits[:, :9])
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in lm.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("mixer", ["selective", "s4d"])
def test_no_gate_block(mixer):
    "The paper's 'no gate' ablation: no conv, no z branch, still causal and differentiable."
    torch.manual_seed(0)
    blk = MambaBlock(8, d_state=4, mixer=mixer, gate=False)
    assert blk.conv is None and blk.in_proj.out_features == blk.d_inner
    x = torch.randn(2, 13, 8, requires_grad=True)
    y = blk(x)
    x2 = x.detach().clone(); x2[:, 7:] += 1
    torch.testing.assert_close(blk(x2)[:, :7], y[:, :7].detach())
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert count(MambaBlock(8, d_state=4, mixer=mixer, gate=False)) < count(MambaBlock(8, d_state=4, mixer=mixer))


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_mamba_block_triton_path_matches_chunked():
    torch.manual_seed(1)
    blk = MambaBlock(8, d_state=3)
    x = torch.randn(1, 11, 8, requires_grad=True)
    y1 = blk(x); g1 = torch.autograd.grad(y1.sum(), x)[0]
    blk.backend = "triton"
    y2 = blk(x); g2 = torch.autograd.grad(y2.sum(), x)[0]
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


def test_mamba_block_delta_starts_in_range():
    blk = MambaBlock(32, dt_min=1e-3, dt_max=1e-1)
    dt = torch.nn.functional.softplus(blk.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def test_bad_mixer():
    with pytest.raises(ValueError, match="mixer"):
        MambaBlock(8, mixer="attention")


def test_selective_copying_targets():
    g = torch.Generator().manual_seed(0)
    x, y = selective_copying(64, 20, 5, 6, g)
    assert x.shape == y.shape == (64, 25)
    assert ((x[:, :20] > 1).sum(1) == 5).all() and (x[:, 20:] == 1).all()
    torch.testing.assert_close(x[:, :20][x[:, :20] > 1].view(64, 5), y[:, 20:])
    assert (y[:, :20] == -100).all() and y[:, 20:].min() >= 2 and y[:, 20:].max() <= 7


def test_associative_recall_targets():
    g = torch.Generator().manual_seed(0)
    x, y = associative_recall(32, 5, 3, 8, g)
    assert x.shape == (32, 13)
    for i in range(32):
        keys = x[i, 0:10:2].tolist()
        assert len(set(keys)) == 5
        table = dict(zip(keys, x[i, 1:10:2].tolist()))
        assert [table[k] for k in x[i, 10:].tolist()] == y[i, 10:].tolist()
    assert (y[:, :10] == -100).all()


def test_induction_heads_targets():
    g = torch.Generator().manual_seed(0)
    x, y = induction_heads(64, 20, 6, g)
    assert x.shape == y.shape == (64, 20)
    assert (x[:, -1] == 6).all() and ((x[:, :-1] == 6).sum(1) == 1).all()     # the trigger once inside, once last
    pos = (x[:, :-1] == 6).int().argmax(1)
    torch.testing.assert_close(y[:, -1], x[torch.arange(64), pos + 1])
    assert (y[:, :-1] == -100).all() and (pos + 1 < 19).all()
    with pytest.raises(ValueError, match="seq_len"):
        induction_heads(2, 3, 6)


@pytest.mark.parametrize("fn,args,match", [
    (selective_copying, (2, 3, 4, 5), "copy_tokens"),
    (associative_recall, (2, 9, 2, 8), "n_pairs"),
    (associative_recall, (2, 3, 4, 8), "n_queries"),
])
def test_task_bad_sizes(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# The claim table's own criteria (nbs/10_ssm.ipynb, "Claim table"): each can come out "does not hold".

def test_reaches_fails_holds_and_straddles():
    assert decide(reaches(np.full(300, 0.5), 0.9)) == FAILS                  # a model at 50% does not reach 90%
    assert decide(reaches(np.ones(300), 0.9)) == HOLDS
    coin = np.random.default_rng(0).permutation(np.r_[np.ones(27), np.zeros(3)])  # 90% of 30 examples
    assert decide(reaches(coin, 0.9)) == INCONCLUSIVE


def test_joint_outcome():
    assert joint_outcome([HOLDS, FAILS]) == FAILS
    assert joint_outcome([INCONCLUSIVE, FAILS]) == FAILS
    assert joint_outcome([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert joint_outcome(iter([HOLDS, HOLDS])) == HOLDS
    for bad in ([], ["yes"], [True]):
        with pytest.raises(ValueError, match="outcomes"):
            joint_outcome(bad)


def test_speedup_outcome():
    assert speedup_outcome([5.0, 8.0, 12.0], 20) == FAILS                  # slower than the paper's factor everywhere
    assert speedup_outcome([25.0, 104.0], 20) == HOLDS
    assert speedup_outcome([15.0, 30.0], 20) == INCONCLUSIVE
    for bad in ([], [[20.0]], [float("nan")], [0.0]):
        with pytest.raises(ValueError, match="speedups"):
            speedup_outcome(bad, 20)
