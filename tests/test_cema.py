"""CEMA (chapter 11_megalodon): the Triton chunked scan and its backward against the sequential
reference and the FFT form; bad inputs. On a CPU the kernel runs under TRITON_INTERPRET=1."""
import math

import pytest
import torch

from tinylab.kernels.cema import _cema_blocks, cema, cema_fft, cema_ref
from kernel_asserts import assert_close

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # on a CPU the Triton kernels run in the interpreter


def segments_of(T, tiles):
    "(S, seg_len) for segments of `tiles` tiles of BLOCK_T steps on this device (8 in the interpreter, 16 on a GPU)."
    seg_len = tiles * _cema_blocks(T, 1, 1, DEVICE == "cuda")[0]
    return -(-T // seg_len), seg_len


def make(B, T, D, N, dtype=torch.float32, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    alpha, delta = torch.rand(D, N, generator=g), torch.rand(D, N, generator=g)
    theta = torch.rand(D, 1, generator=g) * torch.arange(1, N + 1) * 2 * math.pi / N
    real = torch.float64 if dtype == torch.float64 else torch.float32
    cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
    q = torch.polar(1 - alpha * delta, theta).to(cplx)
    gamma = (torch.complex(torch.randn(D, N, generator=g), torch.randn(D, N, generator=g)) / math.sqrt(N)).to(cplx)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    hx = torch.randn(B, D, N, generator=g, dtype=cplx) if h0 else None
    return tuple(None if t is None else t.to(DEVICE) for t in (x, alpha.to(real), q, gamma, hx))


SHAPES = [pytest.param(1, 1, 1, 1, id="T1-D1-N1"), pytest.param(2, 19, 5, 3, id="T19-D5-N3"),
          pytest.param(1, 33, 7, 16, id="T33-D7-N16"), pytest.param(3, 8, 4, 4, id="T8-aligned")]


@pytest.mark.parametrize("B,T,D,N", SHAPES)
def test_fft_matches_recurrence(B, T, D, N):
    x, p, q, g, h0 = make(B, T, D, N)
    y_ref, h_ref = cema_ref(x, p, q, g, h0)
    y_fft, h_fft = cema_fft(x, p, q, g, h0)
    assert_close("y fft", y_ref, y_fft, 1e-4)
    assert_close("h_T fft", h_ref, h_fft, 1e-4)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("B,T,D,N", SHAPES)
def test_triton_forward(poison_empty, B, T, D, N, dtype):
    x, p, q, g, h0 = make(B, T, D, N, dtype)
    y_ref, h_ref = cema_ref(x, p, q, g, h0)
    y_tri, h_tri = cema(x, p, q, g, h0, backend="triton")
    assert y_tri.dtype == dtype and y_tri.shape == (B, T, D)
    assert_close("y", y_ref.float(), y_tri.float(), TOL[dtype])
    assert_close("h_T", h_ref, h_tri, TOL[torch.float32])


@pytest.mark.parametrize("use_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("B,T,D,N", [pytest.param(2, 19, 5, 3, id="T19-D5-N3"), pytest.param(1, 9, 3, 16, id="T9-N16")])
def test_triton_backward(poison_empty, B, T, D, N, use_h0):
    assert_grads_match_reference(B, T, D, N, use_h0)


def assert_grads_match_reference(B, T, D, N, use_h0):
    "Gradients of x, p, q, gamma (and h0) through the Triton autograd function == autograd through the recurrence."
    x, p, q, g, h0 = make(B, T, D, N, h0=use_h0)
    ref = [t.clone().requires_grad_() for t in (x, p, q, g) + ((h0,) if use_h0 else ())]
    tri = [t.clone().requires_grad_() for t in ref]
    y_ref, h_ref = cema_ref(*ref)
    y_tri, h_tri = cema(*tri, backend="triton")
    dy, dh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    loss = lambda y, h: (y * dy).sum() + (h * dh.conj()).real.sum()
    g_ref = torch.autograd.grad(loss(y_ref, h_ref), ref)
    g_tri = torch.autograd.grad(loss(y_tri, h_tri), tri)
    for name, a, b in zip(["x", "p", "q", "gamma", "h0"], g_ref, g_tri):
        assert_close(f"d{name}", a, b, 1e-4)


def test_gradcheck_float64():
    x, p, q, g, h0 = make(1, 9, 1, 2, torch.float64)
    ins = [t.requires_grad_() for t in (x, p, q, g, h0)]
    assert torch.autograd.gradcheck(lambda *a: cema(*a, backend="triton"), ins, fast_mode=True)


def test_carried_state_equals_one_pass():
    x, p, q, g, _ = make(2, 23, 4, 4)
    y, h = cema(x, p, q, g, backend="triton")
    y1, h1 = cema(x[:, :10].contiguous(), p, q, g, backend="triton")
    y2, h2 = cema(x[:, 10:].contiguous(), p, q, g, h1, backend="triton")
    assert_close("y two segments", y, torch.cat([y1, y2], 1), 1e-4)
    assert_close("h_T two segments", h, h2, 1e-4)



# time segments (issue #15): pass 1 keeps each full segment's end state, pass 2 starts every segment from the carry
# those give. Segments of 1 or 2 tiles at odd sizes; the ids name the interpreter's (BLOCK_T = 8): the last segment
# partial or full (on a GPU, BLOCK_T = 16: 2 or 3 segments)
SEGMENTS = [pytest.param(2, 19, 5, 3, 1, id="T19-S3-last3"), pytest.param(1, 37, 6, 4, 2, id="T37-S3-last5"),
            pytest.param(3, 24, 3, 2, 1, id="T24-S3-full"), pytest.param(1, 33, 7, 16, 1, id="T33-S5-last1")]


@pytest.mark.parametrize("use_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("B,T,D,N,tiles", SEGMENTS)
def test_segmented_forward(poison_empty, B, T, D, N, tiles, dtype, use_h0):
    "Several segments == the reference, and the saved chunk-start states == those of one segment (the backward's input)."
    from tinylab.kernels.cema import _cema_forward
    x, p, q, g, h0 = make(B, T, D, N, dtype, h0=use_h0)
    y_ref, h_ref = cema_ref(x, p, q, g, h0)
    S, seg_len = segments_of(T, tiles)
    n_tiles = -(-T // (seg_len // tiles))
    y, h, hs = _cema_forward(x, p, q, g, h0, save_states=True, segments=(S, seg_len))
    _, _, hs_one = _cema_forward(x, p, q, g, h0, save_states=True, segments=segments_of(T, n_tiles))
    assert S >= 2 and y.dtype == dtype and hs.shape == hs_one.shape == (B, n_tiles, D, N, 2)
    assert_close("y", y_ref.float(), y.float(), TOL[dtype])
    assert_close("h_T", h_ref, h, TOL[torch.float32])
    assert_close("chunk states", hs_one, hs, 1e-5)


@pytest.mark.parametrize("use_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("B,T,D,N", [pytest.param(2, 37, 5, 3, id="T37-D5-N3"), pytest.param(1, 29, 3, 16, id="T29-N16")])
def test_segmented_backward(poison_empty, B, T, D, N, use_h0):
    "Gradients through the autograd function when its forward splits time (the interpreter picks 3 or 4 segments)."
    from tinylab.kernels.cema import _cema_blocks, _cema_segments
    S, _ = _cema_segments(B, T, 1, _cema_blocks(T, D, N, False)[0], torch.device("cpu"))
    assert S >= 3
    assert_grads_match_reference(B, T, D, N, use_h0)


def test_segmented_zero_and_unit_decay():
    "q entries of 0 and of modulus 1 (q^L by repeated squaring: 0 and a pure rotation) across segment boundaries."
    from tinylab.kernels.cema import _cema_forward
    x, p, q, g, h0 = make(1, 27, 3, 2)
    q = q.clone()
    q[0, 0], q[1, 1] = 0, torch.polar(torch.tensor(1.0), torch.tensor(2.5)).to(q.device)
    want = cema_ref(x.double(), p.double(), q.to(torch.complex128), g.to(torch.complex128), h0.to(torch.complex128))
    y, h, _ = _cema_forward(x, p, q, g, h0, save_states=False, segments=segments_of(27, 1))
    assert_close("y", want[0], y, 1e-5)
    assert_close("h_T", want[1], h, 1e-5)


@pytest.mark.parametrize("fold", [False, True], ids=["state-after-scan", "state-folded"])
def test_both_ways_of_carrying_the_state(monkeypatch, poison_empty, fold):
    "TUNING['fold_state'] either way: the carried state applied after each tile's scan, or folded into its first step."
    import tinylab.kernels.cema as m
    monkeypatch.setitem(m.TUNING, "fold_state", fold)
    x, p, q, g, h0 = make(2, 21, 5, 3)
    y_ref, h_ref = cema_ref(x, p, q, g, h0)
    y, h, _ = m._cema_forward(x, p, q, g, h0, save_states=True, segments=segments_of(21, 1))
    assert_close("y", y_ref, y, 1e-4)
    assert_close("h_T", h_ref, h, 1e-4)

def test_segment_choice(monkeypatch):
    "On a GPU: segments tile the sequence (full ones a multiple of BLOCK_T), fill one wave of the SMs, and short inputs keep one."
    import tinylab.kernels.cema as m
    monkeypatch.setattr(m, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    for B, T, D_blocks in [(4, 8192, 128), (4, 65536, 128), (1, 1000, 3), (4, 16, 128), (2, 1, 1), (1, 32768, 64)]:
        S, seg_len = m._cema_segments(B, T, D_blocks, 16, cuda)
        assert seg_len % 16 == 0 and (S - 1) * seg_len < T <= S * seg_len
        assert seg_len >= 16 * min(m.TUNING["min_segment_tiles"], (T + 15) // 16)
        assert S == 1 or S * B * D_blocks <= m.TUNING["programs_per_sm"] * 132      # one wave, no second
    assert m._cema_segments(4, 16, 128, 16, cuda)[0] == 1
    assert m._cema_segments(16, 65536, 128, 16, cuda)[0] == 1           # the batch alone fills the wave: no first pass
    assert m._cema_segments(4, 65536, 128, 16, cuda)[0] >= max(2, m.TUNING["min_segments"])
    assert m._cema_segments(1, 100000, 3, 16, cuda)[0] > 1

def test_forward_blocks(monkeypatch):
    "The forward's tiles: TUNING's channels per program on a GPU (what launches and benchmarks count programs by), `_cema_blocks`'s in the interpreter."
    import tinylab.kernels.cema as m
    assert m._fwd_blocks(8192, 1024, 16, True) == (16, m.TUNING["block_d"], 16)
    assert m._fwd_blocks(8192, 1024, 16, False) == m._cema_blocks(8192, 1024, 16, False)
    monkeypatch.setitem(m.TUNING, "block_d", None)
    assert m._fwd_blocks(8192, 1024, 16, True) == m._cema_blocks(8192, 1024, 16, True)

@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be"),
    (lambda a: {**a, "x": a["x"].int()}, TypeError, "x must be float"),
    (lambda a: {**a, "p": a["p"][:, :2]}, ValueError, "must be \\(D, N\\)"),
    (lambda a: {**a, "p": a["p"][:3]}, ValueError, "p must be"),
    (lambda a: {**a, "q": a["q"].real.contiguous()}, TypeError, "q must be complex"),
    (lambda a: {**a, "gamma": a["gamma"][:, :1]}, ValueError, "gamma must be"),
    (lambda a: {**a, "h0": a["h0"][:1]}, ValueError, "h0 must be"),
    (lambda a: {**a, "p": [0.5]}, TypeError, "p must be a torch.Tensor"),
    (lambda a: {**a, "backend": "cuda-magic"}, ValueError, "backend"),
], ids=["x-2d", "x-int", "q-shape", "p-shape", "q-real", "gamma-shape", "h0-shape", "p-list", "backend"])
def test_bad_inputs(mutate, exc, match):
    x, p, q, g, h0 = make(2, 5, 4, 3)
    args = mutate(dict(x=x, p=p, q=q, gamma=g, h0=h0))
    with pytest.raises(exc, match=match):
        backend = args.pop("backend", "triton")
        cema(**args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch():
    x, p, q, g, h0 = make(1, 5, 4, 3)
    with pytest.raises(ValueError, match="device"):
        cema(x, p.cpu(), q, g)


@pytest.mark.parametrize("backend", ["ref", "fft", "triton"])
def test_a_zero_decay_entry_is_finite(backend):
    "A q entry of exactly 0 (forget at once) gives the recurrence's finite answer (issue 23.5: the FFT path gave NaN)."
    x, p, q, gamma, h0 = make(1, 7, 3, 2)
    q = q.clone()
    q[1, 0] = 0
    want = cema_ref(x.double(), p.double(), q.to(torch.complex128), gamma.to(torch.complex128), h0.to(torch.complex128))
    y, hT = cema(x, p, q, gamma, h0, backend=backend)
    assert torch.isfinite(y).all()
    assert_close("y", want[0], y, 1e-5)


@pytest.mark.parametrize("backend", ["ref", "fft", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_does_not_reach_the_past(backend, bad):
    "A NaN or inf in x at time t leaves every earlier output finite on every backend, as the recurrence does (23.5)."
    x, p, q, gamma, _ = make(1, 9, 3, 2)
    x = x.clone()
    x[0, 5, 1] = bad
    y, _ = cema(x, p, q, gamma, backend=backend)
    assert torch.isfinite(y[:, :5]).all()


@pytest.mark.parametrize("backend", ["ref", "fft", "triton"])
@pytest.mark.parametrize("B,T,D", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_empty_inputs_give_the_same_empty_answer(backend, B, T, D):
    "B, T or D = 0: an empty y and h_T = h0 (or zeros) on every backend (issue 23.7: MKL, ZeroDivision, Triton errors)."
    x, p, q, gamma, h0 = make(max(B, 1), max(T, 1), max(D, 1), 2)
    x, p, q, gamma, h0 = x[:B, :T, :D], p[:D], q[:D], gamma[:D], h0[:B, :D]
    y, hT = cema(x, p, q, gamma, h0, backend=backend)
    assert y.shape == (B, T, D) and hT.shape == (B, D, 2)
    assert torch.equal(hT, h0.to(hT.dtype)) if T == 0 else hT.numel() == 0


def test_no_ema_dimensions_is_a_clear_error():
    x, p, q, gamma, _ = make(1, 4, 3, 2)
    with pytest.raises(ValueError, match="N = 0"):
        cema(x, p[:, :0], q[:, :0], gamma[:, :0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for a 3 x 2**30-element input")
def test_input_past_int32_offsets():
    "x of shape (3, 2**20, 1024): offsets into the third sequence pass 2**31 (23.11: illegal memory access)."
    x, p, q, gamma, _ = make(1, 1, 1024, 16)
    x = torch.randn(3, 2**20, 1024, device="cuda", dtype=torch.bfloat16)
    p, q, gamma = p.cuda(), q.cuda(), gamma.cuda()
    y, _ = cema(x, p, q, gamma, backend="triton", need_state=False)
    want, _ = cema_ref(x[2:, :512].float(), p, q, gamma)   # the third sequence's start, on its own
    torch.testing.assert_close(y[2:, :512].float(), want, atol=3e-2, rtol=3e-2)


def smoke_record(script: str, tmp_path) -> dict:
    "Run benchmarks/<script> --smoke with its Triton kernels in the interpreter; the JSON record it writes."
    import json
    from script_runs import INTERPRET_ENV, ROOT, run_script
    out = tmp_path / "record.json"
    run_script(ROOT / "benchmarks" / script, "--smoke", "--out", out, env=INTERPRET_ENV, timeout=600)
    return json.loads(out.read_text())


def test_megalodon_kernel_benchmark_smoke(tmp_path):
    "benchmarks/bench_megalodon.py --smoke: every gate (CEMA and timestep norm, fp32, bf16, backward) and one timed row, on the CPU."
    rec = smoke_record("bench_megalodon.py", tmp_path)
    assert rec["gates_pass"] and all(rec["gates_pass"].values()), rec["gates"]
    row = rec["rows"][0]
    assert {"cema_triton_ms", "cema_triton_bf16_ms", "tsn_triton_ms", "floor_ms"} <= set(row)
    assert rec["tuning"]["timestep_norm"] and "commit" in rec


def test_segments_benchmark_smoke(tmp_path):
    "benchmarks/bench_cema_segments.py --smoke (the source of book/results/cema_segments_h200.json): gates, a row, the sweep."
    rec = smoke_record("bench_cema_segments.py", tmp_path)
    assert rec["gates_pass"] and rec["gates"], rec["gates"]
    assert {"new_fp32_call_ms", "new_bf16_call_ms", "segments"} <= set(rec["rows"][0])
    assert rec["sweep"] and all("relerr_vs_fp64" in e for e in rec["sweep"])
    assert rec["tuning_default"] and "commit" in rec


def test_bad_segments():
    "A forced (S, seg_len) that does not tile T in whole tiles is refused (on a GPU it left outputs unwritten)."
    from tinylab.kernels.cema import _cema_forward
    x, p, q, g, h0 = make(1, 19, 3, 2)
    bt = _cema_blocks(19, 3, 2, DEVICE == "cuda")[0]
    for segments in [(2, 3), (1, bt), (9, 2 * bt), (2, 0)]:   # off the tiles, too short, empty segments, zero length
        with pytest.raises(ValueError, match="segments"):
            _cema_forward(x, p, q, g, h0, save_states=False, segments=segments)
