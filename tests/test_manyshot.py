"""tinylab.manyshot: task generators, nested prompts, shared-prefix evaluation, baselines, Reinforced/Unsupervised ICL."""
import numpy as np
import pytest
import torch

from tinylab.lm import EOS, build_model, tiny_config
from tinylab.manyshot import (addition_task, answer_of, baseline_accuracy, build_prompt, encode_prefix, evaluate_generation,
                              evaluate_icl, generate_after_prefix, linear_task, lookup_task, meta_training_mix,
                              nested_orders, parity_task, prefix_cache, rationale, reinforced_shots, score_targets,
                              sentiment_task, shot, shot_counts, word_tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tiny_config(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, block_size=2048, tokenizer=tok), seed=0).eval()


def test_tokenizer_maps_every_word_to_one_id(tok):
    words = "12 -5 = | A pos great film e31 write carry so problems :".split()
    ids = tok(" ".join(words))["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == words and tok.convert_tokens_to_ids(EOS) == 0


@pytest.mark.parametrize("n_features", [1, 8, 33])
def test_linear_task_labels_follow_one_hyperplane(n_features):
    ds = linear_task(n_features, 300, seed=3)
    X, y = np.array(ds["feats"]), np.array(ds["label"])
    assert X.shape == (300, n_features) and X.min() >= -5 and X.max() <= 5
    # a perceptron-free check: the labels are linearly separable through the origin (LP-free: fit least squares on signs)
    w = np.random.default_rng(3).standard_normal(n_features)
    assert ((X @ w > 0).astype(int) == y).all()
    assert all(len(x) == n_features and yy in (["A"], ["B"]) for x, yy in zip(ds["x"], ds["y"]))


def test_linear_task_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_features"):
        linear_task(0, 5, seed=0)


@pytest.mark.parametrize("labels", [("pos", "neg"), ("neg", "pos"), ("C", "D")])
def test_sentiment_labels_swap_without_changing_inputs(labels):
    base, other = sentiment_task(50, 7), sentiment_task(50, 7, labels)
    assert base["x"] == other["x"] and base["label"] == other["label"]
    assert all(y == [labels[0] if l else labels[1]] for y, l in zip(other["y"], other["label"]))


def test_lookup_mapping_is_consistent_within_an_instance():
    ds = lookup_task(200, seed=1)
    seen = {}
    for x, y in zip(ds["x"], ds["y"]):
        entity = next(w for w in x if w.startswith("e"))
        assert seen.setdefault(entity, y) == y
    assert len({y[0] for y in ds["y"]}) == 2


@pytest.mark.parametrize("bits", [1, 5, 20])
def test_parity_is_prefix_xor(bits):
    ds = parity_task(bits, 20, seed=0)
    for x, y in zip(ds["x"], ds["y"]):
        assert [int(v) for v in y] == list(np.cumsum([int(v) for v in x]) % 2)


@pytest.mark.parametrize("a,b", [(0, 0), (9, 1), (57, 68), (999, 1), (123, 45)])
@pytest.mark.parametrize("style", ["generator", "given"])
def test_rationales_end_in_the_right_answer(a, b, style):
    assert answer_of(rationale(a, b, style)) == str(a + b)


def test_rationale_styles_differ_and_bad_style_fails():
    assert rationale(57, 68, "generator") != rationale(57, 68, "given")
    assert "write" in rationale(57, 68, "given") and ":" in rationale(57, 68)
    with pytest.raises(ValueError, match="style"):
        rationale(1, 2, "terse")


def test_answer_of_needs_digits_after_so():
    assert answer_of(["so", "1", "2", "|", "so", "9"]) == "9"
    assert answer_of(["write", "3"]) is None and answer_of(["so", "|"]) is None and answer_of(["so", "A"]) is None


def test_addition_task_answers():
    ds = addition_task(3, 30, seed=0)
    for x, y, ans in zip(ds["x"], ds["y"], ds["answer"]):
        a, b = "".join(x).split("+")
        assert int(a) + int(b) == int(ans) and answer_of(y) == ans and len(a) == 3


@pytest.mark.parametrize("max_k,expected", [(0, [0]), (1, [0, 1]), (8, [0, 1, 2, 4, 8]), (12, [0, 1, 2, 4, 8, 12])])
def test_shot_counts(max_k, expected):
    assert shot_counts(max_k) == expected


def test_prompts_are_nested_and_seeds_differ():
    pool = linear_task(5, 100, seed=0)
    orders = nested_orders(100, 40, seeds=[0, 1, 2])
    for order in orders.values():
        prompts = [build_prompt(pool, order, k) for k in shot_counts(40)]
        for small, big in zip(prompts, prompts[1:]):
            assert big[:len(small)] == small
        assert prompts[-1].count("|") == 40 and prompts[0] == [EOS]
    assert len({tuple(sorted(o)) for o in orders.values()}) == 3
    with pytest.raises(ValueError, match="max_k"):
        nested_orders(10, 11, [0])


def test_unsupervised_prompt_has_no_answers():
    pool = addition_task(2, 10, seed=0)
    p = build_prompt(pool, range(10), 3, preamble=["problems", ":"], answers=False)
    assert p[:3] == [EOS, "problems", ":"] and "so" not in p and "=" not in p and p.count("|") == 3


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_cropped_shared_cache_matches_full_encoding(tok, model, k):
    pool, test = linear_task(6, 40, seed=2).select(range(30)), linear_task(6, 40, seed=2).select(range(30, 40))
    order = list(range(7))
    kv = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(pool, order, 7)))
    prompt = tok.convert_tokens_to_ids(build_prompt(pool, order, k))
    q = torch.tensor([tok.convert_tokens_to_ids(shot(ex["x"], ex["y"])[:-1]) for ex in test])
    nll, ok = score_targets(model, kv, len(prompt), q, 1)
    with torch.no_grad():
        logp = model(torch.cat([torch.tensor([prompt]).expand(len(q), -1), q], 1)).logits[:, -2].log_softmax(-1)
    torch.testing.assert_close(nll, -logp.gather(1, q[:, -1:])[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.equal(ok, logp.argmax(-1) == q[:, -1])
    # the prefix tensors are untouched by the queries (expanded views, not written)
    assert kv[0][0].shape[2] == len(tok.convert_tokens_to_ids(build_prompt(pool, order, 7)))


def test_multi_token_targets_and_candidates(tok, model):
    pool, test = parity_task(4, 30, 0).select(range(20)), parity_task(4, 30, 0).select(range(20, 30))
    kv = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(pool, range(8), 8)))
    q = torch.tensor([tok.convert_tokens_to_ids(shot(ex["x"], ex["y"])[:-1]) for ex in test])
    nll_all, ok_all = score_targets(model, kv, kv[0][0].shape[2], q, 4)
    nll_last, _ = score_targets(model, kv, kv[0][0].shape[2], q, 1)
    assert (nll_all >= nll_last - 1e-5).all()                    # a longer target has more to pay
    _, ok_cand = score_targets(model, kv, kv[0][0].shape[2], q, 4, candidates=tok.convert_tokens_to_ids(["0", "1"]))
    assert ok_cand.float().mean() >= ok_all.float().mean()       # restricting the choice can only help
    with pytest.raises(ValueError, match="n_target"):
        score_targets(model, kv, 5, q, 9)


