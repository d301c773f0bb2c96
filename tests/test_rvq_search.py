"""Residual vector quantisation search (tinylab.kernels.rvq_search): the fused Triton kernel vs the PyTorch reference
on odd sizes (never multiples of the tiles), fp32 and bf16, its three precisions, and bad inputs. Codes must equal the
fp32 reference's except where the reference's best two distances are a near-tie (relative gap below MARGIN at the first
stage where a row differs); quantized must match where the codes do. Triton runs in its interpreter on a CPU, on the
GPU when there is one (then the shapes also reach the tensor cores' TF32 path)."""
import pytest
import torch

from kernel_asserts import assert_close
import tinylab.kernels.rvq_search as rvq

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MARGIN = 1e-5                                             # near-tie: relative gap of the reference's best two distances
Q_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}       # quantized: max abs error relative to max |reference|


def inputs(N, S, C, D, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, D, generator=g)
    cb = torch.randn(S, C, D, generator=g) * 0.7 ** torch.arange(S)[:, None, None]   # residuals shrink per stage
    return x.to(DEV, dtype), cb.to(DEV, dtype)


def check_against_reference(x, cb, codes, q, dtype):
    ref_codes, ref_q = rvq.rvq_search_reference(x.float(), cb.float())
    agree = rvq.rvq_code_agreement(codes, x.float(), cb.float(), margin=MARGIN)
    print(f"codes: {agree}")
    assert agree["unexplained"] == 0, agree
    same = (codes == ref_codes).all(-1)
    assert not torch.isnan(q.float()).any(), "NaN in quantized (an element was never written)"
    if same.any():
        assert_close("quantized", ref_q[same], q.float()[same], Q_TOL[dtype])


