"""TriForce (nbs/21_triforce.ipynb): exact speculative sampling, the caches and selections, and the three-level loop
on small random Llamas (greedy identical to the target's, sampled distribution equal to the target's)."""
import pytest
import torch

from tinylab.core import FAILS, HOLDS, INCONCLUSIVE
from tinylab.lm import build_model, tiny_config
from tinylab.triforce import (ChunkSelection, DecodeStats, FlatKVCache, GraphLevels, TriForceConfig, autoregressive_generate,
                              chunk_scores, distribution_outcome, lossless_outcome, retrieval_selection,
                              draw, speculative_accept, streaming_chunks, streaming_selection, to_probs, triforce_generate)
from tinylab.triforce import _check_generator, _ids

V = 48


def chi_square_pvalue(counts, probs, k=10):
    "Chi-square goodness of fit over k bins of about equal probability (fixed before looking at the counts)."
    order = probs.argsort(descending=True)
    before = probs[order].double().cumsum(0) - probs[order].double()
    bin_of = torch.empty_like(order)
    bin_of[order] = (before * k).long().clamp_max(k - 1)
    obs = torch.zeros(k, dtype=torch.double).index_add_(0, bin_of, counts.double())
    exp = torch.zeros(k, dtype=torch.double).index_add_(0, bin_of, probs.double()) * counts.sum()
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    def llama(d, layers, heads, kv, seed):
        cfg = tiny_config("llama", vocab_size=V, d_model=d, n_layers=layers, n_heads=heads, block_size=256)
        cfg.num_key_value_heads = kv                                 # grouped-query attention
        return build_model(cfg, seed=seed).eval()
    return llama(32, 2, 4, 2, 0), llama(16, 1, 2, 2, 1)      # target with GQA (4 query heads, 2 kv heads), draft


def prompt(n, seed):
    return torch.randint(1, V, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- speculative sampling
def test_to_probs():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert torch.equal(to_probs(logits, 0), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(to_probs(logits, 1.0), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="temperature"):
        to_probs(logits, -1.0)


def test_accept_greedy_cases():
    p = torch.eye(5)[[1, 2, 3, 4]]
    assert speculative_accept(torch.tensor([1, 2, 0]), torch.eye(5)[[1, 2, 0]], p) == (2, 3)
    assert speculative_accept(torch.tensor([0, 2, 3]), torch.eye(5)[[0, 2, 3]], p) == (0, 1)
    assert speculative_accept(torch.tensor([1, 2, 3]), torch.eye(5)[[1, 2, 3]], p) == (3, 4)
    assert speculative_accept(torch.tensor([], dtype=torch.long), torch.zeros(0, 5), p[:1]) == (0, 1)


def test_draw_follows_the_weights():
    "Unnormalised weights: tokens of weight 0 never come out, the others as often as their share (chi-square)."
    w = torch.tensor([0.0, 1.0, 3.0, 0.0, 4.0, 2.0])
    g = torch.Generator().manual_seed(0)
    x = draw(w.expand(8000, -1), g)
    assert x.shape == (8000,) and x.dtype == torch.long
    counts = torch.bincount(x, minlength=6).float()
    assert counts[0] == 0 and counts[3] == 0
    assert chi_square_pvalue(counts, w / w.sum(), k=4) > 1e-3
    assert int(draw(torch.eye(6)[4], g)) == 4                        # one-hot (greedy): its token, whatever E is


def test_tokens_are_drawn_on_the_models_device():
    "A generator of another device is refused by name (tokens are drawn where the models are), as are mixed devices."
    with pytest.raises(ValueError, match="generator is on cpu"):
        _check_generator(torch.Generator(), torch.device("cuda"))
    _check_generator(None, torch.device("cuda")); _check_generator(torch.Generator(), torch.device("cpu"))
    fake = lambda name: type("G", (), {"device": torch.device(name)})()      # CUDA generators' devices, without a GPU
    _check_generator(fake("cuda"), torch.device("cuda:0"))                     # no index: the current device
    with pytest.raises(ValueError, match="generator is on cuda:1"):
        _check_generator(fake("cuda:1"), torch.device("cuda:0"))
    with pytest.raises(ValueError, match="tokens are on cpu"):
        _ids(torch.tensor([1, 2]), torch.device("meta"))
    assert _ids([3, 4], torch.device("cpu")).tolist() == [3, 4]
    p = torch.eye(5)[[1, 2]]
    with pytest.raises(ValueError, match="one device"):
        speculative_accept(torch.tensor([1], device="meta"), p[:1], p)


def test_accept_bad_shapes():
    with pytest.raises(ValueError, match="expected draft"):
        speculative_accept(torch.tensor([1, 2]), torch.rand(2, 5), torch.rand(2, 5))


@pytest.mark.parametrize("seed", [0, 1])
def test_accept_is_exact_two_tokens(seed):
    """Two draft tokens from q, verified against p: the first two emitted tokens follow p exactly (chi-square)."""
    g = torch.Generator().manual_seed(seed)
    n = 5
    q = torch.softmax(torch.randn(2, n, generator=g) * 2, -1)
    p = torch.softmax(torch.randn(3, n, generator=g) * 2, -1)     # position-wise (a context-free toy)
    counts = torch.zeros(2, n)
    for _ in range(6000):
        d = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(2)])
        acc, nxt = speculative_accept(d, q, p, g)
        out = d[:acc].tolist() + [nxt]
        counts[0, out[0]] += 1
        if len(out) > 1:
            counts[1, out[1]] += 1
    assert chi_square_pvalue(counts[0], p[0]) > 1e-3
    assert chi_square_pvalue(counts[1], p[1]) > 1e-3


