"""The selective scan (tinylab.kernels.selective_scan): Triton kernel and chunked scan vs the sequential reference,
gradients of the autograd Function, and bad inputs. Triton runs in its interpreter on a CPU (~1 ms per scanned
element), so the Triton shapes are small but never multiples of the blocks."""
import json
import types

import pytest
import torch

import tinylab.kernels.selective_scan as ss
from kernel_asserts import assert_close
from script_runs import INTERPRET_ENV, ROOT, run_script

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("batch,T,D,N", [
    pytest.param(1, 1, 1, 1, id="B1-T1-D1-N1"),
    pytest.param(2, 37, 5, 3, id="B2-T37-D5-N3"),
    pytest.param(1, 9, 17, 16, id="B1-T9-D17-N16"),
    pytest.param(3, 21, 3, 1, id="B3-T21-D3-N1"),
    pytest.param(1, 63, 9, 2, id="B1-T63-D9-N2"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=0", "h0"])
def test_triton_matches_reference(poison_empty, batch, T, D, N, dtype, with_h0):
    kw = ss.random_inputs(batch, T, D, N, dtype=dtype, device=DEV, with_h0=with_h0, with_D=not with_h0, seed=T)
    ref_y, ref_h = ss.selective_scan_ref(**kw)
    tri_y, tri_h = ss.selective_scan_triton(**kw)
    assert tri_y.dtype == dtype and tri_h.dtype == torch.float32
    assert_close("y", ref_y, tri_y, TOL[dtype])
    assert_close("h_T", ref_h, tri_h, TOL[dtype])


def test_triton_fixed_blocks_and_float64(poison_empty):
    kw = ss.random_inputs(2, 11, 6, 5, dtype=torch.float64, device=DEV, with_h0=True)
    ref_y, ref_h = ss.selective_scan_ref(**kw)
    tri_y, tri_h = ss.selective_scan_triton(**kw, block_t=4, block_d=4)
    assert_close("y", ref_y, tri_y, TOL[torch.float64])
    assert_close("h_T", ref_h, tri_h, TOL[torch.float64])


@pytest.mark.parametrize("batch,T,D,N,chunk", [
    pytest.param(2, 1, 7, 4, 64, id="T1"),
    pytest.param(3, 100, 60, 16, 64, id="T100-D60"),
    pytest.param(1, 63, 5, 1, 16, id="T63-chunk16"),
    pytest.param(2, 130, 3, 7, 37, id="T130-chunk37"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_reference(batch, T, D, N, chunk, dtype):
    kw = ss.random_inputs(batch, T, D, N, dtype=dtype, with_h0=True, seed=1)
    ref_y, ref_h = ss.selective_scan_ref(**kw)
    out_y, out_h = ss.selective_scan_chunked(**kw, chunk=chunk)
    assert_close("y", ref_y, out_y, TOL[dtype])
    assert_close("h_T", ref_h, out_h, TOL[dtype])


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_carried_state_equals_one_pass(backend):
    kw = ss.random_inputs(2, 29, 5, 3, device=DEV, seed=2)
    y, h = ss.selective_scan(**kw, backend="ref")
    cut = lambda s: {k: (v[:, s] if k in ("u", "delta", "B", "C") else v) for k, v in kw.items()}
    y1, h1 = ss.selective_scan(**cut(slice(0, 13)), backend=backend)
    y2, h2 = ss.selective_scan(**{**cut(slice(13, None)), "h0": h1}, backend=backend)
    assert_close("y", y, torch.cat([y1, y2], 1), 1e-5)
    assert_close("h_T", h, h2, 1e-5)


def _f64_args(batch, T, D, N, seed=0):
    kw = ss.random_inputs(batch, T, D, N, dtype=torch.float64, device=DEV, with_h0=True, seed=seed)
    return [v.requires_grad_() for v in kw.values()]


def test_gradcheck_chunked_backward():
    assert torch.autograd.gradcheck(lambda *a: ss.selective_scan(*a, backend="chunked", chunk=3), _f64_args(2, 7, 3, 2))


def test_gradcheck_triton_forward():
    assert torch.autograd.gradcheck(lambda *a: ss.selective_scan(*a, backend="triton", chunk=2), _f64_args(1, 3, 2, 2, seed=3))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_gradients_match_reference_autograd(backend):
    args = _f64_args(2, 10, 4, 3, seed=4)
    grads = {}
    for b in ("ref", backend):
        y, h = ss.selective_scan(*args, backend=b, chunk=4)
        grads[b] = torch.autograd.grad((y * torch.sin(y)).sum() + (h ** 3).sum(), args)
    for name, r, t in zip("u delta A B C D h0".split(), grads["ref"], grads[backend]):
        assert_close(f"grad {name}", r, t, 1e-10)


def test_gradients_without_optional_inputs():
    kw = ss.random_inputs(1, 6, 2, 2, dtype=torch.float64, with_D=False, seed=5)
    args = [kw[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    assert torch.autograd.gradcheck(lambda *a: ss.selective_scan(*a, backend="chunked", chunk=4)[0], args)


def test_float32_gradients_close_to_reference():
    kw = ss.random_inputs(2, 40, 6, 4, seed=6)
    args = [kw[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D")]
    grads = {}
    for b in ("ref", "chunked"):
        grads[b] = torch.autograd.grad(ss.selective_scan(*args, backend=b)[0].pow(2).sum(), args)
    for name, r, t in zip("u delta A B C D".split(), grads["ref"], grads["chunked"]):
        assert_close(f"grad {name}", r, t, 1e-4)


def test_auto_dispatch_on_cpu_is_reference(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU auto means Triton")
    kw = ss.random_inputs(1, 5, 2, 2)
    calls = []
    ref = ss.selective_scan_ref
    monkeypatch.setattr(ss, "selective_scan_ref", lambda *a, **k: calls.append(1) or ref(*a, **k))
    ss.selective_scan(**kw)
    assert calls


def _bad(kw, **changes):
    return {**kw, **changes}


KW = ss.random_inputs(2, 9, 5, 3, with_h0=True, device=DEV)


@pytest.mark.parametrize("fn", [ss.selective_scan_ref, ss.selective_scan_chunked, ss.selective_scan_triton, ss.selective_scan],
                         ids=["ref", "chunked", "triton", "api"])
@pytest.mark.parametrize("changes,exc,match", [
    pytest.param(dict(u=KW["u"][0]), ValueError, "u must have shape", id="u-2d"),
    pytest.param(dict(delta=KW["delta"][:, :8]), ValueError, "delta must have shape", id="delta-shape"),
    pytest.param(dict(A=KW["A"][:4]), ValueError, "A must have shape", id="A-shape"),
    pytest.param(dict(B=KW["B"][..., :2]), ValueError, "B must have shape", id="B-shape"),
    pytest.param(dict(C=KW["C"][:1]), ValueError, "C must have shape", id="C-shape"),
    pytest.param(dict(D=KW["D"][:2]), ValueError, "D must have shape", id="D-shape"),
    pytest.param(dict(h0=KW["h0"][:, :, :2]), ValueError, "h0 must have shape", id="h0-shape"),
    pytest.param(dict(B=KW["B"].double()), TypeError, "B must have u's dtype", id="B-dtype"),
    pytest.param(dict(A=KW["A"].bfloat16()), TypeError, "A must be torch.float32", id="A-dtype"),
    pytest.param(dict(h0=KW["h0"].double()), TypeError, "h0 must be torch.float32", id="h0-dtype"),
    pytest.param(dict(u=KW["u"].long(), delta=KW["delta"].long(), B=KW["B"].long(), C=KW["C"].long()), TypeError, "u must be float", id="u-int"),
    pytest.param(dict(C=KW["C"].cpu().numpy()), TypeError, "C must be a torch.Tensor", id="C-numpy"),
    pytest.param(dict(A=torch.zeros(5, 65, device=DEV)), ValueError, "state size N", id="N-too-large"),
    pytest.param(dict(delta=KW["delta"].to("meta")), ValueError, "delta is on meta", id="device"),
])
def test_bad_inputs(fn, changes, exc, match):
    with pytest.raises(exc, match=match):
        fn(**_bad(KW, **changes))


def test_triton_refuses_non_contiguous():
    C = KW["C"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="C must be contiguous"):
        ss.selective_scan_triton(**_bad(KW, C=C))
    # the public API makes projections contiguous itself
    y, _ = ss.selective_scan(**_bad(KW, C=C), backend="triton")
    assert_close("y", ss.selective_scan_ref(**KW)[0], y, 1e-4)


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    "CPU tensors without the interpreter: a clear error from the kernel's wrapper and from the autograd path alike."
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in KW.items()}
    for call in (lambda: ss.selective_scan_triton(**cpu), lambda: ss.selective_scan(**cpu, backend="triton")):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            call()


@pytest.mark.parametrize("kwargs,match", [(dict(backend="cuda"), "backend"), (dict(chunk=0), "chunk"),
                                          (dict(chunk=True), "chunk")])
def test_api_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ss.selective_scan(**KW, **kwargs)


def test_block_sizes_both_or_neither():
    with pytest.raises(ValueError, match="block_t and block_d"):
        ss.selective_scan_triton(**KW, block_t=8)


@pytest.mark.parametrize("name", ["A", "D", "h0", "C"])
def test_public_api_takes_strided_views_of_every_argument(name):
    "Every backend of `selective_scan` accepts non-contiguous A, D and h0 as it does u, delta, B, C (issue 23.8)."
    strided = dict(A=KW["A"].t().contiguous().t(), D=torch.stack([KW["D"], KW["D"]], 1)[:, 0],
                   h0=KW["h0"].transpose(1, 2).contiguous().transpose(1, 2),
                   C=KW["C"].transpose(0, 1).contiguous().transpose(0, 1))[name]
    assert not strided.is_contiguous()
    want = ss.selective_scan_ref(**KW)[0]
    for backend in ("ref", "chunked", "triton"):
        assert_close(f"{backend} y", want, ss.selective_scan(**_bad(KW, **{name: strided}), backend=backend)[0], 1e-4)


@pytest.mark.parametrize("block", [0, 3, -4, 2048, True])
def test_block_sizes_are_checked(block):
    "Block sizes Triton cannot tile with are refused before compiling, naming the argument (issue 23.9)."
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        ss.selective_scan_triton(**KW, block_t=block, block_d=8)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        ss.selective_scan_triton(**KW, block_t=8, block_d=block)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for a 3 x 2**30-element sequence")
def test_one_sequence_past_int32_offsets():
    "One sequence of 3 * 2**20 steps x 1024 channels: offsets inside it pass 2**31 (issue 23.11)."
    T, D, N = 3 * 2**20, 1024, 1
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = torch.full_like(u, 0.5)
    A = -torch.ones(D, N, device="cuda")
    B = torch.ones(1, T, N, device="cuda", dtype=torch.bfloat16)
    y, _ = ss.selective_scan(u, delta, A, B, B, backend="triton")
    # the end of the sequence against the reference run on its last 256 steps alone: the state decays by
    # exp(-0.5) a step, so what came before them is below 1e-40 by the last 64
    want, _ = ss.selective_scan_ref(u[:, T - 256:], delta[:, T - 256:], A, B[:, T - 256:], B[:, T - 256:])
    torch.testing.assert_close(y[:, T - 64:].float(), want[:, -64:].float(), atol=2e-2, rtol=2e-2)


# ---- the Triton backward (issue 15): odd sizes, fp32 and bf16, every input's gradient, against autograd through the
# sequential definition. BWD_BLOCK_T is 8 in the interpreter, so T = 1, 8, 21 are one partial, one full and three tiles.
BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("batch,T,D,N,with_D,with_h0,with_ghT", [
    pytest.param(1, 1, 1, 1, True, False, False, id="B1-T1-D1-N1"),
    pytest.param(2, 21, 9, 5, True, True, True, id="B2-T21-D9-N5-h0-ghT"),
    pytest.param(1, 8, 17, 3, False, False, True, id="B1-T8-D17-N3-noD"),
    pytest.param(3, 13, 6, 16, True, True, False, id="B3-T13-D6-N16-h0"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_matches_reference_autograd(poison_empty, batch, T, D, N, with_D, with_h0, with_ghT, dtype):
    kw = ss.random_inputs(batch, T, D, N, dtype=dtype, device=DEV, with_D=with_D, with_h0=with_h0, seed=T + N)
    kw = {k: v for k, v in kw.items() if v is not None}
    g = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    g_h = torch.randn(batch, D, N, generator=torch.Generator().manual_seed(2)).to(DEV) if with_ghT else None
    grads = {}
    for backend in ("ref", "triton"):
        leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
        y, h = ss.selective_scan(**leaves, backend=backend)
        loss = (y.float() * g.float()).sum() + ((h * g_h).sum() if with_ghT else 0.0)
        grads[backend] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for name in kw:
        ref_g, tri_g = grads["ref"][name], grads["triton"][name]
        assert tri_g.dtype == ref_g.dtype and tri_g.shape == ref_g.shape, name
        if not ref_g.any():   # exactly 0 (dA with one step and no h0: no earlier state); a GPU's rounding leaves ~1e-9
            assert tri_g.abs().max() < 1e-6, (name, tri_g.abs().max().item())
        else:
            assert_close(f"grad {name}", ref_g, tri_g, BWD_TOL[dtype])


def test_scatter_only_where_its_lanes_hold(monkeypatch):
    "dB, dC are reduce-scattered (float32 PTX) on a GPU, one warp, 8 channels and 4 or more states a tile; else tl.sum."
    gpu, cpu = (types.SimpleNamespace(is_cuda=on, dtype=torch.float32) for on in (True, False))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ss._scatter(gpu, 8, 1, 16) and ss._scatter(gpu, 8, 1, 3)          # 3 states: a tile of 4
    assert ss._scatter(types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), 8, 1, 16)   # float32 sums
    assert not ss._scatter(types.SimpleNamespace(is_cuda=True, dtype=torch.float64), 8, 1, 16)
    assert not any(ss._scatter(gpu, bd, w, n) for bd, w, n in ((8, 1, 2), (16, 1, 16), (4, 1, 16), (8, 2, 16)))
    assert not ss._scatter(cpu, 8, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")                             # the interpreter cannot run PTX
    assert not ss._scatter(gpu, 8, 1, 16)


def test_triton_backward_direct_call_and_kept_states(poison_empty):
    "The forward keeps the state entering every backward tile (the chunked scan's chunk starts) and h_T after them."
    kw = ss.random_inputs(2, 19, 7, 4, device=DEV, with_h0=True, seed=7)
    y, hT, states = ss._scan_fwd(*kw.values(), save=True)
    _, _, starts = ss.selective_scan_chunked(**kw, chunk=ss.BWD_BLOCK_T, return_starts=True)
    n_tiles = -(-19 // ss.BWD_BLOCK_T)
    assert states.shape == (2, n_tiles + 1, 7, 4)
    assert_close("kept states", starts, states[:, :n_tiles], 1e-5)
    assert_close("h_T", ss.selective_scan_ref(**kw)[1], states[:, n_tiles], 1e-5)
    g = torch.randn_like(kw["u"])
    ref = ss.selective_scan_bwd(*kw.values(), g, None)
    tri = ss.selective_scan_triton_bwd(*kw.values(), g, None, states)
    for name, r, t in zip("du ddelta dA dB dC dD dh0".split(), ref, tri):
        assert_close(name, r, t, 1e-4)


@pytest.mark.parametrize("changes,match", [
    pytest.param(dict(gy=torch.zeros(2, 9, 4)), "gy must be a contiguous tensor of u's shape", id="gy-shape"),
    pytest.param(dict(ghT=torch.zeros(2, 5, 2)), "ghT must be a contiguous tensor of shape", id="ghT-shape"),
    pytest.param(dict(states=torch.zeros(2, 1, 5, 3)), "states must have shape", id="states-shape"),
])
def test_triton_backward_bad_inputs(changes, match):
    _, _, states = ss._scan_fwd(*KW.values(), save=True)
    args = dict(**KW, gy=torch.zeros_like(KW["u"]), ghT=None, states=states)
    with pytest.raises(ValueError, match=match):
        ss.selective_scan_triton_bwd(**{**args, **changes})


def test_forward_keeps_states_only_when_a_gradient_is_needed(monkeypatch):
    kw = ss.random_inputs(1, 10, 3, 2, device=DEV)
    saves = []
    fwd = ss._scan_fwd
    monkeypatch.setattr(ss, "_scan_fwd", lambda *a, save, **k: saves.append(save) or fwd(*a, save=save, **k))
    with torch.no_grad():
        ss.selective_scan(**kw, backend="triton")
    ss.selective_scan(**{**kw, "u": kw["u"].requires_grad_()}, backend="triton")
    assert saves == [False, True]


def test_benchmark_smoke(tmp_path):
    "benchmarks/bench_ssm.py --smoke: every implementation gated, then timed, forward, backward and a training step."
    out = tmp_path / "ssm.json"
    run_script(ROOT / "benchmarks/bench_ssm.py", "--smoke", "--out", out, env=INTERPRET_ENV, timeout=600)
    rec = json.loads(out.read_text())
    assert not rec["errors"] and all(c["ok"] for c in rec["checks"]), (rec["errors"], rec["checks"])
    got = {(r["impl"], r["dir"], r["dtype"]) for r in rec["rows"] if r["part"] == "anchor"}
    for dtype in ("float32", "bfloat16"):
        assert {("Triton", d, dtype) for d in ("fwd", "bwd", "fwd+bwd")} <= got


# ---- the split in time: segments walked by their own programs after a carry pass equal one walk. Segments are a
# multiple of the split blocks' 8 steps, so T = 21, 37 with 2..5 segments give 2 or 3 segments, the last one short;
# asking for more than the sequence allows is clamped.
SPLIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _nseg(T, segments, step):
    return ss._split(T, segments, step)[1]


@pytest.mark.parametrize("batch,T,D,N,segments,nseg,with_D,with_h0,save", [
    pytest.param(2, 37, 9, 5, 2, 2, True, True, True, id="T37-S2-h0-save"),
    pytest.param(1, 37, 5, 3, 3, 3, False, False, False, id="T37-S3-short-last"),
    pytest.param(2, 21, 3, 16, 5, 3, True, False, True, id="T21-S5-clamped-save"),
    pytest.param(1, 17, 17, 2, 3, 3, False, True, False, id="T17-S3-one-step-last"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_split_forward_equals_one_walk(poison_empty, batch, T, D, N, segments, nseg, with_D, with_h0, save, dtype):
    step = ss.FWD_BLOCKS["split"][0]
    assert step == ss.FWD_BLOCKS["save"][0] == 8 and _nseg(T, segments, step) == nseg
    kw = ss.random_inputs(batch, T, D, N, dtype=dtype, device=DEV, with_D=with_D, with_h0=with_h0, seed=T + segments)
    one = ss._scan_fwd(*kw.values(), save=save, segments=1)
    split = ss._scan_fwd(*kw.values(), save=save, segments=segments)
    for name, r, t in zip(("y", "h_T", "kept states"), one, split):
        if r is not None:
            assert t.dtype == r.dtype and t.shape == r.shape, name
            assert_close(name, r, t, SPLIT_TOL[dtype])


def test_split_forward_fixed_blocks_and_public_api(poison_empty):
    "Fixed blocks: segments are a multiple of block_t; the public forward takes `segments` too."
    kw = ss.random_inputs(2, 29, 6, 3, device=DEV, with_h0=True, seed=8)
    ref_y, ref_h = ss.selective_scan_triton(**kw, block_t=4, block_d=4, segments=1)
    for segments in (2, 4, 100):
        y, h = ss.selective_scan_triton(**kw, block_t=4, block_d=4, segments=segments)
        assert_close("y", ref_y, y, 1e-5)
        assert_close("h_T", ref_h, h, 1e-5)
    y, h = ss.selective_scan_triton(**kw, segments=3)
    assert_close("y (default blocks)", ref_y, y, 1e-5)
    assert_close("h_T (default blocks)", ref_h, h, 1e-5)


@pytest.mark.parametrize("batch,T,D,N,segments,with_D,with_h0,with_ghT", [
    pytest.param(2, 21, 9, 5, 3, True, True, True, id="T21-S3-h0-ghT"),
    pytest.param(1, 37, 5, 3, 2, False, False, True, id="T37-S2-ghT"),
    pytest.param(2, 19, 6, 16, 4, True, True, False, id="T19-S4-h0"),
    pytest.param(1, 9, 17, 2, 2, False, False, False, id="T9-S2-one-step-last"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_backward_equals_unsplit(poison_empty, batch, T, D, N, segments, with_D, with_h0, with_ghT, dtype):
    assert _nseg(T, segments, ss.BWD_BLOCK_T) > 1
    kw = ss.random_inputs(batch, T, D, N, dtype=dtype, device=DEV, with_D=with_D, with_h0=with_h0, seed=T + N)
    _, _, states = ss._scan_fwd(*kw.values(), save=True)
    gy = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    ghT = torch.randn(batch, D, N, generator=torch.Generator().manual_seed(2)).to(DEV) if with_ghT else None
    one = ss.selective_scan_triton_bwd(*kw.values(), gy, ghT, states, segments=1)
    split = ss.selective_scan_triton_bwd(*kw.values(), gy, ghT, states, segments=segments)
    for name, r, t in zip("du ddelta dA dB dC dD dh0".split(), one, split):
        assert (r is None) == (t is None), name
        if r is not None:
            assert t.dtype == r.dtype and t.shape == r.shape, name
            assert_close(name, r, t, SPLIT_TOL[dtype])


def test_split_through_autograd_matches_reference(monkeypatch):
    "With the policy on (a patched SM count), `selective_scan` splits both passes and its gradients stay right."
    monkeypatch.setattr(ss, "_sm_count", lambda device: 4)
    monkeypatch.setitem(ss.SPLIT_PROGRAMS_PER_SM, "fwd", 1)
    monkeypatch.setitem(ss.SPLIT_PROGRAMS_PER_SM, "bwd", 2)
    kw = ss.random_inputs(1, 130, 3, 2, device=DEV, with_h0=True, seed=9)
    got, segments = {}, ss._segments

    def record(pass_, *a):
        got[pass_] = segments(pass_, *a)
        return got[pass_]
    monkeypatch.setattr(ss, "_segments", record)
    grads = {}
    for backend in ("ref", "triton"):
        leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
        y, h = ss.selective_scan(**leaves, backend=backend)
        grads[backend] = torch.autograd.grad(y.pow(2).sum() + h.sum(), list(leaves.values()))
    assert got == {"fwd": 2, "bwd": 8}     # 1 and 2 programs per SM x 4 SMs / 1 program; 130 steps: 2 of 64
    for name, r, t in zip(kw, grads["ref"], grads["triton"]):
        assert_close(f"grad {name}", r, t, 1e-4)


@pytest.mark.parametrize("pass_,per_sm,bsz,n_units,T,want", [
    pytest.param("fwd", 0, 1, 1, 4096, 1, id="policy-off"),
    pytest.param("fwd", 4, 4, 96, 4096, 1, id="enough-programs"),        # 528 / 384 rounds to 1
    pytest.param("fwd", 4, 1, 48, 4096, 11, id="fwd-11"),                # 528 / 48
    pytest.param("fwd", 4, 1, 48, 300, 4, id="fwd-min-64-steps"),        # 300 // 64
    pytest.param("fwd", 4, 1, 48, 63, 1, id="fwd-short"),
    pytest.param("bwd", 4, 1, 48, 40, 5, id="bwd-min-block"),            # 40 // 8
    pytest.param("bwd", 64, 1, 1, 10**6, 64, id="bwd-max-segments"),
    pytest.param("fwd", 32, 4, 192, 2048, 1, id="left-whole"),         # 768 programs >= 4 per SM x 132
    pytest.param("fwd", 32, 2, 128, 4096, 16, id="split-below-threshold"),  # 256 < 528: 32 x 132 / 256
])
def test_segments_policy(monkeypatch, pass_, per_sm, bsz, n_units, T, want):
    monkeypatch.setattr(ss, "_sm_count", lambda device: 132)
    monkeypatch.setitem(ss.SPLIT_PROGRAMS_PER_SM, pass_, per_sm)
    assert ss._segments(pass_, bsz, 1536, n_units, T, torch.device(DEV)) == want


@pytest.mark.parametrize("bsz,dm,T,save,segments,want", [
    pytest.param(4, 1536, 2048, False, None, (32, 8, 1), id="whole"),              # 768 programs >= 4 per SM x 132
    pytest.param(2, 1024, 4096, False, None, (8, 32, 33), id="split"),             # 16 x 132 / 64 programs of 32 channels
    pytest.param(2, 1024, 1024, False, None, (8, 32, 16), id="split-min-64-steps"),  # 1024 // 64
    pytest.param(2, 1024, 4096, False, 1, (32, 8, 1), id="asked-whole"),
    pytest.param(4, 1536, 2048, False, 5, (8, 32, 5), id="asked-split"),
    pytest.param(4, 1536, 2048, True, None, (8, 32, 11), id="save"),               # 16 x 132 / 192 programs
])
def test_forward_plan(monkeypatch, bsz, dm, T, save, segments, want):
    "The forward's default launch: FWD_BLOCKS' whole blocks where the policy leaves it whole, else its split blocks."
    monkeypatch.setattr(ss, "_sm_count", lambda device: 132)
    monkeypatch.setitem(ss.SPLIT_PROGRAMS_PER_SM, "fwd", 16)
    assert ss._fwd_plan(bsz, dm, T, save, torch.device(DEV), segments) == want


def test_forward_plan_given_blocks(monkeypatch):
    "Blocks given: those, split as asked, or as the policy says for their programs."
    monkeypatch.setattr(ss, "_sm_count", lambda device: 132)
    monkeypatch.setitem(ss.SPLIT_PROGRAMS_PER_SM, "fwd", 16)
    assert ss._fwd_plan(2, 1024, 4096, False, torch.device(DEV), None, (16, 16)) == (16, 16, 16)   # round(16 x 132 / 128 programs)
    assert ss._fwd_plan(4, 1536, 2048, True, torch.device(DEV), 3, (16, 16)) == (16, 16, 3)


def test_forward_plan_in_the_interpreter():
    "With no SMs to fill (a CPU) nothing is split by policy: the whole blocks, and the save blocks in one segment."
    assert ss._fwd_plan(2, 1024, 4096, False, torch.device("cpu")) == (*ss.FWD_BLOCKS["whole"], 1)
    assert ss._fwd_plan(2, 1024, 4096, True, torch.device("cpu")) == (*ss.FWD_BLOCKS["save"], 1)


def test_segments_policy_off_is_one_split(monkeypatch):
    "A policy of 0 never splits, nor any policy on a CPU (no SMs); a bad pass name is refused."
    monkeypatch.setattr(ss, "SPLIT_PROGRAMS_PER_SM", dict(fwd=0, bwd=0))
    assert ss._segments("fwd", 1, 64, 4, 10**5, torch.device(DEV)) == 1
    assert ss._segments("bwd", 1, 64, 4, 10**5, torch.device(DEV)) == 1
    if DEV == "cpu":
        assert ss._sm_count(torch.device("cpu")) == 0      # the interpreter never splits by policy
        monkeypatch.setattr(ss, "SPLIT_PROGRAMS_PER_SM", dict(fwd=64, bwd=64))
        assert ss._segments("bwd", 1, 64, 4, 10**5, torch.device(DEV)) == 1
    with pytest.raises(ValueError, match="pass_ must be one of"):
        ss._segments("both", 1, 64, 4, 100, torch.device(DEV))


@pytest.mark.parametrize("segments", [0, -2, 1.5, True, "2"])
def test_bad_segments(segments):
    _, _, states = ss._scan_fwd(*KW.values(), save=True)
    for call in (lambda: ss.selective_scan_triton(**KW, segments=segments),
                 lambda: ss._scan_fwd(*KW.values(), save=True, segments=segments),
                 lambda: ss.selective_scan_triton_bwd(*KW.values(), torch.zeros_like(KW["u"]), None, states,
                                                      segments=segments)):
        with pytest.raises(ValueError, match="segments must be a positive int"):
            call()


def test_split_sweep_smoke(tmp_path):
    "benchmarks/scan_split_sweep.py --smoke: every policy value checked against no split, then timed; a best value per pass."
    out = tmp_path / "sweep.json"
    run_script(ROOT / "benchmarks/scan_split_sweep.py", "--smoke", "--out", out, env=INTERPRET_ENV, timeout=600)
    rec = json.loads(out.read_text())
    assert all(r["ok"] for r in rec["rows"]) and set(rec["best"]) == {"fwd", "bwd"}
    assert any(r["segments"] > 1 for r in rec["rows"] if r["pass_"] == "bwd")   # the sweep did split
