"""Melodist (tinylab.melodist): the song synthesis (a synthesised note's F0, scores, accompaniments, prompts, score
frames), the codec (shapes, round trip, greedy residual search, the rvq_search tokeniser against ResidualVQ's own
indices), the judges, the InfoNCE loss (a hand-computed case) and the towers, the multi-scale transformer (shapes,
causality over frames and codebooks, generation), one training step of each part, and bad inputs. Everything on
tiny models."""
import json
import math

import librosa
import numpy as np
import pytest
import torch

import tinylab.melodist as mel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("midi", [57, 64, 71])
@pytest.mark.parametrize("syllable", ["la", "mi", "do"])
def test_synth_note_f0(midi, syllable):
    y = mel.synth_vocal([dict(midi=midi, onset=0.0, dur=1.0, syllable=syllable)], singer=1, clip_s=1.0)
    assert y.shape == (mel.SR,) and y.dtype == np.float32
    f0 = librosa.yin(y, fmin=100, fmax=800, sr=mel.SR, frame_length=2048, hop_length=160)
    assert abs(np.median(mel.cents(f0[20:-20], mel.midi_to_hz(midi)))) < 5


def test_score_and_frames():
    rng = np.random.default_rng(0)
    for attrs in (dict(tempo="slow", mode="major", tonic="C"), dict(tempo="fast", mode="minor", tonic="E")):
        score = mel.random_score(attrs, rng)
        assert score[0]["midi"] == mel.TONICS[attrs["tonic"]]
        assert math.isclose(sum(n["dur"] for n in score), mel.CLIP_S, abs_tol=1e-6)
        scale = {(mel.TONICS[attrs["tonic"]] + s) % 12 for s in mel.MODES[attrs["mode"]]}
        assert all(n["midi"] % 12 in scale for n in score)
        eighth = 60 / mel.TEMPOS[attrs["tempo"]] / 2
        assert all(n["dur"] <= 2 * eighth + 1e-6 for n in score)
        fr = mel.score_frames(score, singer=0)
        assert fr.shape == (mel.TOKEN_FRAMES, 4) and fr.dtype == np.int64
        assert set(fr[:, 1]) == {n["midi"] for n in score if n["onset"] < mel.CLIP_S - 0.02}


