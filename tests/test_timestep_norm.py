"""Timestep normalisation (chapter 11_megalodon): the Triton Welford scan and the analytic backward
against the cumulative-sum reference; bad inputs. On a CPU the kernel runs under TRITON_INTERPRET=1."""
import pytest
import torch

from tinylab.kernels.timestep_norm import timestep_norm, timestep_norm_ref
from kernel_asserts import assert_close

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def make(B, T, D, G, dtype=torch.float32, seed=0, prior=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, D, generator=g) * 2 + 0.5).to(dtype)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    if not prior:
        return x, w, b, None, None, None
    c0 = torch.randint(0, 5, (B,), generator=g)
    m0, v0 = torch.randn(B, G, generator=g), torch.rand(B, G, generator=g) + 0.5
    return x, w, b, c0, m0, v0


SHAPES = [pytest.param(1, 1, 4, 1, id="T1-K4"), pytest.param(2, 19, 10, 2, id="T19-K5"),
          pytest.param(1, 37, 12, 4, id="T37-K3"), pytest.param(2, 16, 64, 2, id="T16-K32")]


@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "prior"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("B,T,D,G", SHAPES)
def test_triton_forward(poison_empty, B, T, D, G, dtype, prior):
    x, w, b, c0, m0, v0 = make(B, T, D, G, dtype, prior=prior)
    ref = timestep_norm_ref(x, G, w, b, c0, m0, v0)
    tri = timestep_norm(x, G, w, b, c0, m0, v0, backend="triton")
    assert tri[0].dtype == dtype
    assert_close("y", ref[0].float(), tri[0].float(), TOL[dtype])
    assert torch.equal(ref[1], tri[1])
    assert_close("mean", ref[2], tri[2], TOL[torch.float32])
    assert_close("var", ref[3], tri[3], TOL[torch.float32])


@pytest.mark.parametrize("B,T,D,G", SHAPES[1:])
def test_triton_backward(poison_empty, B, T, D, G):
    x, w, b, c0, m0, v0 = make(B, T, D, G)
    ref = [t.clone().requires_grad_() for t in (x, w, b, m0, v0)]
    tri = [t.clone().requires_grad_() for t in (x, w, b, m0, v0)]
    o_ref = timestep_norm_ref(ref[0], G, ref[1], ref[2], c0, ref[3], ref[4])
    o_tri = timestep_norm(tri[0], G, tri[1], tri[2], c0, tri[3], tri[4], backend="triton")
    cot = [torch.randn_like(o_ref[0]), torch.randn_like(o_ref[2]), torch.randn_like(o_ref[3])]
    loss = lambda o: (o[0] * cot[0]).sum() + (o[2] * cot[1]).sum() + (o[3] * cot[2]).sum()
    for name, a, bb in zip(["x", "weight", "bias", "prev_mean", "prev_var"],
                           torch.autograd.grad(loss(o_ref), ref), torch.autograd.grad(loss(o_tri), tri)):
        assert_close(f"d{name}", a, bb, 1e-3)


@pytest.mark.parametrize("B,T,D,G", SHAPES[1:3])
def test_triton_backward_without_prior(poison_empty, B, T, D, G):
    "No prior: the kernel starts from 0 steps in-kernel and the backward gives no gradient for the absent prior."
    x, w, b, *_ = make(B, T, D, G, prior=False)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    tri = [t.clone().requires_grad_() for t in (x, w, b)]
    o_ref = timestep_norm_ref(ref[0], G, ref[1], ref[2])
    o_tri = timestep_norm(tri[0], G, tri[1], tri[2], backend="triton")
    assert torch.equal(o_ref[1], o_tri[1])
    cot = [torch.randn_like(o_ref[0]), torch.randn_like(o_ref[2]), torch.randn_like(o_ref[3])]
    loss = lambda o: (o[0] * cot[0]).sum() + (o[2] * cot[1]).sum() + (o[3] * cot[2]).sum()
    for name, a, bb in zip(["x", "weight", "bias"], torch.autograd.grad(loss(o_ref), ref),
                           torch.autograd.grad(loss(o_tri), tri)):
        assert_close(f"d{name}", a, bb, 1e-3)


@pytest.mark.parametrize("given", ["prev_count", "prev_mean", "prev_var"])
def test_partial_prior_takes_defaults_for_the_rest(poison_empty, given):
    x, w, b, c0, m0, v0 = make(2, 19, 10, 2)
    kw = {given: dict(prev_count=c0, prev_mean=m0, prev_var=v0)[given]}
    ref = timestep_norm_ref(x, 2, w, b, **kw)
    tri = timestep_norm(x, 2, w, b, backend="triton", **kw)
    assert torch.equal(ref[1], tri[1])
    for name, i in (("y", 0), ("mean", 2), ("var", 3)):
        assert_close(name, ref[i], tri[i], TOL[torch.float32])


def test_gradcheck_float64():
    x, w, b, c0, m0, v0 = make(1, 10, 4, 2)
    ins = [t.double().requires_grad_() for t in (x, w, b, m0, v0)]
    def f(x, w, b, m, v):
        y, _, mean, var = timestep_norm(x, 2, w, b, c0, m, v, backend="triton")
        return y, mean, var
    assert torch.autograd.gradcheck(f, ins, fast_mode=True)


