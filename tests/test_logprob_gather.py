"""The fused log-softmax + gather (tinylab.kernels.logprob_gather): Triton kernels and the PyTorch two-pass path
against the definition, forward and gradient, from logits and from hidden states in vocabulary chunks, and bad
inputs. Triton runs in its interpreter on a CPU (~1 ms per program), so the shapes are small but odd."""
import pytest
import torch

import tinylab.kernels.logprob_gather as lg
from kernel_asserts import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype).to(DEV)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(DEV)
    up = torch.randn(shape[:-1], generator=g).to(DEV)
    return x, y, up


SHAPES = [pytest.param((1, 1), id="N1-V1"), pytest.param((3, 7), id="N3-V7"), pytest.param((2, 5, 300), id="B2-T5-V300"),
          pytest.param((33, 1000), id="N33-V1000"), pytest.param((4, 2049), id="N4-V2049")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_and_gradient_match_reference(poison_empty, shape, dtype, backend):
    x, y, up = inputs(shape, dtype, seed=shape[-1])
    xr = x.clone().requires_grad_()
    ref_lp = lg.logprob_gather_ref(xr, y)
    (ref_dx,) = torch.autograd.grad(ref_lp, xr, up)
    xt = x.clone().requires_grad_()
    tri_lp = lg.logprob_gather(xt, y, backend=backend)
    (tri_dx,) = torch.autograd.grad(tri_lp, xt, up)
    assert tri_lp.dtype == torch.float32 and tri_lp.shape == shape[:-1] and tri_dx.dtype == dtype
    assert_close("log-probs", ref_lp, tri_lp, TOL[dtype])
    assert_close("grad logits", ref_dx, tri_dx, TOL[dtype])


def test_inplace_backward_writes_into_the_logits(poison_empty):
    x, y, up = inputs((5, 301), torch.bfloat16, seed=1)
    xa = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(lg.logprob_gather(xa, y, backend="triton"), xa, up)
    xb = x.clone().requires_grad_()
    lg.logprob_gather(xb, y, backend="triton", inplace_backward=True).backward(up)
    assert xb.grad.data_ptr() == xb.data_ptr()
    assert_close("in place", ref, xb.grad, 0)


def test_int32_targets_and_non_contiguous_rows(poison_empty):
    x, y, up = inputs((6, 2 * 257), torch.float32, seed=2)
    xs = x[:, ::2]                                   # column stride 2: the wrapper makes the rows contiguous
    ref = lg.logprob_gather_ref(xs, y % 257)
    out = lg.logprob_gather(xs, (y % 257).int(), backend="triton")
    assert_close("strided", ref, out, TOL[torch.float32])


def test_float64_gradcheck_torch_backend():
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (4,))
    assert torch.autograd.gradcheck(lambda t: lg.logprob_gather(t, y, backend="torch"), (x,))


def test_extreme_logits_stay_finite():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [80.0, 80.0, -80.0]])   # far apart, all equal, ties
    y = torch.tensor([1, 0, 2])
    for backend in ("triton", "torch"):
        assert_close(backend, lg.logprob_gather_ref(x, y), lg.logprob_gather(x, y, backend=backend), 1e-6)


def test_auto_dispatch():
    x, y, _ = inputs((3, 9), torch.float32)
    assert lg._backend("auto", x) == ("triton" if x.is_cuda else "torch")
    assert lg._backend("auto", x.double()) == "torch"


@pytest.mark.parametrize("N,H,V,chunk", [pytest.param(9, 16, 300, 64, id="chunk64"), pytest.param(5, 8, 77, 1000, id="one-chunk"),
                                         pytest.param(2 * 7, 24, 1000, 333, id="chunk333")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hidden_state_form_matches_reference(N, H, V, chunk, dtype, backend):
    g = torch.Generator().manual_seed(N + V)
    h = torch.randn(N, H, generator=g).to(dtype).to(DEV)
    W = (torch.randn(V, H, generator=g) * 3 / H**0.5).to(dtype).to(DEV)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    up = torch.randn(N, generator=g).to(DEV)
    hr, Wr = h.double().requires_grad_(), W.double().requires_grad_()
    ref = lg.linear_logprob_gather_ref(hr, Wr, y)
    ref_dh, ref_dW = torch.autograd.grad(ref, (hr, Wr), up.double())
    hk, Wk = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = lg.linear_logprob_gather(hk, Wk, y, chunk=chunk, backend=backend)
    dh, dW = torch.autograd.grad(out, (hk, Wk), up)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert dh.dtype == dtype and dW.dtype == dtype
    assert_close("log-probs", ref, out, tol)
    assert_close("dh", ref_dh, dh, tol)
    assert_close("dW", ref_dW, dW, tol)


def test_hidden_state_gradcheck():
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(29, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 29, (5,))
    assert torch.autograd.gradcheck(lambda a, b: lg.linear_logprob_gather(a, b, y, chunk=8, backend="torch"), (h, W))


@pytest.mark.parametrize("call,message", [
    pytest.param(lambda x, y: lg.logprob_gather(x, y[:3]), "targets must have shape (4,)", id="targets-shape"),
    pytest.param(lambda x, y: lg.logprob_gather(x, y + 10), "token ids in [0, 10)", id="targets-too-large"),
    pytest.param(lambda x, y: lg.logprob_gather(x, y - 10), "token ids in [0, 10)", id="targets-negative"),
    pytest.param(lambda x, y: lg.logprob_gather(x, y.float()), "int64 or int32", id="targets-dtype"),
    pytest.param(lambda x, y: lg.logprob_gather(x.long(), y), "logits must be a floating tensor", id="logits-dtype"),
    pytest.param(lambda x, y: lg.logprob_gather(x.numpy(), y), "logits must be a torch.Tensor", id="logits-type"),
    pytest.param(lambda x, y: lg.logprob_gather(x, y.tolist()), "targets must be a torch.Tensor", id="targets-type"),
    pytest.param(lambda x, y: lg.logprob_gather(x[:, :0], y), "V >= 1", id="empty-vocab"),
    pytest.param(lambda x, y: lg.logprob_gather(x, y, backend="cuda"), "backend must be one of", id="backend"),
    pytest.param(lambda x, y: lg.logprob_gather(x.double(), y, backend="triton"), "float64 logits need", id="triton-float64"),
    pytest.param(lambda x, y: lg.linear_logprob_gather(x, torch.randn(7, 9), y), "one H", id="hidden-H"),
    pytest.param(lambda x, y: lg.linear_logprob_gather(x, torch.randn(7, 10).double(), y), "one dtype", id="hidden-dtype"),
    pytest.param(lambda x, y: lg.linear_logprob_gather(x, torch.randn(7, 10), y, chunk=0), "chunk must be a positive int", id="chunk"),
    pytest.param(lambda x, y: lg.linear_logprob_gather(x, torch.randn(7, 10), y + 3), "token ids in [0, 7)", id="hidden-targets"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    x, y = torch.randn(4, 10), torch.tensor([0, 3, 6, 2])
    with pytest.raises((ValueError, TypeError), match=None) as e:
        call(x, y)
    assert message in str(e.value), str(e.value)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        lg.logprob_gather(torch.randn(2, 5), torch.tensor([1, 2]), backend="triton")