def test_prefix_cache_refuses_bad_lengths(tok, model):
    kv = encode_prefix(model, [0, 5, 6, 7])
    for bad in (0, 5):
        with pytest.raises(ValueError, match="length"):
            prefix_cache(kv, bad, 2)
    assert prefix_cache(kv, 3, 2).get_seq_length() == 3


def test_evaluate_icl_reads_each_prefix_once(tok, model):
    data = sentiment_task(40, 0)
    pool, test = data.select(range(30)), data.select(range(30, 40))
    orders = nested_orders(30, 16, [0, 1, 2])
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: read.append(i[0].numel()))
    try:
        df = evaluate_icl(model, tok, pool, test, orders, shot_counts(16))
    finally:
        hook.remove()
    prefix = 3 * len(build_prompt(pool, orders[0], 16))
    assert sum(read) == prefix + 3 * len(shot_counts(16)) * len(test) * 4
    assert len(df) == 3 * len(shot_counts(16)) * len(test) and set(df.columns) >= {"seed", "k", "item", "correct", "nll"}
    with pytest.raises(ValueError, match="orders"):
        evaluate_icl(model, tok, pool, test, {0: [0, 1]}, [0, 4])


def test_baselines_learn_a_hyperplane_from_enough_shots():
    data = linear_task(4, 400, seed=5)
    pool, test = data.select(range(200)), data.select(range(200, 400))
    b = baseline_accuracy(pool, test, nested_orders(200, 128, [0, 1]), [0, 1, 128])
    acc = b.groupby(["method", "k"]).correct.mean()
    assert acc[("k-NN", 0)] == 0.5 and acc[("logistic regression", 128)] > 0.9 and acc[("k-NN", 128)] > 0.75


def test_generation_stops_and_reinforced_filter(tok, model):
    q = torch.tensor([tok.convert_tokens_to_ids("1 2 + 3 4 =".split())] * 3)
    kv = encode_prefix(model, [0])
    out = generate_after_prefix(model, kv, 1, q, 6, stop_id=tok.convert_tokens_to_ids("|"))
    assert len(out) == 3 and all(1 <= len(o) <= 6 for o in out) and out[0] == out[1]   # greedy: identical
    kept = reinforced_shots(model, tok, addition_task(2, 6, seed=0), [EOS], samples=2, max_new=6)
    assert all(answer_of(y) == a for y, a in zip(kept["y"], kept["answer"]))
    gen = evaluate_generation(model, tok, addition_task(2, 8, 0, "given"), addition_task(2, 3, 1), nested_orders(8, 2, [0]), [0, 2], max_new=4)
    assert len(gen) == 6 and gen.correct.isin([0.0, 1.0]).all()