def test_segments_equal_one_pass():
    x, w, b, *_ = make(2, 21, 8, 2, prior=False)
    y, c, m, v = timestep_norm(x, 2, w, b, backend="triton")
    y1, *s = timestep_norm(x[:, :9].contiguous(), 2, w, b, backend="triton")
    y2, c2, m2, v2 = timestep_norm(x[:, 9:].contiguous(), 2, w, b, *s, backend="triton")
    assert_close("y segments", y, torch.cat([y1, y2], 1), 1e-4)
    assert torch.equal(c, c2)
    assert_close("var segments", v, v2, 1e-4)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("B,T,D,G", [pytest.param(1, 41, 6, 2, id="T41-K3"), pytest.param(2, 70, 20, 4, id="T70-K5")])
def test_time_segments(poison_empty, B, T, D, G, dtype):
    "Split into time segments (pass 1: each segment's summary; pass 2: merge the ones before, then scan), last one partial."
    from tinylab.kernels.timestep_norm import _segments
    S, seg_len = _segments(B, T, G, 8, torch.device("cpu"))
    assert S > 1 and T % seg_len != 0
    x, w, b, c0, m0, v0 = make(B, T, D, G, dtype, seed=3)
    x = (x.float() + 30).to(dtype)                  # a mean far from zero: the merges must keep their digits
    ref = timestep_norm_ref(x, G, w, b, c0, m0, v0)
    tri = timestep_norm(x, G, w, b, c0, m0, v0, backend="triton")
    assert_close("y", ref[0].float(), tri[0].float(), TOL[dtype])
    assert_close("mean", ref[2], tri[2], TOL[torch.float32])
    assert_close("var", ref[3], tri[3], 1e-3)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=torch.randn(4, 8)), ValueError, "x must be"),
    (dict(x=torch.randint(0, 3, (1, 4, 8))), TypeError, "x must be float"),
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have shape"),
    (dict(prev_count=torch.zeros(1)), TypeError, "prev_count must be int64"),
    (dict(prev_mean=torch.zeros(1, 3)), ValueError, "prev_mean must have shape"),
    (dict(backend="magic"), ValueError, "backend"),
], ids=["x-2d", "x-int", "groups", "weight", "count-dtype", "mean-shape", "backend"])
def test_bad_inputs(kw, exc, match):
    args = dict(x=torch.randn(1, 4, 8), num_groups=2, weight=torch.ones(8), bias=torch.zeros(8), backend="triton")
    args.update(kw)
    with pytest.raises(exc, match=match):
        timestep_norm(**args)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_large_mean_small_spread(backend, offset):
    "|mean| >> std: every path normalises like float64 does (issue 23.4: the fp32 cumulative sums lost it all at 1e4)."
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0)) + offset
    w, b = torch.ones(8), torch.zeros(8)
    want = timestep_norm_ref(x.double(), 2, w.double(), b.double())[0]
    y = timestep_norm(x, 2, w, b, backend=backend)[0]
    assert y.abs().max() < 5  # was ~1062 at offset 1e4
    torch.testing.assert_close(y.double(), want, atol=2e-3 * (1 + offset / 1e3), rtol=0)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4)])
def test_empty_inputs_give_empty_results_on_every_backend(backend, shape):
    "B = 0 or T = 0: an empty y and the state passed through, the same on both backends (issue 23.7)."
    y, count, mean, var = timestep_norm(torch.randn(*shape), 2, torch.ones(4), torch.zeros(4), backend=backend)
    assert y.shape == shape and count.shape == (shape[0],) and mean.shape == var.shape == (shape[0], 2)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_no_features_and_missing_weight_are_clear_errors(backend):
    "D = 0 and weight/bias None raise errors that name the problem, on every backend (issue 23.7)."
    with pytest.raises(ValueError, match="at least one feature"):
        timestep_norm(torch.randn(1, 3, 0), 1, torch.ones(0), torch.zeros(0), backend=backend)
    for name in ("weight", "bias"):
        args = {**dict(weight=torch.ones(4), bias=torch.zeros(4)), name: None}
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
            timestep_norm(torch.randn(1, 3, 4), 2, backend=backend, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for a 3 x 2**30-element input")
def test_input_past_int32_offsets():
    "x of shape (3, 2**20, 1024): offsets into the third sequence pass 2**31 (23.11: illegal memory access)."
    x = torch.randn(3, 2**20, 1024, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(1024, device="cuda"), torch.zeros(1024, device="cuda")
    y = timestep_norm(x, 16, w, b)[0]
    want = timestep_norm_ref(x[2:, :4096], 16, w, b)[0]   # the third sequence's start, on its own
    torch.testing.assert_close(y[2:, :4096].float(), want.float(), atol=3e-2, rtol=3e-2)


def test_short_sequences_one_launch():
    "On a GPU a sequence of up to TUNING['one_launch_steps'] steps is one segment (one launch, no first pass)."
    from tinylab.kernels.timestep_norm import TUNING, _segments
    cuda = torch.device("cuda")                     # only the device's type is read below this length
    n = TUNING["one_launch_steps"]
    assert _segments(4, n, 32, 32, cuda) == (1, n)
    assert _segments(4, 1000, 32, 32, cuda) == (1, 1024)
