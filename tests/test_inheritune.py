import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from tinylab.inheritune import find_layer_list, inherit
from tinylab.lm import build_model, tiny_config


def make(arch, n_layers=4, **overrides):
    config = tiny_config(arch, vocab_size=97, d_model=24, n_layers=n_layers, n_heads=4, block_size=32, **overrides)
    return build_model(config, seed=0).eval()


@pytest.mark.parametrize("arch,prefix", [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_find_layer_list(arch, prefix):
    name, blocks = find_layer_list(make(arch))
    assert name == prefix and len(blocks) == 4


@pytest.mark.parametrize("arch,cls", [("llama", LlamaForCausalLM), ("gpt2", GPT2LMHeadModel)])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_inherit_copies_weights_exactly(arch, cls, k):
    parent = make(arch)
    child = inherit(parent, k)
    assert type(child) is cls and child.config.num_hidden_layers == k and parent.config.num_hidden_layers == 4
    psd, csd = parent.state_dict(), child.state_dict()
    assert set(csd) == {key for key in psd if not any(f".{i}." in key for i in range(k, 4))}
    for key, value in csd.items():
        assert torch.equal(value, psd[key]), key
    # embeddings, final norm and head are the parent's (one official path forgot them)
    emb = child.get_input_embeddings().weight
    assert torch.equal(emb, parent.get_input_embeddings().weight)
    assert torch.equal(child.get_output_embeddings().weight, parent.get_output_embeddings().weight)
    # a copy, not a view: training the child leaves the parent alone
    with torch.no_grad():
        emb.add_(1.0)
    assert not torch.equal(emb, parent.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inherited_blocks_compute_the_same_function(arch):
    parent, x = make(arch), torch.randint(97, (2, 11))
    child = inherit(parent, 2)
    with torch.no_grad():
        hp = parent(x, output_hidden_states=True).hidden_states
        hc = child(x, output_hidden_states=True).hidden_states
    assert torch.equal(hc[0], hp[0]) and torch.equal(hc[1], hp[1])


def test_full_depth_inheritance_is_the_same_model():
    parent, x = make("llama"), torch.randint(97, (1, 9))
    with torch.no_grad():
        assert torch.equal(inherit(parent, 4)(x).logits, parent(x).logits)


def test_explicit_indices_pick_those_blocks():
    parent = make("llama")
    child = inherit(parent, [3, 1])
    assert torch.equal(child.model.layers[0].mlp.up_proj.weight, parent.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(child.model.layers[1].mlp.up_proj.weight, parent.model.layers[1].mlp.up_proj.weight)


def test_loss_shifts_labels_once():
    "An official path shifted labels twice; HF models shift once internally, and so must our use of them."
    model, x = make("llama"), torch.randint(97, (2, 13))
    with torch.no_grad():
        logits = model(x).logits
        manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
        assert torch.allclose(model(x, labels=x).loss, manual, atol=1e-6)


def test_save_load_generate(tmp_path):
    child = inherit(make("gpt2"), 2)
    child.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.n_layer == 2
    x = torch.randint(97, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, child(x).logits)
    assert loaded.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 8)


def test_per_layer_config_lists_follow_blocks():
    parent = make("llama")
    parent.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"]
    assert inherit(parent, [0, 3]).config.layer_types == ["full_attention", "sliding_attention"]


def test_inverse_layer_scaling_allows_only_a_prefix():
    parent = make("gpt2", scale_attn_by_inverse_layer_idx=True)
    assert inherit(parent, 2).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="prefix"):
        inherit(parent, [2, 3])


@pytest.mark.parametrize("layers,exc,match", [
    (5, ValueError, "cannot inherit 5 blocks"),
    (0, ValueError, "need 1..4"),
    (-1, ValueError, "need 1..4"),
    (True, TypeError, "bool"),
    ([], TypeError, "non-empty"),
    ([1, 1], ValueError, "distinct"),
    ([0, 4], ValueError, "in 0..3"),
    (2.0, TypeError, "sequence"),
])
def test_inherit_bad_layers(layers, exc, match):
    with pytest.raises(exc, match=match):
        inherit(make("llama"), layers)


def test_inherit_rejects_non_hf_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        inherit(nn.Sequential(nn.Linear(2, 2)), 1)


def test_inherit_model_without_findable_layer_list():
    model = make("llama")
    model.config.num_hidden_layers = 7  # no ModuleList of 7 blocks exists
    with pytest.raises(ValueError, match="cannot find its layer list"):
        inherit(model, 1)


# ---------------------------------------------------------------- the claim table's own yardstick

def test_gap_closed_decides_both_ways():
    import numpy as np
    from tinylab.core import FAILS, HOLDS, decide
    from tinylab.inheritune import gap_closed
    rng = np.random.default_rng(0)
    scratch = 5.0 + 0.3 * rng.standard_normal(200)      # per-sequence losses on the same sequences
    reference = scratch - 1.0 + 0.05 * rng.standard_normal(200)
    barely = scratch - 0.1 + 0.05 * rng.standard_normal(200)  # closes about 10% of the gap: adverse case
    assert decide(gap_closed(barely, scratch, reference)) == FAILS
    nearly = reference + 0.1 + 0.05 * rng.standard_normal(200)  # closes about 90%
    assert decide(gap_closed(nearly, scratch, reference)) == HOLDS
    assert gap_closed(nearly, scratch, reference).estimate == pytest.approx(np.mean((scratch - nearly) - 0.5 * (scratch - reference)))


@pytest.mark.parametrize("args,kwargs,match", [
    (([1.0, 2.0], [1.0], [1.0, 2.0]), {}, "same sequences"),
    (([[1.0]], [[1.0]], [[1.0]]), {}, "same sequences"),
    (([], [], []), {}, "same sequences"),
    (([1.0], [2.0], [0.5]), {"fraction": 0.0}, "fraction"),
    (([1.0], [2.0], [0.5]), {"fraction": 1.5}, "fraction"),
])
def test_gap_closed_bad_inputs(args, kwargs, match):
    from tinylab.inheritune import gap_closed
    with pytest.raises(ValueError, match=match):
        gap_closed(*args, **kwargs)


def test_whole_model_lists_as_long_as_the_depth_are_kept():
    "eos_token_id = [5, 6] in a two-block model is not a per-layer list: inheriting one block keeps both ids (23.2)."
    cfg = tiny_config("llama", vocab_size=50, d_model=16, n_layers=2, n_heads=2, block_size=16)
    cfg.eos_token_id = [5, 6]
    child = inherit(build_model(cfg, seed=0), 1)
    assert child.config.eos_token_id == [5, 6]


def test_generation_defaults_come_along():
    "The parent's generation_config (hub models keep eos ids and sampling defaults there) is the child's (23.3)."
    parent = build_model(tiny_config("llama", vocab_size=50, d_model=16, n_layers=2, n_heads=2, block_size=16), seed=0)
    parent.generation_config.eos_token_id = [7, 8]
    parent.generation_config.max_new_tokens = 9
    child = inherit(parent, 1)
    assert child.generation_config.eos_token_id == [7, 8] and child.generation_config.max_new_tokens == 9
    assert child.generation_config is not parent.generation_config


def test_index_lists_are_renumbered():
    "A list of block indices (an MoE model's dense layers) is renumbered for the kept blocks."
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = Qwen2MoeConfig(vocab_size=50, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         shared_expert_intermediate_size=8, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=2, num_experts_per_tok=1, mlp_only_layers=[1, 3])
    child = inherit(Qwen2MoeForCausalLM(cfg), [1, 2])
    assert child.config.mlp_only_layers == [0]


# ---------------------------------------------------------------- the k = 0 control, the probe, the regime (#22)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inherit_embeddings_keeps_all_but_the_blocks(arch):
    from tinylab.inheritune import inherit_embeddings
    parent = make(arch)
    ctrl, child = inherit_embeddings(parent, 2, seed=3), inherit(parent, 2)
    prefix, _ = find_layer_list(parent)
    csd, psd = ctrl.state_dict(), parent.state_dict()
    assert set(csd) == set(child.state_dict())
    for key, value in csd.items():
        if key.startswith(prefix + "."):
            if value.ndim == 2:  # fresh weight matrices
                assert not torch.equal(value, psd[key]), key
        else:
            assert torch.equal(value, psd[key]), key
    again = inherit_embeddings(parent, 2, seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in csd.items())  # seeded


def test_chance_interval():
    from tinylab.inheritune import chance_interval
    assert chance_interval(4) == (0.0, 0.75)          # P(0) = .316 > .025; P(<= 2) = .949, P(<= 3) = .996
    lo, hi = chance_interval(1000)
    assert 0.22 < lo < 0.25 < hi < 0.28
    assert chance_interval(100, p=0.5) == (0.4, 0.6)
    for bad in (0, 2.0):
        with pytest.raises(ValueError):
            chance_interval(bad)
    with pytest.raises(ValueError):
        chance_interval(10, p=1.0)


def _word_tokenizer():
    "A tokenizer whose words are 1 or 2 tokens, so that length matching can be tested."
    from tinylab.lm import train_tokenizer
    text = ("the king and the queen walked over the bridge tonight while the horses slept\n" * 30
            + "crown honour sorrow thunder mercy wisdom garden battle\n" * 2)
    return train_tokenizer([text], vocab_size=400, min_frequency=2)


def test_cloze_items_match_lengths_and_avoid_the_context():
    from tinylab.inheritune import cloze_items
    tok = _word_tokenizer()
    train = ["over there stands the bridge tonight while horses crown honour sorrow thunder mercy wisdom garden "
             "battle sleeps dreams walks talks sings"] * 3
    held = ["\n".join(["now the king walks in the garden of sorrow tonight"] * 3 + ["and so the queen will sleep"] * 3)]
    items = cloze_items(held, train, tok, n_items=50, context_tokens=4, seed=0)
    assert items
    for ids, options in items:
        assert len(ids) == 4 and len(options) == 4 and len(set(options)) == 4
        lengths = {len(tok(" " + w)["input_ids"]) for w in options}
        assert len(lengths) == 1, options
        assert options[0] not in tok.decode(ids).split()


def test_cloze_scores_pick_the_likeliest_option():
    "A model that always predicts one token scores an item right exactly when that token is the true word's."
    import numpy as np
    from tinylab.inheritune import cloze_scores
    tok = _word_tokenizer()
    model = build_model(tiny_config("llama", vocab_size=len(tok), d_model=24, n_layers=2, n_heads=4, block_size=32), seed=0)
    target = tok(" king")["input_ids"]
    assert len(target) == 1
    model.lm_head = nn.Linear(24, len(tok), bias=True)  # untied: a constant prediction, whatever the input
    with torch.no_grad():
        model.lm_head.weight.zero_(); model.lm_head.bias.zero_(); model.lm_head.bias[target[0]] = 10.0
    one = lambda w: tok(" " + w)["input_ids"]
    words = [w for w in ("king", "the", "and", "over") if len(one(w)) == 1]
    ctx = tok("the queen")["input_ids"][:2]
    items = [(ctx, ["king"] + [w for w in words if w != "king"][:3]), (ctx, [w for w in words if w != "king"][:3] + ["king"])]
    assert np.array_equal(cloze_scores(model, items, tok), [1.0, 0.0])
    with pytest.raises(ValueError, match="context length"):
        cloze_scores(model, [items[0], (ctx + ctx, items[0][1])], tok, batch_items=2)


def test_seq_losses_match_the_model_loss():
    from datasets import Dataset
    from tinylab.inheritune import seq_losses
    model, x = make("llama"), torch.randint(97, (5, 12))
    blocks = Dataset.from_dict({"input_ids": x.tolist()}).with_format("torch")
    per_seq = seq_losses(model, blocks, batch_size=2)
    assert per_seq.shape == (5,)
    with torch.no_grad():
        for i in range(5):
            assert per_seq[i] == pytest.approx(model(x[i:i + 1], labels=x[i:i + 1]).loss.item(), abs=1e-5)


def test_small_model_kinds():
    from tinylab.inheritune import small_model
    parent = make("llama")
    first, last = small_model("inherit first", parent, 2, 0), small_model("inherit last", parent, 2, 0)
    assert torch.equal(first.model.layers[0].mlp.up_proj.weight, parent.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(last.model.layers[0].mlp.up_proj.weight, parent.model.layers[2].mlp.up_proj.weight)
    k0, scratch = small_model("k = 0", parent, 2, 0), small_model("scratch (full data)", parent, 2, 0)
    assert torch.equal(k0.model.embed_tokens.weight, parent.model.embed_tokens.weight)
    assert not torch.equal(scratch.model.embed_tokens.weight, parent.model.embed_tokens.weight)
    assert all(m.config.num_hidden_layers == 2 for m in (first, last, k0, scratch))
    with pytest.raises(ValueError, match="kind"):
        small_model("distilled", parent, 2, 0)


def test_run_regime_budgets_and_rows():
    "The low-data models see at most token_fraction of the reference's tokens; what does not fit the budget is skipped."
    from datasets import Dataset
    from tinylab.inheritune import LOW_DATA, run_regime
    tok = _word_tokenizer()
    torch.manual_seed(0)
    train = Dataset.from_dict({"input_ids": torch.randint(len(tok), (64, 16)).tolist()}).with_format("torch")
    val = Dataset.from_dict({"input_ids": torch.randint(len(tok), (8, 16)).tolist()}).with_format("torch")
    ref = build_model(tiny_config("llama", vocab_size=len(tok), d_model=16, n_layers=2, n_heads=2, block_size=16), seed=0)
    items = [(tok("the king and")["input_ids"][:3], ["queen", "bridge", "horses", "over"])]
    res = run_regime(ref, train, val, val, items, tok, ref_steps=40, batch_size=4, lr=1e-3, token_fraction=0.05,
                     epochs=2, seeds=(0, 1), full_seeds=(0,), full=("scratch (full data)",), untrained=1, evals=4,
                     log=lambda s: None)
    names = [(r["name"], r["seed"]) for r in res["rows"]]
    assert names[:2] == [("untrained", 0), ("reference", 0)]
    assert {(n, s) for n in LOW_DATA for s in (0, 1)} | {("scratch (full data)", 0)} <= set(names)
    assert res["small_steps"] == 2 and res["subset_blocks"] == 4 and res["k"] == 1
    ref_tokens = next(r["tokens"] for r in res["rows"] if r["name"] == "reference")
    for r in res["rows"]:
        if r["name"] in LOW_DATA:
            assert r["tokens"] <= 0.05 * ref_tokens
        assert len(r["seq"]) == 8 and len(r["cloze_items"]) == 1
    tight = run_regime(build_model(ref.config, seed=0), train, val, val, items, tok, ref_steps=40, batch_size=4,
                       lr=1e-3, seeds=(0,), full_seeds=(0,), untrained=0, budget_s=0.0, log=lambda s: None)
    assert [r["name"] for r in tight["rows"]] == ["reference"] and len(tight["skipped"]) == 4 + 2
    with pytest.raises(ValueError, match="token_fraction"):
        run_regime(ref, train, val, val, items, tok, ref_steps=10, batch_size=4, lr=1e-3, log=lambda s: None)