@pytest.mark.parametrize("N,S,C,D", [
    pytest.param(1, 1, 1, 1, id="N1-S1-C1-D1"),
    pytest.param(37, 3, 50, 20, id="N37-S3-C50-D20"),
    pytest.param(40, 2, 33, 70, id="N40-S2-C33-D70"),
    pytest.param(17, 4, 16, 16, id="N17-S4-C16-D16"),
    pytest.param(29, 2, 21, 130, id="N29-S2-C21-D130-chunked"),
    pytest.param(3, 5, 2, 9, id="N3-S5-C2-D9"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_triton_matches_reference(poison_empty, N, S, C, D, dtype, precision):
    x, cb = inputs(N, S, C, D, dtype, seed=N + C)
    codes, q = rvq.rvq_search(x, cb, backend="triton", precision=precision)
    assert codes.shape == (N, S) and codes.dtype == torch.int64
    assert q.shape == x.shape and q.dtype == dtype
    check_against_reference(x, cb, codes, q, dtype)


def test_tf32x3_and_leading_dims(poison_empty):
    x, cb = inputs(11, 3, 40, 24, torch.float32, seed=3, lead=(2,))
    codes, q = rvq.rvq_search(x, cb, backend="triton", precision="tf32x3")
    assert codes.shape == (2, 11, 3) and q.shape == (2, 11, 24)
    check_against_reference(x, cb, codes, q, torch.float32)


def test_float16():
    x, cb = inputs(19, 2, 30, 12, torch.float16, seed=4)
    codes, q = rvq.rvq_search(x, cb, backend="triton")
    assert q.dtype == torch.float16
    agree = rvq.rvq_code_agreement(codes, x.float(), cb.float(), margin=MARGIN)
    assert agree["unexplained"] == 0, agree


def test_reference_by_hand_and_ties():
    x = torch.tensor([[2.9, 1.2]])
    cb = torch.tensor([[[0., 0.], [3., 0.], [0., 3.]], [[0., 1.], [0., -1.], [0.1, 0.]]])
    codes, q = rvq.rvq_search_reference(x, cb)
    assert codes.tolist() == [[1, 0]]
    assert_close("quantized", torch.tensor([[3., 1.]]), q, 1e-6)
    # equal distances: the lowest index wins, in the reference and the kernel
    tie = torch.tensor([[[1., 0.], [-1., 0.], [1., 0.]]])
    for fn in (rvq.rvq_search_reference, lambda a, b: rvq.rvq_search(a, b, backend="triton")):
        assert fn(torch.zeros(1, 2, device=DEV), tie.to(DEV))[0].tolist() == [[0]]
        assert fn(torch.tensor([[1., 0.]], device=DEV), tie.to(DEV))[0].tolist() == [[0]]


def test_reference_equals_float64_bruteforce():
    "The ||r||^2-free score gives the same codes as the full squared distance, computed in float64."
    x, cb = inputs(50, 3, 40, 8, torch.float64, seed=5)
    r, want = x.clone(), []
    for s in range(3):
        c = ((r[:, None, :] - cb[s][None]) ** 2).sum(-1).argmin(1)
        want.append(c)
        r = r - cb[s][c]
    codes, q = rvq.rvq_search_reference(x, cb)
    assert torch.equal(codes, torch.stack(want, 1).to(codes.device))
    assert_close("quantized", x - r, q, 1e-12)


def test_rescoring_fixes_tf32_flips():
    "With TF32 mimicked (inputs truncated to 10 mantissa bits), rescoring the best two in fp32 removes the flips."
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=g) + 4
    cb = torch.randn(2, 64, 16, generator=g) + 4 * torch.tensor([1., 0.])[:, None, None]
    x, cb = x.to(DEV), cb.to(DEV)
    plain = rvq._rvq_search_triton(x, cb, "ieee", round_tf32=True)[0]
    rescored = rvq._rvq_search_triton(x, cb, "tf32", round_tf32=True)[0]
    assert rvq.rvq_code_agreement(plain, x, cb)["unexplained"] > 0
    assert rvq.rvq_code_agreement(rescored, x, cb)["unexplained"] == 0


def test_dispatch_and_empty():
    x, cb = inputs(7, 2, 9, 5, torch.float32)
    ref = rvq.rvq_search_reference(x, cb)
    for backend in ("torch",) + (("auto", None) if DEV == "cpu" else ()):
        out = rvq.rvq_search(x, cb, backend=backend)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    codes, q = rvq.rvq_search(x[:0], cb, backend="triton")
    assert codes.shape == (0, 2) and q.shape == (0, 5)
    codes, q = rvq.rvq_search(x.double(), cb.double())            # float64: the reference
    assert q.dtype == torch.float64


@pytest.mark.parametrize("case,exc,match", [
    pytest.param(lambda x, c: (x[0, 0], c), ValueError, r"x must have shape \(\.\.\., D\)", id="x-0d"),
    pytest.param(lambda x, c: (x, c[0]), ValueError, r"codebooks must have shape \(S, C, D\)", id="cb-ndim"),
    pytest.param(lambda x, c: (x, c[:, :, :6]), ValueError, "x's last dim must be the codebooks' D = 6", id="D-mismatch"),
    pytest.param(lambda x, c: (x, c[:0]), ValueError, "at least one stage", id="S0"),
    pytest.param(lambda x, c: (x, c[:, :0]), ValueError, "at least one code per stage", id="C0"),
    pytest.param(lambda x, c: (x[:, :0], c[:, :, :0]), ValueError, "D must be >= 1", id="D0"),
    pytest.param(lambda x, c: (x, c.double()), TypeError, "codebooks must have x's dtype", id="dtype-mismatch"),
    pytest.param(lambda x, c: (x.long(), c.long()), TypeError, "x must be float16, bfloat16, float32 or float64", id="int"),
    pytest.param(lambda x, c: (x, c.to("meta")), ValueError, "codebooks is on meta", id="devices"),
    pytest.param(lambda x, c: (x.tolist(), c), TypeError, "x must be a torch.Tensor", id="x-list"),
    pytest.param(lambda x, c: (x, None), TypeError, "codebooks must be a torch.Tensor", id="cb-none"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs(case, exc, match, backend):
    x, cb = inputs(5, 2, 4, 8, torch.float32)
    with pytest.raises(exc, match=match):
        rvq.rvq_search(*case(x, cb), backend=backend)


def test_bad_options():
    x, cb = inputs(5, 2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        rvq.rvq_search(x, cb, backend="cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        rvq.rvq_search(x, cb, precision="bf16")
    with pytest.raises(TypeError, match="the Triton kernel takes"):
        rvq.rvq_search(x.double(), cb.double(), backend="triton")
