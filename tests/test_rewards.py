"""The reward-transfer chapter's package (tinylab.rewards): the generated languages, the gold judge, the raters,
tokens and sampling, preference pairs and translate-train, reward models trained with trl, best-of-n and the win
rate, and the RLOO loop with the fused log-prob kernel."""
import random

import numpy as np
import pytest
import torch

import tinylab.rewards as rw
from tinylab.kernels.logprob_gather import logprob_gather_ref
from tinylab.lm import build_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    langs = rw.make_languages(3, seed=0)
    tok = rw.world_tokenizer(langs)
    model = build_model(tiny_config("llama", vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, block_size=64,
                                    tokenizer=tok), seed=0)
    model.config.pad_token_id = tok.pad_token_id
    return langs, tok, model.eval()


def test_languages_have_disjoint_lexicons_and_shared_anchors():
    langs = rw.make_languages(4, seed=1)
    for a in langs:
        for b in langs:
            if a is not b:
                assert not set(a.lexicon.values()) & set(b.lexicon.values())
                assert a.anchors == b.anchors
    assert [L.value_first for L in langs] == [False, True, False, True]
    unshared = rw.make_languages(2, seed=1, shared_anchors=False)
    assert not set(unshared[0].anchors.values()) & set(unshared[1].anchors.values())
    with pytest.raises(ValueError, match="n must be in 1.."):
        rw.make_languages(0)


def test_gold_judge_is_graded_and_reads_meaning():
    langs = rw.make_languages(2, seed=0)
    rng = random.Random(3)
    for _ in range(20):
        rec = rw.sample_record(rng)
        for L in langs:
            ref = rw.reference_summary(rec, L)
            assert rw.gold_score(ref, rec, L) == 1.0
            assert rw.parse_summary(ref, L) == rw.Meaning(rec.name, list(rec.facts.items()), 0)
        n = len(rec.facts) + 1
        L = langs[0]
        ref = rw.reference_summary(rec, L)
        assert rw.gold_score(ref[:-2], rec, L) == pytest.approx((n - 1) / n)          # a fact missing
        assert rw.gold_score(ref + ref[1:3], rec, L) == pytest.approx((n - 0.5) / n)  # repeated
        wrong = [a for a in rw.ATTRIBUTES if a not in rec.facts][0]
        extra = L.fact(wrong, rw.ATTRIBUTES[wrong][0])
        assert rw.gold_score(ref + extra, rec, L) == pytest.approx((n - 1) / n)       # a hallucinated fact
        # the same meaning in another word order scores the same: the judge reads meaning, not surface
        order = list(rec.facts.items())[::-1]
        assert rw.gold_score(rw.render_summary(rec.name, order, L), rec, L) == 1.0


def test_raters_have_their_own_biases():
    L = rw.make_languages(1)[0]
    rec = rw.sample_record(random.Random(0))
    ref = rw.reference_summary(rec, L)
    wrong = [a for a in rw.ATTRIBUTES if a not in rec.facts][0]
    longer = ref + L.fact(wrong, rw.ATTRIBUTES[wrong][0])
    careful, verbose = rw.LABELLERS[0], rw.LABELLERS[1]
    assert careful.utility(longer, rec, L) < careful.utility(ref, rec, L)
    assert verbose.utility(longer, rec, L) > careful.utility(longer, rec, L)
    blind = rw.Labeller(ignores=("age",))
    bad_age = rw.render_summary(rec.name, [("age", "18" if rec.facts["age"] != "18" else "19")] +
                                [(a, v) for a, v in rec.facts.items() if a != "age"], L)
    assert blind.utility(bad_age, rec, L) > careful.utility(bad_age, rec, L)
    r = random.Random(0)
    wins = np.mean([careful.prefers_first(ref, ref[:-2], rec, L, r) for _ in range(500)])
    assert 0.6 < wins < 1.0


