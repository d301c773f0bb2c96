"""TransformerFAM (nbs/12_fam.ipynb): the block tokens' attention (FlexAttention / dense SDPA vs the block loop),
BSWA and BSWA+FAM inside a transformers Llama, streaming with bounded state, LoRA, and bad inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tinylab.fam import FAMLlama, RecallTask, bswa_mask, fam_attention, fam_attention_ref, use_bswa
from tinylab.lm import build_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 5e-2)}  # (atol, rtol)


def assert_close(name, ref, out, dtype):
    atol, rtol = TOL[dtype]
    err = (ref.float() - out.float()).abs().max().item()
    rel = ((ref.float() - out.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()
    print(f"{name}: max abs err {err:.2e}, rel rms {rel:.2e}")
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def inputs(B, H, T, D, block, n_fam, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    n_blocks = -(-T // block)
    fk = fv = None
    if n_fam:
        fk, fv = (torch.randn(B, H, n_blocks, n_fam, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, fk, fv


CASES = [
    pytest.param(1, 2, 1, 16, 8, 1, 0, id="T1"),
    pytest.param(2, 3, 37, 16, 8, 2, 3, id="T37-B8-M2-F3"),
    pytest.param(1, 2, 63, 60, 16, 1, 4, id="T63-D60-F4"),
    pytest.param(1, 1, 100, 32, 7, 0, 1, id="T100-B7-M0-F1"),
    pytest.param(2, 2, 100, 8, 1, 3, 0, id="T100-B1-bswa"),
    pytest.param(1, 2, 129, 16, 32, 3, 5, id="T129-B32-M3-F5"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("B,H,T,D,block,memory,n_fam", CASES)
def test_fam_attention_matches_block_loop(poison_empty, B, H, T, D, block, memory, n_fam, backend, dtype):
    q, k, v, fk, fv = inputs(B, H, T, D, block, n_fam, dtype)
    ref = fam_attention_ref(q, k, v, fk, fv, block_size=block, memory_blocks=memory)
    out = fam_attention(q, k, v, fk, fv, block_size=block, memory_blocks=memory, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(f"{backend} {dtype}", ref, out, dtype)


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flex", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.13)"))])
def test_fam_attention_gradients(backend):
    q, k, v, fk, fv = inputs(1, 2, 37, 16, 8, 3, torch.float32, seed=1)
    args = [t.requires_grad_() for t in (q, k, v, fk, fv)]
    dy = torch.randn_like(q)
    ref_grads = torch.autograd.grad((fam_attention_ref(*args, block_size=8, memory_blocks=1) * dy).sum(), args)
    tri_grads = torch.autograd.grad((fam_attention(*args, block_size=8, memory_blocks=1, backend=backend) * dy).sum(), args)
    for name, r, t in zip(("dq", "dk", "dv", "dfam_k", "dfam_v"), ref_grads, tri_grads):
        assert_close(f"{backend} {name}", r, t, torch.float32)


@pytest.mark.parametrize("T,block,memory", [(1, 4, 0), (37, 8, 4), (64, 16, 3), (50, 50, 0)])
def test_bswa_equals_causal_when_window_covers(T, block, memory):
    q, k, v, _, _ = inputs(2, 2, T, 16, block, 0, torch.float32)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close("ref vs causal", causal, fam_attention_ref(q, k, v, block_size=block, memory_blocks=memory), torch.float32)
    assert_close("flex vs causal", causal, fam_attention(q, k, v, block_size=block, memory_blocks=memory, backend="flex"), torch.float32)


def test_mask_counts():
    "Token i sees min(i+1, M*B + i%B + 1) tokens, plus F FAM slots of its own block."
    T, B, M, Fm = 40, 8, 2, 3
    qi, ki = torch.arange(T)[:, None], torch.arange(T + 5 * Fm)[None]
    mask = bswa_mask(B, M, T, Fm)(None, None, qi, ki)
    expect = torch.tensor([min(i + 1, M * B + i % B + 1) + Fm for i in range(T)])
    assert torch.equal(mask.sum(1), expect)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(block_size=0, memory_blocks=1), ValueError, "block_size"),
    (dict(block_size=True, memory_blocks=1), ValueError, "block_size"),
    (dict(block_size=2.0, memory_blocks=1), ValueError, "block_size"),
    (dict(block_size=8, memory_blocks=-1), ValueError, "memory_blocks"),
    (dict(block_size=8, memory_blocks=1, backend="triton"), ValueError, "backend"),
])
def test_fam_attention_bad_sizes(kwargs, exc, match):
    q, k, v, _, _ = inputs(1, 2, 16, 8, 8, 0, torch.float32)
    with pytest.raises(exc, match=match):
        fam_attention(q, k, v, **kwargs)


def test_fam_attention_bad_shapes():
    q, k, v, fk, fv = inputs(1, 2, 16, 8, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        fam_attention(q[0], k[0], v[0], block_size=8, memory_blocks=1)
    with pytest.raises(ValueError, match="same shape"):
        fam_attention(q, k[:, :, :4], v, block_size=8, memory_blocks=1)
    with pytest.raises(TypeError, match="dtype"):
        fam_attention(q, k.double(), v, block_size=8, memory_blocks=1)
    with pytest.raises(ValueError, match="fam_k"):  # N = 2 blocks of 8, but 3 FAM blocks given
        fam_attention(q, k, v, torch.randn(1, 2, 3, 2, 8), torch.randn(1, 2, 3, 2, 8), block_size=8, memory_blocks=1)
    with pytest.raises(ValueError, match="both"):
        fam_attention(q, k, v, fk, None, block_size=8, memory_blocks=1)
    with pytest.raises(TypeError, match="q must be"):
        fam_attention(q.numpy(), k, v, block_size=8, memory_blocks=1)


# ---------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def llama():
    cfg = tiny_config("llama", vocab_size=40, d_model=32, n_layers=2, n_heads=4, block_size=64)
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 40, (2, 29), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_wide_bswa_is_full_attention(llama, ids):
    m = FAMLlama(llama, block_size=8, memory_blocks=3, fam_len=2)
    full = llama(ids).logits
    assert_close("parallel", full, m(ids, mode="bswa"), torch.float32)
    assert_close("block loop", full, m.forward_blockwise(ids, mode="bswa"), torch.float32)
    assert_close("full mode", full, m(ids, mode="full"), torch.float32)


@torch.no_grad()
def test_transformers_attention_function(llama, ids):
    m = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    hf = use_bswa(copy.deepcopy(llama), 4, 1)
    assert_close("use_bswa", m(ids, mode="bswa"), hf(ids).logits, torch.float32)
    # generation through transformers' own KV cache (queries = last positions) gives the same tokens
    out = hf.generate(ids[:1, :6], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(out, m.generate(ids[:1, :6], 20, mode="bswa"))
    hf.set_attn_implementation("sdpa")
    assert_close("switched back", llama(ids).logits, hf(ids).logits, torch.float32)


@pytest.mark.parametrize("block,memory,n_fam", [(4, 1, 2), (8, 0, 3), (5, 2, 1), (29, 1, 4), (1, 2, 2)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_fam_parallel_equals_block_loop(llama, ids, block, memory, n_fam, backend):
    m = FAMLlama(llama, block_size=block, memory_blocks=memory, fam_len=n_fam, backend=backend)
    assert_close("fam", m.forward_blockwise(ids, mode="fam"), m(ids, mode="fam"), torch.float32)


@pytest.mark.parametrize("mode", ["bswa", "fam"])
@torch.no_grad()
def test_streaming_equals_whole_sequence(llama, ids, mode):
    m = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    whole = m(ids, mode=mode)
    cache = m.init_cache(2, mode)
    chunks = [ids[:, :3], ids[:, 3:4], ids[:, 4:13], ids[:, 13:]]  # pieces that straddle blocks
    assert_close("chunks", whole, torch.cat([m.step(cache, c) for c in chunks], 1), torch.float32)
    cache = m.init_cache(2, mode)
    sizes = []
    for t in range(ids.shape[1]):
        m.step(cache, ids[:, t:t + 1])
        sizes.append(cache.nbytes())
    assert max(sizes[8:]) == max(sizes)  # bounded once the window is full
    assert all(k.shape[2] <= 2 * 4 for k in cache.keys)
    gen_stream = m.generate(ids[:, :5], 25, mode=mode, streaming=True)
    gen_whole = m.generate(ids[:, :5], 25, mode=mode, streaming=False)
    assert torch.equal(gen_stream, gen_whole)


@torch.no_grad()
def test_fam_changes_output_and_depends_on_prompt(llama, ids):
    m = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    a = m(ids, mode="fam")
    assert (a - m(ids, mode="bswa")).abs().max() > 1e-3
    first = m(ids[:, :4], mode="fam")  # block 0 already reads the initial FAM
    m.fam_prompt.add_(1.0)
    assert (first - m(ids[:, :4], mode="fam")).abs().max() > 1e-4


def test_lora_trains_only_adapters_and_prompt(llama, ids):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    m = FAMLlama(lora, block_size=4, memory_blocks=1, fam_len=2)
    ref = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        assert_close("lora init", ref(ids, mode="fam"), m(ids, mode="fam"), torch.float32)
    m(ids, mode="fam")[:, -1].sum().backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert "fam_prompt" in trained and all("lora_" in n or n == "fam_prompt" for n in trained), trained


def test_model_bad_inputs(llama, ids):
    with pytest.raises(ValueError, match="block_size"):
        FAMLlama(llama, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        FAMLlama(llama, block_size=3.5)
    with pytest.raises(ValueError, match="memory_blocks"):
        FAMLlama(llama, block_size=4, memory_blocks=-2)
    with pytest.raises(ValueError, match="fam_len"):
        FAMLlama(llama, block_size=4, fam_len=0)
    with pytest.raises(TypeError, match="Llama"):
        FAMLlama(torch.nn.Linear(2, 2), block_size=4)
    m = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    with pytest.raises(ValueError, match="mode"):
        m(ids, mode="sliding")
    with pytest.raises(ValueError, match="input_ids"):
        m(ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        m(ids.float())
    with pytest.raises(ValueError, match="bounded"):
        m.init_cache(1, "full")
    with pytest.raises(ValueError, match="block_size"):
        use_bswa(copy.deepcopy(llama), 0, 1)


def test_recall_task_layout():
    task = RecallTask()
    g = torch.Generator().manual_seed(0)
    for n_pairs in (1, 3):
        ids, ans = task.batch(16, 40, distance=torch.arange(1, 17), n_pairs=n_pairs, generator=g)
        assert ids.shape == (16, 40) and (ids < task.vocab_size).all() and torch.equal(ids[:, -1], ans)
        for i, d in enumerate(range(1, 17)):
            assert ids[i, -2 - d] == ans[i] and ids[i, -3 - d] == ids[i, -2]
            assert (ids[i, :-2] == ids[i, -2]).sum() == 1  # the queried name occurs once before the question
    with pytest.raises(ValueError, match="distance"):
        task.batch(2, 40, distance=38)
    with pytest.raises(ValueError, match="n_pairs"):
        task.batch(2, 40, n_pairs=9)


def test_training_helpers_smoke(llama):
    from tinylab.fam import accuracy_by_distance, train_recall, with_lora
    task = RecallTask()
    cfg = tiny_config("llama", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=24)
    base = build_model(cfg, seed=0)
    m = FAMLlama(with_lora(base, 2), block_size=4, memory_blocks=1, fam_len=2, mode="fam")
    before = m.fam_prompt.detach().clone()
    losses = train_recall(m, task, "fam", steps=3, lr=1e-2, batch=4, seq_len=24, seed=0)
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert not torch.equal(before, m.fam_prompt)  # the prompt trains
    assert train_recall(m, task, "fam", steps=3, lr=1e-2, batch=4, seq_len=24, max_seconds=0.0) == []
    acc = accuracy_by_distance(m, task, "fam", 3, [2, 10], n=4, seq_len=24)
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)


# ---------------------------------------------------------------- the claim table's criteria

def test_state_growth_separates_bounded_from_growing():
    from tinylab.fam import state_growth
    lengths = [32, 64, 128, 256]
    assert state_growth(lengths, [8448] * 4) == 0.0                       # a bounded state passes
    assert state_growth(lengths, [512 * n for n in lengths]) == pytest.approx(512.0)  # a KV cache fails
    assert state_growth(lengths, [100, 100, 100, 101]) > 0                  # even one growing step fails
    for bad in (([32], [1]), ([32, 32], [1, 2]), ([32, 64], [1, 2, 3]), ([[32, 64]], [[1, 2]])):
        with pytest.raises(ValueError, match="lengths and nbytes"):
            state_growth(*bad)


@torch.no_grad()
def test_streaming_state_has_zero_growth(llama):
    from tinylab.fam import state_growth
    m = FAMLlama(llama, block_size=4, memory_blocks=1, fam_len=2)
    ids = torch.randint(0, 40, (1, 64), generator=torch.Generator().manual_seed(5))
    for mode in ("bswa", "fam"):
        cache, sizes = m.init_cache(1, mode), []
        for t in range(ids.shape[1]):
            m.step(cache, ids[:, t:t + 1])
            sizes.append(cache.nbytes())
        lengths = [8, 16, 32, 64]  # whole blocks, after the window (2 blocks of 4) is full
        assert state_growth(lengths, [sizes[n - 1] for n in lengths]) == 0.0
        assert state_growth(range(1, 9), sizes[:8]) > 0  # while the window fills, the state does grow


def test_accuracy_by_distance_per_item_pairs_the_questions():
    from tinylab.fam import accuracy_by_distance
    task = RecallTask()
    cfg = tiny_config("llama", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=24)
    a = FAMLlama(build_model(cfg, seed=0), block_size=4, memory_blocks=1, fam_len=2)
    b = FAMLlama(build_model(cfg, seed=1), block_size=4, memory_blocks=1, fam_len=2)
    means = accuracy_by_distance(a, task, "fam", 1, [2, 10], n=6, seq_len=24, seed=3)
    items = accuracy_by_distance(a, task, "fam", 1, [2, 10], n=6, seq_len=24, seed=3, per_item=True)
    assert [len(x) for x in items] == [6, 6] and all(v in (0.0, 1.0) for x in items for v in x)
    assert means == pytest.approx([sum(x) / 6 for x in items])
    # the same arguments give the same questions, whatever the model: the per-item scores can be paired
    gen = torch.Generator().manual_seed(3 + 1000)
    q1 = task.batch(6, 24, distance=2, n_pairs=1, generator=gen)
    gen = torch.Generator().manual_seed(3 + 1000)
    assert torch.equal(q1[0], task.batch(6, 24, distance=2, n_pairs=1, generator=gen)[0])
    assert len(accuracy_by_distance(b, task, "bswa", 1, [2, 10], n=6, seq_len=24, seed=3, per_item=True)[0]) == 6