def test_meta_training_mix():
    mix = meta_training_mix(60, 5, dict(linear=1.0, addition=1.0), seed=0, n_features=(3, 4), n_digits=(1,))
    assert set(mix["task"]) <= {"linear", "addition"} and len(mix) == 60
    assert all(1 <= t.count("|") <= 5 for t in mix["text"])
    with pytest.raises(ValueError, match="unknown tasks"):
        meta_training_mix(2, 3, dict(parity=1.0))


# the evaluation's GPU path: the shared-prefix attention kernel plugged in through transformers' AttentionInterface
# (here in Triton's interpreter, TRITON_INTERPRET=1 from conftest) against the CPU path (DynamicCache + SDPA)

@pytest.mark.parametrize("length", [1, 13, None])
def test_kernel_attention_gives_the_sdpa_logits(tok, model, length):
    from tinylab.manyshot import suffix_logits
    pool, test = linear_task(6, 40, seed=2).select(range(30)), linear_task(6, 40, seed=2).select(range(30, 35))
    kv = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(pool, range(7), 7)))
    length = length or kv[0][0].shape[2]
    q = torch.tensor([tok.convert_tokens_to_ids(shot(ex["x"], ex["y"])[:-1]) for ex in test])
    want = suffix_logits(model, kv, length, q, use_kernel=False)
    got = suffix_logits(model, kv, length, q, use_kernel=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"                   # restored after the kernel pass
    with torch.no_grad():                                                 # and both equal re-encoding everything
        prompt = tok.convert_tokens_to_ids(build_prompt(pool, range(7), 7))[:length]
        full = model(torch.cat([torch.tensor([prompt]).expand(len(q), -1), q], 1)).logits[:, length:]
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_kernel_path_scores_and_generates_as_sdpa(tok, model):
    data = sentiment_task(24, 0, labels=("neg", "pos"))
    pool, test = data.select(range(16)), data.select(range(16, 24))
    orders = nested_orders(16, 4, [0, 1])
    a = evaluate_icl(model, tok, pool, test, orders, [0, 2, 4], use_kernel=False)
    b = evaluate_icl(model, tok, pool, test, orders, [0, 2, 4], use_kernel=True)
    assert (a.correct.values == b.correct.values).all()
    np.testing.assert_allclose(a.nll.values, b.nll.values, atol=1e-4)
    q = torch.tensor([tok.convert_tokens_to_ids("1 2 + 3 4 =".split())] * 2)
    kv = encode_prefix(model, tok.convert_tokens_to_ids(build_prompt(addition_task(2, 4, 0, "given"), range(2), 2)))
    stop = tok.convert_tokens_to_ids("|")
    assert (generate_after_prefix(model, kv, 9, q, 5, stop, use_kernel=True)
            == generate_after_prefix(model, kv, 9, q, 5, stop, use_kernel=False))


def test_answer_labels_keep_the_answers_only(tok):
    from tinylab.manyshot import answer_labels
    words = "e1 film = C | 3 -2 = A | 1 + 2 = 1 + 2 + 0 : 3 so 3 | <|endoftext|> good film = pos | 4".split()
    ids = torch.tensor([tok.convert_tokens_to_ids(words)] * 2)
    lab = answer_labels(ids, *tok.convert_tokens_to_ids(["=", "|"]))
    assert tok.convert_ids_to_tokens(ids[0][lab[0] != -100].tolist()) == "C | A | 1 + 2 + 0 : 3 so 3 | pos |".split()
    # a block that starts inside a shot's input: nothing before its first `=` is an answer, the label after it is
    cut = answer_labels(ids[:, 1:], *tok.convert_tokens_to_ids(["=", "|"]))[0]
    assert (cut[:2] == -100).all() and tok.convert_ids_to_tokens(int(cut[2])) == "C"


def test_train_on_answers_hooks_the_loss(tok, model):
    from tinylab.manyshot import answer_labels, train_on_answers
    ids = torch.tensor([tok.convert_tokens_to_ids("3 -2 = A | 4 1 = B | 0 0".split())])
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids).loss
        handle = train_on_answers(model, tok)
        try:
            hooked = model(input_ids=ids, labels=ids).loss
            logits = model(input_ids=ids).logits                         # no labels: the hook leaves the call alone
        finally:
            handle.remove()
        want = torch.nn.functional.cross_entropy(logits[0, :-1], answer_labels(ids, *tok.convert_tokens_to_ids(["=", "|"]))[0, 1:])
        torch.testing.assert_close(hooked, want)
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, full)