def test_tokenizer_tasks_and_sampling(world):
    langs, tok, model = world
    assert tok.pad_token_id != tok.eos_token_id
    ts = rw.make_tasks(langs[1], tok, 6, seed=0)
    words = rw.render_prompt(ts.records[0], langs[1], random.Random(0))
    assert tok(" ".join(words))["input_ids"] == tok.convert_tokens_to_ids(words)
    assert rw.completion_words(ts.references[0], tok) == rw.reference_summary(ts.records[0], langs[1])
    out = rw.sample(model, ts.prompts, 7, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 7)
    for row in out:
        hits = (row == tok.eos_token_id).nonzero()
        if len(hits):
            assert (row[hits[0, 0] + 1:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="prompts must be"):
        rw.sample(model, ts.prompts[0], 3, eos_id=0, pad_id=1)
    docs = rw.pretraining_texts(langs, 5, seed=0)
    assert len(docs) == 15 and all(tok.unk_token_id not in tok(d)["input_ids"] for d in docs)


def test_pairs_translate_and_reward_model(world):
    langs, tok, model = world
    ts = rw.make_tasks(langs[0], tok, 24, seed=1)
    pairs = rw.preference_pairs(model, ts, rw.LABELLERS[0], tok, max_new=10, seed=0)
    assert len(pairs["chosen_ids"]) == len(pairs["rejected_ids"]) == len(pairs["index"]) > 0
    moved = rw.translate_pairs(pairs, ts, langs[1], tok, seed=0)
    P = ts.prompts.shape[1]
    for i, a, b in zip(pairs["index"], pairs["rejected_ids"], moved["rejected_ids"]):
        m0 = rw.parse_summary(rw.completion_words(torch.tensor(a[P:]), tok), langs[0])
        m1 = rw.parse_summary(rw.completion_words(torch.tensor(b[P:]), tok), langs[1])
        assert m0.facts == m1.facts
    rm, log = rw.train_reward_model(model, pairs, tok, steps=3, batch_size=8)
    assert any("loss" in r for r in log)
    comps = rw.sample(model, ts.prompts[:4], 10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    s = rw.reward_scores(rm, ts.prompts[:4], comps, tok.eos_token_id, tok.pad_token_id)
    assert s.shape == (4,) and torch.isfinite(s).all()
    # the score is read at an EOS: a completion cut short scores as if EOS followed
    cut = torch.tensor([[5, 6, 7]])
    ended = torch.tensor([[5, 6, 7, tok.eos_token_id]])
    assert torch.allclose(rw.reward_scores(rm, ts.prompts[:1], cut, tok.eos_token_id, tok.pad_token_id),
                          rw.reward_scores(rm, ts.prompts[:1], ended, tok.eos_token_id, tok.pad_token_id), atol=1e-5)


def test_terminated_appends_eos_only_where_missing():
    c = torch.tensor([[5, 6, 0, 1, 1], [5, 6, 7, 8, 9], [0, 1, 1, 1, 1]])
    out = rw._terminated(c, 0, 1)
    assert out.tolist() == [[5, 6, 0, 1, 1, 1], [5, 6, 7, 8, 9, 0], [0, 1, 1, 1, 1, 1]]


def test_best_of_n_and_win_rate():
    scores = np.array([[0.1, 0.9, 0.5, 0.2]]); gold = np.array([[0.0, 1.0, -1.0, 0.5]])
    assert best_of_n_equal(rw.best_of_n(scores, gold, 2), [[1.0, -1.0]])
    assert best_of_n_equal(rw.best_of_n(scores, gold, 1), gold)
    assert rw.win_rate(np.array([[1.0, 0.0]]), np.array([[0.5, 0.0]])) == pytest.approx(0.625)
    assert rw.win_rate(gold, gold) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n must be in 1..4"):
        rw.best_of_n(scores, gold, 8)


def best_of_n_equal(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_sequence_logprobs_use_the_kernel_and_match_the_definition(world):
    langs, tok, model = world
    ts = rw.make_tasks(langs[2], tok, 5, seed=2)
    comps = rw.sample(model, ts.prompts, 8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ts.prompts, comps], 1)).logits[:, ts.prompts.shape[1] - 1:-1]
        ref = (logprob_gather_ref(logits, comps) * (comps != tok.pad_token_id)).sum(1)
        for backend in ("torch", "triton"):
            out = rw.sequence_logprobs(model, ts.prompts, comps, tok.pad_token_id, backend=backend)
            assert torch.allclose(out, ref, atol=1e-4)


def test_rloo_moves_towards_the_reward_and_checks_arguments(world):
    langs, tok, model = world
    import copy
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    ts = rw.make_tasks(langs[0], tok, 16, seed=3)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # a reward for short answers: the policy should learn to stop earlier
    reward = lambda p, y: -(y != pad).sum(1).float()
    hist = rw.rloo_train(policy, reference, reward, ts.prompts, steps=25, k=4, batch_prompts=4, beta=0.0, lr=3e-2,
                         max_new=8, eos_id=eos, pad_id=pad, seed=0)
    assert len(hist["reward"]) == 25 and np.mean(hist["reward"][-5:]) > np.mean(hist["reward"][:5])
    for p_new, p_old in zip(reference.parameters(), model.parameters()):
        assert torch.equal(p_new, p_old)          # the reference stays frozen
    with pytest.raises(ValueError, match="k must be >= 2"):
        rw.rloo_train(policy, reference, reward, ts.prompts, steps=1, k=1, eos_id=eos, pad_id=pad)
    with pytest.raises(ValueError, match="beta"):
        rw.rloo_train(policy, reference, reward, ts.prompts, steps=1, beta=-1.0, eos_id=eos, pad_id=pad)


def test_train_sft_learns_the_summaries(world):
    langs, tok, model = world
    import copy
    m = copy.deepcopy(model)
    tasks = [rw.make_tasks(L, tok, 32, seed=4) for L in langs]
    losses = rw.train_sft(m, tasks, steps=30, batch_size=16, lr=5e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    with pytest.raises(ValueError, match="prompts of one length"):
        rw.train_sft(m, [], steps=1)