def test_accompaniment_key_and_prompt():
    attrs = dict(instrument="organ", tempo="slow", tonic="C", mode="major", density="sparse")
    a = mel.render_accompaniment(attrs)
    assert a.shape == (int(mel.SR * mel.CLIP_S),) and np.isfinite(a).all()
    t = np.arange(mel.SR // 2) / mel.SR                            # the first beat: the C major triad in octave 3
    mag = lambda m: abs(np.sum(a[: mel.SR // 2] * np.exp(-2j * np.pi * mel.midi_to_hz(m) * t)))
    assert min(mag(m) for m in (48, 52, 55)) > 10 * max(mag(m) for m in (49, 51, 54))   # chord tones, not their neighbours
    p = mel.make_prompt(attrs, np.random.default_rng(0))
    ids = mel.encode_prompts([p])
    assert ids.shape == (1, mel.TEXT_LEN) and ids[0, 0] == mel.TEXT_ID["<cls>"]
    with pytest.raises(ValueError, match="TEXT_VOCAB"):
        mel.encode_prompts(["a banjo song"])
    with pytest.raises(ValueError, match="attrs must give"):
        mel.render_accompaniment(dict(attrs, instrument="banjo"))
    with pytest.raises(ValueError, match="singer must be 0 or 1"):
        mel.synth_vocal([dict(midi=60, onset=0.0, dur=1.0, syllable="la")], singer=3)


def test_make_songs_balanced():
    ds, audio = mel.make_songs(50, seed=1, balanced=True)
    assert len(ds) == 50 and set(audio) == {"vocal", "accomp", "mix"}
    assert len({tuple(ds[i][k] for k in mel.ATTRIBUTES) for i in range(48)}) == 48   # one of each combination
    assert json.loads(ds[0]["score"])[0]["syllable"] == ds[0]["lyrics"].split()[0]
    m = mel.log_mel(audio["mix"][:3])
    assert m.shape == (3, mel.N_MELS, mel.MEL_FRAMES)


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    c = mel.MelCodec(n_q=3, codebook_size=16)
    x = torch.from_numpy(mel.log_mel(np.random.default_rng(0).normal(0, 0.1, (6, int(mel.SR * mel.CLIP_S))).astype(np.float32)))
    mel.train_codec(c, x, steps=2, batch=4)
    return c, x


def test_codec_round_trip_and_search(codec):
    c, x = codec
    codes = c.encode(x)
    assert codes.shape == (6, mel.TOKEN_FRAMES, 3) and codes.dtype == torch.long
    assert c.decode(codes).shape == x.shape
    torch.testing.assert_close(c.decode(codes), c(x)[0], atol=1e-4, rtol=1e-4)
    z = c.encode_latent(x).reshape(-1, 32).detach()
    r, ref = z.clone(), []
    for cb in c.rvq.codebooks:                                     # greedy residual search by hand
        k = ((r[:, None] - cb[None]) ** 2).sum(-1).argmin(1)
        ref.append(k); r = r - cb[k]
    assert (torch.stack(ref, 1) == codes.reshape(-1, 3)).float().mean() > 0.99
    # the tokeniser (rvq_search on the layer's codebooks) gives the ResidualVQ layer's own indices
    own = c.rvq_codes(x)
    assert own.shape == codes.shape and (own == codes).float().mean() > 0.99
    assert torch.equal(c.encode(x, backend="torch"), codes)
    assert 0 <= mel.codec_error(c, x) < 10
    with pytest.raises(ValueError, match="multiple of 2"):
        c.encode(x[..., :99])
    with pytest.raises(ValueError, match="codes must lie in"):
        c.decode(torch.full((1, 4, 3), 16))
    with pytest.raises(ValueError, match="codes must be"):
        c.decode(torch.zeros(1, 4, 2, dtype=torch.long))


def test_info_nce_hand_case():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    rows = -math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.exp(0.8) / (1 + math.exp(0.8)))
    cols = -math.log(math.e / (math.e + 1)) - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))
    assert math.isclose(mel.info_nce(a, b, torch.tensor(0.0)).item(), (rows + cols) / 4, rel_tol=1e-6)
    # a larger scale on perfectly aligned pairs drives the loss to 0; swapped pairs to a large value
    eye = torch.eye(4)
    assert mel.info_nce(eye, eye, math.log(100)).item() < 1e-3
    assert mel.info_nce(eye, eye.flip(0), math.log(100)).item() > 10
    with pytest.raises(ValueError, match="of one shape"):
        mel.info_nce(a, b[:1], 0.0)


@pytest.mark.parametrize("kind", ["tri", "dual"])
def test_towers_train_step(kind):
    torch.manual_seed(0)
    tw = mel.Towers(kind)
    ids = mel.encode_prompts([mel.make_prompt({k: v[i % len(v)] for k, v in mel.ATTRIBUTES.items()}, np.random.default_rng(i))
                              for i in range(4)])
    mels = {k: torch.randn(4, mel.N_MELS, mel.MEL_FRAMES) for k in ("vocal", "accomp", "mix")}
    losses = mel.train_towers(tw, ids, mels, steps=2, batch=4)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert tw.text(ids).shape == (4, 64)
    with pytest.raises(ValueError, match="'tri' or 'dual'"):
        mel.Towers("clap")


def test_attribute_classifier():
    ds, audio = mel.make_songs(48, seed=2, balanced=True)
    clf = mel.AttributeClassifier(["instrument", "tempo"]).fit(mel.log_mel(audio["accomp"]), ds[:])
    pred = clf.predict(mel.log_mel(audio["accomp"][:6]))
    assert set(pred) == {"instrument", "tempo"} and len(pred["tempo"]) == 6
    assert np.mean(pred["instrument"] == np.array(ds["instrument"][:6])) == 1.0      # its own training clips
    with pytest.raises(ValueError, match="logmel must be"):
        mel.clip_features(torch.zeros(2, 10, 8))


@pytest.fixture(scope="module")
def mst():
    torch.manual_seed(0)
    return mel.MultiScaleTransformer(n_q=3, codebook_size=16, cond_dim=8, prefix_dim=5, d_model=32, max_frames=12).eval()


@pytest.mark.parametrize("T", [1, 7, 12])
def test_mst_shapes(mst, T):
    codes, cond, pre = torch.randint(0, 16, (2, T, 3)), torch.randn(2, T, 8), torch.randn(2, 5)
    assert mst.logits(codes, cond, pre).shape == (2, T, 3, 16)
    out = mst.generate(cond, pre)
    assert out.shape == (2, T, 3) and out.min() >= 0 and out.max() < 16
    g = torch.Generator().manual_seed(0)
    assert mst.generate(cond, pre, temperature=1.0, gen=g).shape == (2, T, 3)


def test_mst_causality(mst):
    codes, cond, pre = torch.randint(0, 16, (2, 10, 3)), torch.randn(2, 10, 8), torch.randn(2, 5)
    base = mst.logits(codes, cond, pre)
    for t, q in [(0, 0), (4, 1), (9, 2)]:
        c2 = codes.clone(); c2[:, t, q] = (c2[:, t, q] + 1) % 16
        d = (mst.logits(c2, cond, pre) - base).abs().amax(-1)
        assert d[:, t, : q + 1].max() == 0 and (t == 0 or d[:, :t].max() == 0)   # nothing before (t, q) sees code (t, q)
        if q < 2:
            assert d[:, t, q + 1:].min() > 0
        if t < 9:
            assert d[:, t + 1:].max() > 0
    # greedy generation equals the argmax of teacher-forced logits on its own output
    out = mst.generate(cond, pre)
    assert torch.equal(mst.logits(out, cond, pre).argmax(-1), out)


def test_mst_bad_inputs(mst):
    codes, cond, pre = torch.randint(0, 16, (2, 5, 3)), torch.randn(2, 5, 8), torch.randn(2, 5)
    with pytest.raises(ValueError, match="prefix must be given"):
        mst.logits(codes, cond)
    with pytest.raises(ValueError, match="codes must be int64"):
        mst.logits(codes.float(), cond, pre)
    with pytest.raises(ValueError, match="cond must be"):
        mst.logits(codes, cond[:, :4], pre)


def test_stages_train_step():
    torch.manual_seed(0)
    K, C, d = 2, 8, 32
    codes_v, codes_a = torch.randint(0, C, (4, 6, K)), torch.randint(0, C, (4, 6, K))
    frames = torch.from_numpy(np.stack([mel.score_frames(mel.random_score(dict(tempo="fast", mode="major", tonic="C"),
                                                                          np.random.default_rng(i)), frames=6) for i in range(4)]))
    svs = mel.Stage(mel.ScoreEncoder(d), K, C, d, d_model=d, max_frames=6)
    v2a = mel.Stage(mel.VocalEncoder(K, C, d), K, C, d, 5, d_model=d, max_frames=6)
    text = torch.randn(4, 5)
    l1 = mel.train_stage(svs, codes_v, frames, None, steps=3, batch=4)
    l2 = mel.train_stage(v2a, codes_a, codes_v, text, steps=3, batch=4)
    assert len(l1) == len(l2) == 3 and np.isfinite(l1 + l2).all()
    assert svs.generate(frames).shape == (4, 6, K)
    assert v2a.generate(codes_v, text).shape == (4, 6, K)