def test_wrong_residual_is_detected():
    """The test has power: resampling from p instead of the residual fails it."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    p = torch.tensor([0.1, 0.3, 0.3, 0.3])
    counts = torch.zeros(4)
    for _ in range(4000):
        x = int(torch.multinomial(q, 1, generator=g))
        ok = torch.rand(1, generator=g).item() < min(1.0, (p[x] / q[x]).item())
        counts[x if ok else int(torch.multinomial(p, 1, generator=g))] += 1
    assert chi_square_pvalue(counts, p) < 1e-6


# ---------------------------------------------------------------- the claim table's own criteria
def test_lossless_outcome():
    "Greedy losslessness: one differing run is a counterexample."
    assert lossless_outcome(5, 5) == HOLDS
    assert lossless_outcome(4, 5) == FAILS
    assert lossless_outcome(0, 1) == FAILS
    for bad in ((6, 5), (-1, 5), (0, 0)):
        with pytest.raises(ValueError):
            lossless_outcome(*bad)


def _wrong_sampler_pvalue(n, seed):
    "Chi-square p-value of n draws of the resample-from-p slip (as in test_wrong_residual_is_detected)."
    g = torch.Generator().manual_seed(seed)
    q, p = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.3, 0.3, 0.3])
    counts = torch.zeros(4)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        ok = torch.rand(1, generator=g).item() < min(1.0, (p[x] / q[x]).item())
        counts[x if ok else int(torch.multinomial(p, 1, generator=g))] += 1
    return chi_square_pvalue(counts, p)


def test_distribution_outcome():
    "Sampled losslessness: a rejecting test says no; a test that cannot see a wrong sampler says inconclusive."
    assert distribution_outcome([0.4, 0.7], control_pvalue=1e-8) == HOLDS
    assert distribution_outcome([0.4, 0.004], control_pvalue=1e-8) == FAILS      # 0.004 < 0.01 / 2 (Bonferroni)
    assert distribution_outcome([0.4, 0.006], control_pvalue=1e-8) == HOLDS      # one test of two: not a rejection
    assert distribution_outcome([0.4, 0.7], control_pvalue=0.3) == INCONCLUSIVE  # no power
    # the adverse case for real: a wrong sampler's own output, tested, does not hold
    wrong = _wrong_sampler_pvalue(2000, seed=1)
    assert distribution_outcome([wrong], control_pvalue=_wrong_sampler_pvalue(2000, seed=2)) == FAILS
    # and with very few samples the control is not rejected: inconclusive, not "holds"
    assert distribution_outcome([0.5], control_pvalue=_wrong_sampler_pvalue(5, seed=3)) == INCONCLUSIVE
    with pytest.raises(ValueError):
        distribution_outcome([], control_pvalue=0.5)
    with pytest.raises(ValueError):
        distribution_outcome([1.5], control_pvalue=0.5)


# ---------------------------------------------------------------- caches and selections
def test_flat_cache_update_and_crop(models):
    target, _ = models
    cache = FlatKVCache(target, 20)
    k, v = cache.update(torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8), 0)
    assert k.shape == (1, 2, 5, 8) and cache.get_seq_length(0) == 5
    assert k.data_ptr() == cache.k[0].data_ptr()                    # a view of the buffer, not a copy
    cache.crop(3)
    k, _ = cache.update(2 * torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 0)
    assert k.shape[2] == 4 and k[0, 0, 3, 0] == 2
    with pytest.raises(ValueError, match="capacity"):
        cache.update(torch.ones(1, 2, 30, 8), torch.ones(1, 2, 30, 8), 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_flat_cache_with_the_models_own_attention(models, attn):
    "Prefill in pieces through FlatKVCache with SDPA / eager attention, then a decoding step with the triforce kernel."
    from tinylab.triforce import _forward, _triforce_attention
    target, _ = models
    ids = prompt(21, 5)[0].tolist()
    saved, target.config._attn_implementation = target.config._attn_implementation, attn
    try:
        with torch.no_grad():
            whole = target(torch.tensor([ids])).logits[0]
            cache = FlatKVCache(target, 32)
            parts = [_forward(target, ids[:12], cache), _forward(target, ids[12:17], cache)]
            with _triforce_attention(target):
                parts.append(_forward(target, ids[17:], cache))
    finally:
        target.config._attn_implementation = saved
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)


def test_cache_keyword_and_a_model_that_ignores_the_cache():
    from types import SimpleNamespace
    from tinylab.core import cache_keyword
    from tinylab.triforce import _forward

    class OldStyle(torch.nn.Module):                     # transformers before the `cache` keyword
        def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], V))

    old = OldStyle()
    old.w = torch.nn.Parameter(torch.zeros(1))
    assert cache_keyword(type(old)) == "past_key_values"
    cache = SimpleNamespace(get_seq_length=lambda: 0)
    with pytest.raises(RuntimeError, match="did not write"):          # it swallows the cache: fail, never decode blind
        _forward(old, [1, 2], cache)


def test_selections():
    keys = torch.zeros(1, 1, 16, 2)
    keys[0, 0, 8:12, 1] = 1.0                                         # chunk 2 (of size 4) points along axis 1
    s = chunk_scores(torch.tensor([[[0.0, 1.0]]]), keys, 4)
    assert s.argmax().item() == 2

    class Toy:
        k = [keys]
    sel = retrieval_selection({0: torch.tensor([[[0.0, 1.0]]])}, Toy(), 16, budget=8, chunk_size=4)
    assert sel.chunks[0].tolist() == [[[0, 2]]]                         # first chunk kept + the best
    assert sel.for_layer(0, 18).tolist() == [[[0, 2, 4]]]
    st = streaming_selection(40, 2, 1, 3, sinks=8, window=10, chunk_size=8)
    assert st.boundary == 30 and st.for_layer(1, 40).tolist() == [[[0, 3, 4]] * 3]


# ---------------------------------------------------------------- the three-level loop
@pytest.mark.parametrize("cfg", [
    TriForceConfig(budget=16, window=16),
    TriForceConfig(budget=24, window=8, sinks=8, gamma1=3, gamma2=5),
    TriForceConfig(budget=16, window=16, middle="streaming"),
    TriForceConfig(budget=8, window=16, refresh_every=3, chunk_size=4),
], ids=["paper-gammas", "gamma3x5", "streaming-middle", "chunk4-refresh3"])
def test_greedy_is_lossless(models, cfg):
    target, draft = models
    for seed in range(3):
        ids = prompt(40 + 13 * seed, seed)
        ours, stats = triforce_generate(target, draft, ids, 15, cfg)
        plain, _ = autoregressive_generate(target, ids, 15)
        hf = target.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)[0]
        assert torch.equal(ours, plain) and torch.equal(plain, hf)
        assert stats.new_tokens == 15 and stats.rounds >= 1
        assert 0 <= stats.draft_acceptance <= 1 and 0 <= stats.middle_acceptance <= 1


@pytest.mark.parametrize("cfg", [
    TriForceConfig(budget=16, window=16),
    TriForceConfig(budget=24, window=8, sinks=8, gamma1=3, gamma2=5, refresh_every=10**9),
    TriForceConfig(budget=16, window=16, middle="streaming"),
    TriForceConfig(budget=8, window=16, refresh_every=3, chunk_size=4),
], ids=["paper-gammas", "gamma3x5-built-once", "streaming-middle", "chunk4-refresh3"])
def test_fixed_shape_steps_are_lossless(models, cfg):
    """`cuda_graphs=True` (run eagerly on a CPU: the same fixed-shape steps a GPU captures): greedy output identical
    to plain decoding's, the plain baseline's fixed-shape steps too, with the chunk kernel and with SDPA; and with
    the retrieval cache at level 2, the same acceptance counts as the eager passes."""
    target, draft = models
    for seed in range(2):
        ids = prompt(40 + 13 * seed, seed)
        plain, _ = autoregressive_generate(target, ids, 15)
        ours, stats = triforce_generate(target, draft, ids, 15, cfg, cuda_graphs=True)
        assert torch.equal(ours, plain) and stats.new_tokens == 15 and stats.setup_seconds == 0
        for sdpa in (False, True):
            assert torch.equal(autoregressive_generate(target, ids, 15, cuda_graphs=True, sdpa=sdpa)[0], plain)
        if cfg.middle == "retrieval":
            _, eager = triforce_generate(target, draft, ids, 15, cfg)
            assert (stats.draft_accepted, stats.middle_accepted) == (eager.draft_accepted, eager.middle_accepted)


def test_fixed_shape_sampling_follows_the_eager_loop(models):
    "At temperature 0.8 the fixed-shape steps draw the same tokens as the eager passes from the same generator."
    target, draft = models
    cfg = TriForceConfig(budget=16, window=8, temperature=0.8)
    a, _ = triforce_generate(target, draft, prompt(50, 3), 20, cfg, generator=torch.Generator().manual_seed(1))
    b, _ = triforce_generate(target, draft, prompt(50, 3), 20, cfg, generator=torch.Generator().manual_seed(1), cuda_graphs=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("start,t", [(0, 1), (7, 3), (40, 1), (64, 7), (201, 2)])
def test_streaming_chunks_read_what_streaming_selection_reads(start, t):
    def tokens(chunks, n, C=8):
        return {int(c) * C + j for c in chunks.flatten().tolist() if c >= 0 for j in range(C) if int(c) * C + j < n}
    fixed = streaming_chunks(torch.tensor(start), t, 2, sinks=16, window=48)
    assert fixed.shape == (1, 2, 2 + (48 + t) // 8 + 3)                       # a fixed shape, whatever the start
    assert tokens(fixed, start + t) == tokens(streaming_selection(start, 1, 1, 2, 16, 48).for_layer(0, start + t), start + t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_output(models):
    """On a GPU the fixed-shape steps are captured and replayed: fp32 models, greedy, the same tokens as the eager
    passes and as plain decoding (eager and replayed), and graph capture reported as set-up time."""
    target, draft = (m.to("cuda") for m in models)
    try:
        for seed, cfg in enumerate([TriForceConfig(budget=16, window=16), TriForceConfig(budget=16, window=16, refresh_every=10**9)]):
            ids = prompt(60 + 7 * seed, seed).cuda()
            plain, _ = autoregressive_generate(target, ids, 20)
            fast, stats = triforce_generate(target, draft, ids, 20, cfg, cuda_graphs=True)
            assert torch.equal(fast, plain) and stats.setup_seconds > 0
            for sdpa in (False, True):
                assert torch.equal(autoregressive_generate(target, ids, 20, cuda_graphs=True, sdpa=sdpa)[0], plain)
    finally:
        for m in models:
            m.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_sampling_replayed_follows_the_eager_loop(models):
    "On a GPU, tokens drawn there with a CUDA generator: the replayed steps draw what the eager passes draw."
    target, draft = (m.to("cuda") for m in models)
    try:
        cfg, ids = TriForceConfig(budget=16, window=8, temperature=0.8), prompt(50, 3).cuda()
        gen = lambda: torch.Generator("cuda").manual_seed(1)
        a, _ = triforce_generate(target, draft, ids, 20, cfg, generator=gen())
        b, _ = triforce_generate(target, draft, ids, 20, cfg, generator=gen(), cuda_graphs=True)
        c, _ = autoregressive_generate(target, ids, 20, 0.8, gen())
        d, _ = autoregressive_generate(target, ids, 20, 0.8, gen(), cuda_graphs=True)
        assert torch.equal(a, b) and torch.equal(c, d)
    finally:
        for m in models:
            m.to("cpu")


def test_graph_levels_size_the_retrieval_list_from_the_prefill(models):
    "Built once from the prompt, the level-2 list still covers every token up to the buffer's end, and no more."
    target, draft = models
    cache = FlatKVCache(target, 100)
    cache.lengths = [80] * len(cache.lengths)
    levels = GraphLevels(target, draft, cache, FlatKVCache(draft, 100), TriForceConfig(budget=16, refresh_every=10**9))
    assert levels.n_keep == 2 and levels.n_tail * 8 >= 100 - 80 + 8 and levels.n_tail <= 6
    assert levels.stream is None                                         # a CPU: the steps run eagerly


def test_eos_stops_like_generate(models):
    target, draft = models
    ids = prompt(30, 5)
    plain, _ = autoregressive_generate(target, ids, 12)
    eos = int(plain[33])                                              # the 4th generated token becomes "EOS"
    ours, stats = triforce_generate(target, draft, ids, 12, TriForceConfig(budget=16, window=16), eos_token_id=eos)
    ref, _ = autoregressive_generate(target, ids, 12, eos_token_id=eos)
    assert torch.equal(ours, ref) and ours[-1] == eos and stats.new_tokens == len(ours) - 30


def test_sampling_is_exact(models):
    """At temperature 0.1 (random-init logits are nearly flat), the first sampled token follows the target."""
    target, draft = models
    ids = prompt(48, 9)
    T = 0.1
    with torch.no_grad():
        p = to_probs(target(ids).logits[0, -1], T)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    cfg = TriForceConfig(budget=16, window=8, temperature=T, gamma2=3)
    for _ in range(300):
        out, _ = triforce_generate(target, draft, ids, 1, cfg, generator=g)
        counts[out[-1]] += 1
    assert chi_square_pvalue(counts, p) > 1e-3


def test_identical_draft_always_accepted(models):
    target, _ = models
    _, stats = triforce_generate(target, target, prompt(40, 2), 12, TriForceConfig(budget=512, window=512))
    assert (stats.draft_acceptance, stats.middle_acceptance) == (1.0, 1.0)
    assert isinstance(stats, DecodeStats) and stats.tokens_per_round == 12 / stats.rounds


def test_attention_is_restored(models):
    target, draft = models
    before = target.config._attn_implementation
    triforce_generate(target, draft, prompt(20, 0), 3)
    assert target.config._attn_implementation == before


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(gamma1=0), ValueError, "gamma1"),
    (dict(budget=2.5), ValueError, "budget"),
    (dict(middle="h2o"), ValueError, "middle"),
    (dict(temperature=-1), ValueError, "temperature"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TriForceConfig(**kwargs)


def test_bad_calls(models):
    target, draft = models
    with pytest.raises(ValueError, match="at least 2"):
        triforce_generate(target, draft, prompt(1, 0), 4)
    with pytest.raises(ValueError, match="one sequence"):
        triforce_generate(target, draft, torch.ones(2, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        triforce_generate(target, draft, prompt(5, 0), 0)
    with pytest.raises(TypeError, match="TriForceConfig"):
        triforce_generate(target, draft, prompt(5, 0), 3, cfg=dict(budget=8))
    other = build_model(tiny_config("llama", vocab_size=V + 1, d_model=16, n_layers=1, n_heads=2), seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        triforce_generate(target, other, prompt(5, 0), 3)


def test_sliding_window_targets_are_refused_or_exact():
    """A Mistral whose window (8) is shorter than the sequence is refused with a clear error, on both decoders
    (23.1: both diverged from generate within 1-2 tokens); with a window longer than the sequence it is exact."""
    from transformers import MistralConfig, MistralForCausalLM
    def mistral(window):
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                                max_position_embeddings=256, bos_token_id=1, eos_token_id=2)).eval()
    draft = tiny_config("llama", vocab_size=V, d_model=16, n_layers=1, n_heads=2, block_size=256)
    draft = build_model(draft, seed=1).eval()
    x = prompt(40, 0)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        autoregressive_generate(mistral(8), x, 6)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        triforce_generate(mistral(8), draft, x, 6)
    wide = mistral(200)
    want = wide.generate(x, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0]
    assert torch.equal(autoregressive_generate(wide, x, 6)[0], want)
    assert torch.equal(triforce_generate(wide, draft, x, 6, TriForceConfig(budget=16, window=8, sinks=2))[0], want)


def test_cache_takes_its_head_count_from_the_keys():
    "GPT-NeoX ignores num_key_value_heads: the cache is sized by the keys the model writes, not the config."
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)).eval()
    x = prompt(20, 1)
    want = m.generate(x, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0]
    assert torch.equal(autoregressive_generate(m, x, 5)[0], want)
