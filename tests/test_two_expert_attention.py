"""Two-expert attention (tinylab.kernels.two_expert_attention): the fused Triton kernel vs the PyTorch reference (two
attentions and the router's mix), both output layouts, odd sizes, fp32 and bf16, and bad inputs. Triton runs in its
interpreter on a CPU, so the shapes are small but never multiples of the blocks."""
import pytest
import torch
import torch.nn.functional as F

import tinylab.kernels.two_expert_attention as tea

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}   # max abs error against the float32 definition
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, N, M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(B, H, N, D, generator=g).to(DEV, dtype) for _ in range(2)]
    kv = [torch.randn(B, H, M, D, generator=g).to(DEV, dtype) for _ in range(4)]
    return qs[0], kv[0], kv[1], qs[1], kv[2], kv[3], torch.rand(B, N, generator=g).to(DEV)


def assert_close(name, ref, out, tol):
    err = (out.double() - ref.double()).abs().max().item()
    print(f"{name}: max abs {err:.2e}")
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= tol, f"{name}: max abs error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("B,H,N,M,D", [
    pytest.param(1, 1, 1, 1, 8, id="N1-M1-D8"),
    pytest.param(2, 3, 37, 37, 40, id="self-N37-D40"),
    pytest.param(1, 2, 50, 7, 24, id="cross-N50-M7-D24"),
    pytest.param(2, 1, 33, 77, 80, id="cross-N33-M77-D80"),
    pytest.param(1, 2, 17, 63, 60, id="N17-M63-D60"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["mixed", "split"])
def test_triton_matches_reference(poison_empty, B, H, N, M, D, dtype, split):
    args = inputs(B, H, N, M, D, dtype, seed=N + M)
    ref = tea.two_expert_attention_ref(*(a.float() for a in args[:6]), args[6], split)
    out = tea.two_expert_attention(*args, split=split, backend="triton")
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.shape == ((B, N, 2, H, D) if split else (B, H, N, D))
    assert_close("out", ref, out, TOL[dtype])


def test_reference_is_two_sdpa_and_the_mix():
    q1, k1, v1, q2, k2, v2, r = inputs(2, 2, 9, 5, 16, torch.float32)
    a1, a2 = F.scaled_dot_product_attention(q1, k1, v1), F.scaled_dot_product_attention(q2, k2, v2)
    g = r[:, None, :, None]
    assert_close("mixed", g * a1 + (1 - g) * a2, tea.two_expert_attention_ref(q1, k1, v1, q2, k2, v2, r), 1e-6)
    split = tea.two_expert_attention_ref(q1, k1, v1, q2, k2, v2, r, split=True)   # (B, N, 2, H, D)
    assert_close("split, expert 1", (g * a1).transpose(1, 2), split[:, :, 0], 1e-6)
    assert_close("split, expert 2", ((1 - g) * a2).transpose(1, 2), split[:, :, 1], 1e-6)
    # the halves summed are the mix; r = 1 gives expert 1 alone
    assert_close("sum of halves", split.sum(2).transpose(1, 2), tea.two_expert_attention_ref(q1, k1, v1, q2, k2, v2, r), 1e-6)
    ones = tea.two_expert_attention_ref(q1, k1, v1, q2, k2, v2, torch.ones_like(r))
    assert torch.equal(ones, a1)


def test_auto_dispatch_and_non_contiguous():
    q1, k1, v1, q2, k2, v2, r = inputs(1, 2, 11, 11, 16, torch.float32)
    ref = tea.two_expert_attention_ref(q1, k1, v1, q2, k2, v2, r)
    if DEV == "cpu":   # auto is the reference on CPU tensors
        assert torch.equal(tea.two_expert_attention(q1, k1, v1, q2, k2, v2, r), ref)
    qt = q1.transpose(2, 3).contiguous().transpose(2, 3)            # same values, other strides
    assert_close("non-contiguous", ref, tea.two_expert_attention(qt, k1, v1, q2, k2, v2, r, backend="triton"), 1e-5)


@pytest.mark.parametrize("case,match", [
    pytest.param(lambda a: (a[0][0],) + a[1:], r"q1 must have shape \(B, H, N, D\)", id="q1-ndim"),
    pytest.param(lambda a: a[:3] + (a[3][:, :1],) + a[4:], "q2 must have q1's shape", id="q2-shape"),
    pytest.param(lambda a: (a[0], a[1][..., :4]) + a[2:], "k1 must have shape", id="k1-D"),
    pytest.param(lambda a: a[:2] + (a[2][:, :, :2],) + a[3:], "v1 must have k1's shape", id="v1-shape"),
    pytest.param(lambda a: a[:5] + (a[5][:, :, :1],) + a[6:], "v2 must have k1's shape", id="v2-shape"),
    pytest.param(lambda a: a[:6] + (a[6][:, :3],), r"r \(the prior expert's weight", id="r-shape"),
    pytest.param(lambda a: a[:4] + (a[4].double(),) + a[5:], "k2 must have q1's dtype", id="k2-dtype"),
    pytest.param(lambda a: (a[0].int(),) + a[1:], "q1 must be float16, bfloat16 or float32", id="q1-int"),
    pytest.param(lambda a: a[:6] + (a[6].long(),), "r must be a floating-point", id="r-int"),
    pytest.param(lambda a: a[:6] + ([0.5],), "r must be a torch.Tensor", id="r-list"),
])
def test_bad_inputs(case, match):
    args = inputs(1, 2, 5, 3, 8, torch.float32)
    exc = TypeError if any(w in match for w in ("dtype", "must be float", "floating", "torch.Tensor")) else ValueError
    with pytest.raises(exc, match=match):
        tea.two_expert_attention(*case(args))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be"):
        tea.two_expert_attention(*inputs(1, 1, 2, 2, 8, torch.float32), backend="cuda")
