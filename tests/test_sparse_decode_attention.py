"""The TriForce chapter's kernel (nbs/21a_sparse_decode_attention.ipynb, used by nbs/21_triforce.ipynb): decode
attention over selected KV chunks read in place, Triton (the interpreter on a CPU) against the PyTorch reference,
and its input checks."""
import pytest
import torch

from tinylab.kernels.sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}   # max error relative to max |reference|


def assert_close(name, ref, out, ratio):
    err = (out.float() - ref.float()).abs().max().item()
    rrms = ((out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()
    scale = ref.float().abs().max().clamp_min(1e-6).item()
    print(f"{name}: max abs {err:.2e}, relative rms {rrms:.2e}")
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (an element was not written)"
    assert err <= ratio * scale, f"{name}: max abs error {err:.2e} > {ratio} * {scale:.2e}"


def make(B, H, Hkv, NQ, N, D, M, dtype, chunk=8, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, NQ, D, generator=g).to(DEVICE, dtype)
    buf = torch.randn(2, B, Hkv, N + 11, D, generator=g).to(DEVICE, dtype)
    k, v = buf[0, :, :, :N], buf[1, :, :, :N]          # views into a larger cache buffer, as in the chapter
    nc = -(-N // chunk)
    idx = torch.stack([torch.randperm(nc, generator=g)[:M] for _ in range(B * Hkv)]).view(B, Hkv, -1)
    if pad:
        idx[..., -pad:] = -1
    return q, k, v, idx.to(DEVICE)


CASES = [
    pytest.param(1, 1, 1, 1, 8, 16, 1, 0, id="one-chunk"),
    pytest.param(1, 4, 4, 1, 37, 16, 3, 0, id="partial-last-chunk"),
    pytest.param(2, 6, 2, 3, 101, 60, 7, 1, id="gqa3-nq3-d60-padding"),
    pytest.param(1, 3, 1, 5, 63, 24, 8, 0, id="mqa-all-chunks"),
    pytest.param(1, 2, 2, 7, 200, 32, 10, 2, id="nq7"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Hkv,NQ,N,D,M,pad", CASES)
def test_kernel_matches_reference(poison_empty, B, H, Hkv, NQ, N, D, M, pad, dtype):
    q, k, v, idx = make(B, H, Hkv, NQ, N, D, M, dtype, pad=pad)
    ref = sparse_decode_attention_ref(q, k, v, idx)
    tri = sparse_decode_attention(q, k, v, idx, num_splits=2, use_triton=True)
    assert tri.dtype == dtype and tri.shape == q.shape
    assert_close("out", ref, tri, TOL[dtype])


# the split paths (issue #15): splits merged in the same launch by the last split to finish (rows per kv head
# <= TUNING["merge_rows"]) or by the separate merge kernel; chunk counts that do not divide into the splits
SPLIT_CASES = [
    pytest.param(1, 4, 4, 1, 203, 32, 26, 0, 3, id="mha-1q-26-chunks-3-splits"),
    pytest.param(2, 8, 2, 1, 150, 24, 19, 2, 4, id="gqa4-1q-d24-padding-4-splits"),
    pytest.param(1, 8, 2, 2, 99, 16, 13, 0, 5, id="gqa4-nq2-8-rows-5-splits"),
    pytest.param(1, 12, 1, 3, 77, 16, 10, 1, 3, id="mqa12-nq3-36-rows-merge-kernel"),
    pytest.param(1, 2, 1, 1, 1, 16, 1, 0, 3, id="one-token-cache"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Hkv,NQ,N,D,M,pad,splits", SPLIT_CASES)
def test_split_paths(poison_empty, B, H, Hkv, NQ, N, D, M, pad, splits, dtype):
    q, k, v, idx = make(B, H, Hkv, NQ, N, D, M, dtype, pad=pad, seed=1)
    ref = sparse_decode_attention_ref(q, k, v, idx)
    for ids in (idx, idx.to(torch.int32)):      # int64 ids are converted, int32 ones read as they are
        assert_close("out", ref, sparse_decode_attention(q, k, v, ids, num_splits=splits, use_triton=True), TOL[dtype])


@pytest.mark.parametrize("merge_rows", [1, 8], ids=["as-in-a-graph", "default"])
def test_in_launch_merge_leaves_its_counters_at_zero(poison_empty, monkeypatch, merge_rows):
    "The last split of each kv head merges and resets its counter, so calls of other sizes reuse the buffer safely."
    from tinylab.kernels import sparse_decode_attention as mod
    monkeypatch.setitem(mod.TUNING, "merge_rows", merge_rows)
    for B, Hkv, splits in ((1, 2, 3), (2, 4, 2), (1, 1, 4), (1, 2, 3)):
        for H in (Hkv, 2 * Hkv):                   # one query row per kv head, and two (GQA)
            q, k, v, idx = make(B, H, Hkv, 1, 70, 16, 8, torch.float32, seed=B + splits)
            assert_close("out", sparse_decode_attention_ref(q, k, v, idx),
                         sparse_decode_attention(q, k, v, idx, num_splits=splits, use_triton=True), 1e-4)
    assert mod._SCRATCH and all(int(counters.abs().sum()) == 0 for counters, _ in mod._SCRATCH.values())


def test_reused_partials_are_written_before_they_are_read():
    "The splits' scratch is reused across calls and never cleared: fill it with NaN, and no NaN may reach the output."
    from tinylab.kernels import sparse_decode_attention as mod
    for B, Hkv, splits in ((1, 2, 3), (2, 1, 4)):
        q, k, v, idx = make(B, 2 * Hkv, Hkv, 2, 70, 16, 8, torch.float32, seed=splits)
        sparse_decode_attention(q, k, v, idx, num_splits=splits, use_triton=True)   # the scratch exists now
        for _, floats in mod._SCRATCH.values():
            floats.fill_(float("nan"))
        assert_close("out", sparse_decode_attention_ref(q, k, v, idx),
                     sparse_decode_attention(q, k, v, idx, num_splits=splits, use_triton=True), 1e-4)


@pytest.mark.parametrize("chunk", [4, 16])
def test_other_chunk_sizes_and_one_split(poison_empty, chunk):
    q, k, v, idx = make(1, 4, 2, 2, 90, 16, 5, torch.float32, chunk=chunk)
    ref = sparse_decode_attention_ref(q, k, v, idx, chunk)
    assert_close("out", ref, sparse_decode_attention(q, k, v, idx, chunk, num_splits=1, use_triton=True), 1e-4)


def test_rows_that_see_nothing_are_zero(poison_empty):
    # only padding selected: every query sees nothing, output 0 (not NaN) in both
    q, k, v, idx = make(1, 2, 2, 1, 40, 16, 2, torch.float32)
    idx[:] = -1
    for out in (sparse_decode_attention_ref(q, k, v, idx), sparse_decode_attention(q, k, v, idx, use_triton=True)):
        assert torch.equal(out, torch.zeros_like(out))


def test_all_chunks_is_causal_attention():
    q, k, v, _ = make(1, 4, 4, 3, 50, 16, 1, torch.float32)
    idx = torch.arange(7, device=DEVICE).expand(1, 4, 7)
    mask = torch.ones(3, 50, dtype=torch.bool, device=DEVICE).tril(diagonal=47)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close("ref", sdpa, sparse_decode_attention_ref(q, k, v, idx), 1e-5)
    assert_close("triton", sdpa, sparse_decode_attention(q, k, v, idx, use_triton=True), 1e-4)


def test_dispatch_uses_reference_on_cpu_tensors():
    q, k, v, idx = make(1, 2, 2, 1, 30, 16, 2, torch.float32)
    if DEVICE == "cpu":
        assert torch.equal(sparse_decode_attention(q, k, v, idx), sparse_decode_attention_ref(q, k, v, idx))


def _inputs():
    return make(1, 4, 2, 2, 33, 16, 3, torch.float32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v, i: (q[0], k, v, i), ValueError, "q must be 4-D"),
    (lambda q, k, v, i: (q, k, v[..., :8], i), ValueError, "v must have k's shape"),
    (lambda q, k, v, i: (q.double(), k.double(), v.double(), i), TypeError, "float32, float16 or bfloat16"),
    (lambda q, k, v, i: (q, k.bfloat16(), v, i), TypeError, "share one dtype"),
    (lambda q, k, v, i: (q, k, v, i.float()), TypeError, "chunk_idx must be int32"),
    (lambda q, k, v, i: (q, k, v, i[:, :1]), ValueError, "chunk_idx must be"),
    (lambda q, k, v, i: (q[:, :3], k, v, i), ValueError, "must divide"),
    (lambda q, k, v, i: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, i), ValueError, "contiguous"),
    (lambda q, k, v, i: (torch.zeros(1, 4, 40, 16, device=q.device), k, v, i), ValueError, "NQ"),
    (lambda q, k, v, i: (q, k, v, i.tolist()), TypeError, "chunk_idx must be a torch.Tensor"),
])
def test_bad_inputs(mutate, exc, match):
    args = mutate(*_inputs())
    with pytest.raises(exc, match=match):
        sparse_decode_attention(*args)
    with pytest.raises(exc, match=match):
        sparse_decode_attention_ref(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "3-splits"])
def test_length_on_the_device_is_the_cut_cache(poison_empty, splits, dtype):
    """With `length` (for CUDA graphs: one launch at every cache length), each row reads only its first length[b]
    tokens and its queries are the last of them: the answer on the cache cut to that length, with chunk ids that run
    past it and past the buffer (-1 padding too)."""
    q, k, v, idx = make(2, 6, 2, 3, 101, 24, 13, dtype)
    idx[0, 0, -1] = -1
    idx = torch.cat([idx, torch.full_like(idx[..., :2], 20)], dim=2)     # chunk 20: past the 101-token buffer
    n = torch.tensor([77, 3], dtype=torch.int32, device=DEVICE)
    tri = sparse_decode_attention(q, k, v, idx, num_splits=splits, use_triton=True, check_distinct=False, length=n)
    ref = sparse_decode_attention_ref(q, k, v, idx, length=n)
    for b, nb in enumerate(n.tolist()):
        cut = sparse_decode_attention_ref(q[b:b + 1], k[b:b + 1, :, :nb], v[b:b + 1, :, :nb], idx[b:b + 1])
        assert_close(f"row {b}, ref", cut, ref[b:b + 1], 1e-5 if dtype == torch.float32 else 1e-2)
        assert_close(f"row {b}, kernel", cut, tri[b:b + 1], TOL[dtype])


@pytest.mark.parametrize("bad,match", [
    (lambda n: n.long(), "length must be an int32 tensor"),
    (lambda n: n[:1], "length must be an int32 tensor"),
    (lambda n: [5, 5], "length must be an int32 tensor"),
])
def test_bad_length(bad, match):
    q, k, v, idx = make(2, 4, 2, 1, 33, 16, 3, torch.float32)
    n = torch.tensor([20, 30], dtype=torch.int32, device=DEVICE)
    for fn in (sparse_decode_attention, sparse_decode_attention_ref):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, idx, length=bad(n))


def test_prompt_sized_query_is_refused():
    "2 query heads per kv head x 70 new tokens = 140 rows of one tile: refused with a clear error, not compiled."
    q, k, v, idx = make(1, 4, 2, 70, 100, 16, 13, torch.float32)
    for fn in (sparse_decode_attention, sparse_decode_attention_ref):
        with pytest.raises(ValueError, match="at most 128"):
            fn(q, k, v, idx)


def test_bad_settings():
    q, k, v, idx = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        sparse_decode_attention(q, k, v, idx, chunk_size=6)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_attention(q, k, v, idx, num_splits=0)
    with pytest.raises(TypeError, match="scale"):
        sparse_decode_attention(q, k, v, idx, scale="big")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    q, k, v, idx = _inputs()
    with pytest.raises(ValueError, match="one device"):
        sparse_decode_attention(q, k.cpu(), v, idx)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_is_not_hidden(use_triton, where):
    "A NaN query or visible key gives NaN rows on both paths (23.6: the PyTorch path turned them into zeros)."
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 1, 32, 16, generator=g), torch.randn(1, 1, 32, 16, generator=g)
    (q if where == "q" else k)[0, 0, -1 if where == "k" else 0, 3] = float("nan")
    q, k, v = (t.to(DEVICE) for t in (q, k, v))          # on a GPU machine Triton needs CUDA tensors (no interpreter)
    out = sparse_decode_attention(q, k, v, torch.tensor([[[0, 1, 2, 3]]], device=DEVICE), 8, use_triton=use_triton)
    assert out[0, 0].isnan().all() and (where == "k" or not out[0, 1].isnan().any())


@pytest.mark.parametrize("use_triton", [False, True])
def test_duplicate_chunks_are_refused(use_triton):
    "A chunk named twice would count twice (0.16-0.25 relative change, 23.10): a clear error; -1 padding is fine."
    q, k, v = (torch.randn(*shape, device=DEVICE) for shape in ((1, 2, 1, 16), (1, 1, 32, 16), (1, 1, 32, 16)))
    with pytest.raises(ValueError, match="named twice"):
        sparse_decode_attention(q, k, v, torch.tensor([[[0, 2, 2]]], device=DEVICE), 8, use_triton=use_triton)
    sparse_decode_attention(q, k, v, torch.tensor([[[0, 2, -1, -1]]], device=DEVICE), 8, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", [False, True])
def test_empty_batch(use_triton):
    "B = 0 gives an empty result on both paths (23.7: ZeroDivisionError in the Triton path)."
    out = sparse_decode_attention(torch.randn(0, 2, 1, 16), torch.randn(0, 1, 32, 16), torch.randn(0, 1, 32, 16),
                                  torch.zeros(0, 1, 3, dtype=torch.long), 8, use_triton=use_triton)
    assert out.shape == (0, 2, 1, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_shapes_that_exceed_shared_memory_are_handled_before_compiling():
    """128 query rows per kv head at head dim 256 in fp32 (23.12: 190 s of compiling, then OutOfResources) now runs
    with fewer chunks per step; chunk size 128 in bf16, which cannot fit, is refused at once."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 16, 8, 256, device="cuda", generator=g)
    k, v = (torch.randn(1, 1, 4096, 256, device="cuda", generator=g) for _ in range(2))
    idx = torch.arange(448, 512, device="cuda").view(1, 1, 64)
    out = sparse_decode_attention(q, k, v, idx, 8)
    torch.testing.assert_close(out, sparse_decode_attention_ref(q, k, v, idx, 8), atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="shared memory"):
        sparse_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.arange(0, 4, device="cuda").view(1, 1, 4), 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for a 3 x 2**30-element cache")
def test_cache_past_int32_offsets():
    "k, v of shape (3, 8, 2**20, 128): offsets into the third sequence pass 2**31 (23.11: illegal memory access)."
    B, Hkv, N, D = 3, 8, 2**20, 128
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, 8, 1, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([0, N // 8 - 1], device="cuda").expand(B, Hkv, 2).contiguous()  # first and last chunk
    out = sparse_decode_attention(q, k, v, idx, 8)
    want = sparse_decode_attention_ref(q[2:], k[2:], v[2:], idx[2:], 8)
    torch.testing.assert_close(out[2:].float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_call_captured_in_a_cuda_graph_matches_the_eager_one():
    "Inside a capture the wrapper merges several rows with the separate kernel; replayed, it gives the eager answer."
    q, k, v, idx = (t.cuda() for t in make(1, 8, 2, 1, 300, 64, 30, torch.bfloat16, seed=3))
    eager = sparse_decode_attention(q, k, v, idx)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sparse_decode_attention(q, k, v, idx, check_distinct=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_decode_attention(q, k, v, idx, check_distinct=False)
    graph.replay()
    torch.cuda.synchronize()
    assert_close("out", eager.float(), out.float(), 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_length", [False, True], ids=["whole-cache", "length"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "3-splits"])
def test_every_chunk_read_in_order(poison_empty, dtype, with_length, splits):
    "chunk_idx=None reads every chunk with no ids: the same as listing them all, and as the reference."
    q, k, v, _ = make(2, 6, 2, 3, 101, 24, 1, dtype)
    every = torch.arange(13, device=DEVICE).expand(2, 2, 13)
    length = torch.tensor([77, 40], dtype=torch.int32, device=DEVICE) if with_length else None
    listed = sparse_decode_attention_ref(q, k, v, every, length=length)
    assert_close("ref", listed, sparse_decode_attention_ref(q, k, v, None, length=length), 1e-6)
    dense = sparse_decode_attention(q, k, v, None, num_splits=splits, use_triton=True, length=length)
    assert_close("triton", listed, dense, TOL[dtype])
