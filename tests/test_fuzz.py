"""Property-based fuzzing of every public kernel wrapper and of `inherit` and TriForce (Hypothesis).

Each property draws shapes (0, 1 and odd sizes included), dtypes, backends, strided views and extreme values,
and holds every backend to a float64 reference and to the other backends: the same answer, or the same clear
error. The "ci" profile (tests/conftest.py) is derandomised and bounded for CI; HYPOTHESIS_PROFILE=long runs a
longer search by hand."""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tinylab.kernels.cema import cema, cema_ref
from tinylab.kernels.selective_scan import selective_scan, selective_scan_ref
from tinylab.kernels.sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_ref
from tinylab.kernels.timestep_norm import timestep_norm, timestep_norm_ref

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float64: 1e-9}


def outcome(fn):
    "('ok', result) or ('error', exception class): what a backend did with one input."
    try:
        return "ok", fn()
    except (ValueError, TypeError) as e:
        return "error", type(e)


def same_outcome(results: dict):
    "Every backend gave a result, or every backend refused with a clear error."
    kinds = {name: r[0] for name, r in results.items()}
    assert len(set(kinds.values())) == 1, f"backends disagree on whether the input is valid: {kinds}"
    return kinds.popitem()[1] == "ok"


def close(name, ref, out, dtype, scale=1.0):
    "Max error relative to the reference's scale, within the dtype's tolerance; NaN where the reference has NaN."
    ref, out = ref.double(), out.double()
    assert torch.equal(ref.isnan(), out.isnan()), f"{name}: NaN in different places"
    ok = ~ref.isnan()
    if ok.any():
        err = (ref[ok] - out[ok]).abs().max().item()
        bound = TOL[dtype] * max(scale, ref[ok].abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def strided(t: torch.Tensor, noncontiguous: bool) -> torch.Tensor:
    "The same values as a non-contiguous view (every other element of a larger buffer) when asked."
    if not noncontiguous or t.numel() == 0:
        return t
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


# ---------------------------------------------------------------------------------------------- selective scan
@given(batch=st.integers(0, 2), T=st.integers(1, 33), D=st.integers(1, 9), N=st.integers(1, 5), dtype=DTYPES,
       noncontiguous=st.booleans(), with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_selective_scan_backends_agree_with_float64(batch, T, D, N, dtype, noncontiguous, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    u, B, C = (torch.randn(batch, T, k, generator=g) for k in (D, N, N))
    delta = torch.nn.functional.softplus(torch.randn(batch, T, D, generator=g))
    A = -torch.rand(D, N, generator=g) * 4
    Dp = torch.randn(D, generator=g)
    h0 = torch.randn(batch, D, N, generator=g) if with_h0 else None
    args = [strided(x.to(dtype), noncontiguous) for x in (u, delta)] + [strided(A, noncontiguous)] + \
           [strided(x.to(dtype), noncontiguous) for x in (B, C)] + [strided(Dp, noncontiguous),
                                                                   None if h0 is None else strided(h0, noncontiguous)]
    results = {b: outcome(lambda b=b: selective_scan(*args, backend=b)) for b in ("ref", "chunked", "triton")}
    results["float64"] = outcome(lambda: selective_scan_ref(u.double(), delta.double(), A.double(), B.double(),
                                                            C.double(), Dp.double(), None if h0 is None else h0.double()))
    if same_outcome(results):
        ref = results.pop("float64")[1]
        for name, (_, (y, hT)) in results.items():
            close(f"{name} y", ref[0], y, dtype, scale=ref[0].abs().max().item() if ref[0].numel() else 1.0)
            close(f"{name} h_T", ref[1], hT, dtype, scale=ref[1].abs().max().item() if ref[1].numel() else 1.0)


# ---------------------------------------------------------------------------------------------- CEMA
def cema_params(D, N, g, radius_max=0.999, zero_q=False):
    p = torch.randn(D, N, generator=g) * 0.5
    radius = torch.rand(D, N, generator=g) * radius_max
    angle = torch.rand(D, N, generator=g) * 2 * math.pi
    q = torch.polar(radius, angle)
    if zero_q and q.numel():
        q.view(-1)[0] = 0
    gamma = torch.complex(torch.randn(D, N, generator=g), torch.randn(D, N, generator=g)) * 0.3
    return p, q, gamma


@given(B=st.integers(0, 2), T=st.integers(0, 24), D=st.integers(0, 5), N=st.integers(1, 4), dtype=DTYPES,
       radius_max=st.sampled_from([0.5, 0.99, 0.9999]), zero_q=st.booleans(), seed=st.integers(0, 2**16))
def test_cema_backends_agree_with_float64(B, T, D, N, dtype, radius_max, zero_q, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    p, q, gamma = cema_params(D, N, g, radius_max, zero_q)
    y_ref, h_ref = cema_ref(x.double(), p.double(), q.to(torch.complex128), gamma.to(torch.complex128))
    results = {b: outcome(lambda b=b: cema(x.to(dtype), p, q, gamma, backend=b)) for b in ("ref", "fft", "triton")}
    if same_outcome(results):
        for name, (_, (y, hT)) in results.items():
            assert y.shape == (B, T, D) and y.dtype == dtype, f"{name}: {y.shape} {y.dtype}"
            close(f"{name} y", y_ref, y, dtype, scale=3.0)
            close(f"{name} h_T", torch.view_as_real(h_ref), torch.view_as_real(hT), dtype, scale=3.0)


@given(T=st.integers(2, 20), t_bad=st.data(), bad=st.sampled_from([float("nan"), float("inf")]),
       backend=st.sampled_from(["ref", "fft", "triton"]), seed=st.integers(0, 2**16))
def test_cema_nonfinite_input_does_not_reach_the_past(T, t_bad, bad, backend, seed):
    "A NaN or inf in x at time t leaves every earlier output finite, as the recurrence does."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, 3, generator=g)
    t = t_bad.draw(st.integers(1, T - 1))
    x[0, t, 1] = bad
    p, q, gamma = cema_params(3, 2, g)
    y, _ = cema(x, p, q, gamma, backend=backend)
    assert torch.isfinite(y[:, :t]).all(), f"{backend}: non-finite outputs before t={t}"


# ---------------------------------------------------------------------------------------------- timestep norm
@given(B=st.integers(1, 2), T=st.integers(1, 20), G=st.integers(1, 3), K=st.integers(1, 4), dtype=DTYPES,
       offset=st.sampled_from([0.0, 1e2, 1e4]), spread=st.sampled_from([1e-2, 1.0]), with_state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_timestep_norm_backends_agree_with_float64(B, T, G, K, dtype, offset, spread, with_state, seed):
    "Large means against small spreads included: every path must normalise them as float64 does."
    cond = offset / spread  # how many digits the input itself spends on the mean
    assume(cond * torch.finfo(dtype).eps < 1e-2)  # beyond that the dtype cannot hold offset + spread at all
    g = torch.Generator().manual_seed(seed)
    D = G * K
    x = offset + spread * torch.randn(B, T, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    state = (torch.randint(0, 5, (B,), generator=g), offset + torch.randn(B, G, generator=g),
             spread**2 * (0.5 + torch.rand(B, G, generator=g))) if with_state else (None, None, None)
    ref = timestep_norm_ref(x.double(), G, w.double(), b.double(), state[0],
                            *(None if s is None else s.double() for s in state[1:]))
    results = {bk: outcome(lambda bk=bk: timestep_norm(x.to(dtype), G, w, b, *state, backend=bk))
               for bk in ("ref", "triton")}
    if same_outcome(results):
        for name, (_, (y, count, mean, var)) in results.items():
            # y = (x - mean) / std inherits x's rounding amplified by the condition number offset / spread
            amplified = (1 + 20 * torch.finfo(dtype).eps * cond / TOL[dtype])
            close(f"{name} y", ref[0], y, dtype, scale=amplified * (4 * w.abs().max().item() + b.abs().max().item()))
            assert torch.equal(count, ref[1])


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(1, 4, 0), (0, 4, 2), (1, 0, 2)])
def test_timestep_norm_degenerate_sizes(backend, shape):
    "Empty inputs give an empty result or a clear ValueError, the same on every backend; weight=None is refused."
    x = torch.randn(*shape)
    D = shape[2]
    G = 1 if D else 1
    results = {bk: outcome(lambda bk=bk: timestep_norm(x, G, torch.ones(D), torch.zeros(D), backend=bk))
               for bk in ("ref", "triton")}
    if same_outcome(results):
        assert results[backend][1][0].shape == x.shape
    with pytest.raises((ValueError, TypeError), match="weight"):
        timestep_norm(torch.randn(1, 3, 4), 2, None, torch.zeros(4), backend=backend)


# ---------------------------------------------------------------------------------------------- sparse decode attention
@given(B=st.integers(0, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), NQ=st.integers(1, 4), D=st.sampled_from([8, 12, 16]),
       chunk=st.sampled_from([1, 4, 8]), n_chunks=st.integers(1, 6), dtype=DTYPES, extreme=st.sampled_from(["none", "nan_q", "nan_k", "big"]),
       seed=st.integers(0, 2**16))
def test_sparse_decode_attention_paths_agree(B, Hkv, G, NQ, D, chunk, n_chunks, dtype, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    N = max(NQ, n_chunks * chunk - int(torch.randint(0, chunk, (1,), generator=g)))
    q = torch.randn(B, Hkv * G, NQ, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    if extreme == "nan_q" and B:
        q[0, 0, 0, 0] = float("nan")
    if extreme == "nan_k" and B:
        k[0, 0, N - 1, 0] = float("nan")
    if extreme == "big":
        q = q * 30
    total = math.ceil(N / chunk)
    M = min(total, 1 + int(torch.randint(0, total, (1,), generator=g)))
    idx = torch.stack([torch.stack([torch.randperm(total, generator=g)[:M] for _ in range(Hkv)]) for _ in range(B)]) \
        if B else torch.zeros(0, Hkv, M, dtype=torch.long)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), idx, chunk)
    results = {name: outcome(lambda t=t: sparse_decode_attention(*args, use_triton=t))
               for name, t in (("torch", False), ("triton", True))}
    # the reference in float32, the widest dtype the kernel takes, on the same (rounded) inputs
    results["float32"] = outcome(lambda: sparse_decode_attention_ref(*(x.float() for x in args[:3]), idx, chunk))
    if same_outcome(results):
        ref = results.pop("float32")[1]
        for name, (_, out) in results.items():
            close(name, ref, out, dtype)


def test_sparse_decode_attention_rejects_duplicate_chunks():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    for use_triton in (False, True):
        with pytest.raises(ValueError, match="distinct"):
            sparse_decode_attention(q, k, v, torch.tensor([[[0, 2, 2]]]), 8, use_triton=use_triton)


# ---------------------------------------------------------------------------------------------- inherit
from tiny_archs import ARCHS, V, tiny  # noqa: E402

from tinylab.inheritune import find_layer_list, inherit  # noqa: E402


@pytest.mark.parametrize("arch", sorted(ARCHS))
@given(k=st.integers(1, 2), data=st.data())
def test_inherit_keeps_everything_but_the_dropped_blocks(arch, k, data):
    """Every architecture: the kept blocks bit-exact, the depth updated, list settings that are not per-layer and the
    generation defaults unchanged (issues 23.2 and 23.3)."""
    parent = tiny(arch, eos_token_id=[2, 5])            # a list as long as the depth, but not a per-layer one
    parent.generation_config.eos_token_id = [2, 5]
    parent.generation_config.max_new_tokens = 7
    layers = data.draw(st.one_of(st.just(k), st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True)))
    if getattr(parent.config, "scale_attn_by_inverse_layer_idx", False) and not isinstance(layers, int):
        layers = sorted(layers)
    child = inherit(parent, layers)
    idx = list(range(layers)) if isinstance(layers, int) else list(layers)
    assert child.config.num_hidden_layers == len(idx)
    assert child.config.eos_token_id == [2, 5]
    assert child.generation_config.eos_token_id == [2, 5] and child.generation_config.max_new_tokens == 7
    prefix, blocks = find_layer_list(parent)
    kept = dict(child.state_dict())
    for key, value in parent.state_dict().items():
        if key.startswith(prefix + "."):
            i, rest = key[len(prefix) + 1:].split(".", 1)
            if int(i) in idx:
                assert torch.equal(kept[f"{prefix}.{idx.index(int(i))}.{rest}"], value), key
        else:
            assert torch.equal(kept[key], value), key


# ---------------------------------------------------------------------------------------------- TriForce
from tinylab.triforce import TriForceConfig, autoregressive_generate, triforce_generate  # noqa: E402


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_triforce_is_lossless_or_refuses(arch):
    """Greedy TriForce and our plain decoding give exactly what `model.generate` gives, on every architecture
    (sliding windows included), or refuse the model with a clear error (issue 23.1)."""
    target, draft = tiny(arch, seed=0), tiny("llama", seed=1)
    prompt = torch.randint(3, V, (1, 40), generator=torch.Generator().manual_seed(0))
    want = target.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0]
    cfg = TriForceConfig(gamma1=2, gamma2=3, budget=16, chunk_size=4, sinks=2, window=8)
    results = {"plain": outcome(lambda: autoregressive_generate(target, prompt, 12)[0]),
               "triforce": outcome(lambda: triforce_generate(target, draft, prompt, 12, cfg)[0])}
    if same_outcome(results):
        for name, (_, out) in results.items():
            assert torch.equal(out, want), f"{arch} {name}: {out[40:].tolist()} != {want[40:].tolist()}"
