import json
import random
import time

import numpy as np
import pytest
import torch

from tinylab.core import (FAILS, HOLDS, INCONCLUSIVE, SCALES, THIS_RUN, ClaimTable, benchmark, cuda_graph_ms, decide,
                          device_name, fit_exponent, get_device, paired_bootstrap, pick_scale, recorded, seed_everything,
                          seed_interval)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_seed_everything_repeats_and_differs():
    seed_everything(3); a = draws()
    seed_everything(3); b = draws()
    seed_everything(4); c = draws()
    assert a == b and a != c
    g1, g2 = seed_everything(5), seed_everything(5)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_everything_rejects_bad_seed(bad):
    with pytest.raises(TypeError, match="seed"):
        seed_everything(bad)


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(device_name("cpu"), str) and device_name("cpu")


@pytest.mark.parametrize("bad,exc", [("tpu", ValueError), ("meta", ValueError), (0, TypeError), (None, TypeError)])
def test_get_device_rejects_unknown(bad, exc):
    with pytest.raises(exc, match="device"):
        get_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_get_device_cuda_without_gpu():
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")


PRESETS = {s: dict(steps=i + 1, width=8 * (i + 1)) for i, s in enumerate(SCALES)}


def test_pick_scale():
    cfg = pick_scale(PRESETS, "book")
    assert (cfg.scale, cfg.steps, cfg.width) == ("book", 2, 16)


@pytest.mark.parametrize("presets,scale,match", [
    (PRESETS, "huge", "scale must be one of"),
    (PRESETS, None, "scale must be one of"),
    ({"ci": {}, "book": {}}, "ci", "no settings"),
    ({**PRESETS, "gpu": dict(steps=3)}, "ci", "'gpu'"),
])
def test_pick_scale_errors(presets, scale, match):
    with pytest.raises(ValueError, match=match):
        pick_scale(presets, scale)


def test_benchmark_ratio_and_metadata():
    df = benchmark({"slow": lambda: time.sleep(0.012), "fast": lambda: time.sleep(0.003)}, warmup=1, repeats=5)
    assert df.loc["slow", "speedup"] == 1.0
    assert 2.0 < df.loc["fast", "speedup"] < 4.5
    assert df.attrs["baseline"] == "slow" and df.attrs["device"] and df.attrs["repeats"] == 5


def test_benchmark_named_baseline():
    df = benchmark({"a": lambda: time.sleep(0.002), "b": lambda: time.sleep(0.008)}, baseline="b", warmup=0, repeats=3)
    assert df.loc["b", "speedup"] == 1.0 and df.loc["a", "speedup"] > 1.5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(fns={}), ValueError, "at least one"),
    (dict(fns={"a": 1}), TypeError, "callable"),
    (dict(fns={"a": lambda: None}, baseline="b"), ValueError, "baseline"),
    (dict(fns={"a": lambda: None}, repeats=0), ValueError, "repeats"),
])
def test_benchmark_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        benchmark(**kwargs)


def test_claim_table_roundtrip(tmp_path):
    t = ClaimTable("demo", "ci", device="test-device")
    t.add("a", "1.0", "1.1", True).add("b", "2", "3", np.bool_(False)).add("c", "4", "5", INCONCLUSIVE)
    t.check("kernel matches reference", "max err 1e-7", "< 1e-4", True)
    assert list(t.to_frame()["outcome"]) == [HOLDS, FAILS, INCONCLUSIVE]
    assert list(t.checks_frame()["passed"]) == ["yes"]
    assert "demo" in t._repr_html_() and "Implementation checks" in t._repr_html_() and "test-device" in str(t)
    path = tmp_path / "sub" / "r.json"
    rec = t.save(path, losses=np.array([1.0, 0.5]), best=torch.tensor(0.5), n=np.int64(3))
    on_disk = json.loads(path.read_text())
    assert on_disk["claims"] == rec["claims"] and on_disk["claims"][1]["outcome"] == FAILS
    assert on_disk["checks"][0] == {"check": "kernel matches reference", "measured": "max err 1e-7",
                                    "criterion": "< 1e-4", "passed": True, "source": THIS_RUN}
    assert on_disk["metrics"] == {"losses": [1.0, 0.5], "best": 0.5, "n": 3}
    assert t.save(None)["chapter"] == "demo"


@pytest.mark.parametrize("outcome", ["yes", None, 1, "hold"])
def test_claim_table_rejects_unknown_outcome(outcome):
    with pytest.raises(TypeError, match="outcome"):
        ClaimTable("demo", "ci", device="x").add("a", "1", "2", outcome)


def test_check_rejects_non_bool():
    with pytest.raises(TypeError, match="passed"):
        ClaimTable("demo", "ci", device="x").check("a", "1", "2", "yes")


def test_sources_and_counts(tmp_path):
    rec = tmp_path / "x_h200.json"
    rec.write_text(json.dumps({"device": "NVIDIA H200", "date": "2026-11-29T10:00:00+00:00"}))
    src = recorded(rec)
    assert src == "recorded: x_h200.json, NVIDIA H200, 2026-11-29"
    t = ClaimTable("demo", "ci", device="x").add("a", "1", "2", True).add("b", "1", "2", False, source=src)
    counts = t.counts()
    assert counts.loc[THIS_RUN, HOLDS] == 1 and counts.loc[src, FAILS] == 1 and counts.loc[src, INCONCLUSIVE] == 0
    with pytest.raises(ValueError, match="source"):
        t.add("c", "1", "2", True, source="an H100")
    rec.write_text("{}")
    with pytest.raises(ValueError, match="device and date"):
        recorded(rec)


def test_decide_can_say_each_outcome():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 500)
    b = a - 0.2 + rng.normal(0, 0.1, 500)
    assert decide(paired_bootstrap(a, b)) == HOLDS
    assert decide(paired_bootstrap(b, a)) == FAILS
    assert decide(paired_bootstrap(b, a), margin=0.5) == HOLDS  # at least as good, within 0.5
    assert decide(paired_bootstrap(np.array([1.0, -1.0, 2.0, -1.5]), np.zeros(4))) == INCONCLUSIVE
    with pytest.raises(ValueError, match="margin"):
        decide(paired_bootstrap(a, b), margin=-1)


def test_paired_bootstrap_is_repeatable_and_covers_the_mean():
    d = np.arange(20.0)
    iv = paired_bootstrap(d, np.zeros(20), n_boot=2500, seed=1)
    assert iv == paired_bootstrap(d, np.zeros(20), n_boot=2500, seed=1)
    assert iv.low < 9.5 < iv.high and iv.estimate == 9.5 and "20 items" in iv.method
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap(np.zeros((2, 2)), np.zeros((2, 2)))


def test_seed_interval_needs_three_seeds():
    assert decide(seed_interval([0.9, 0.95], [0.1, 0.1])) == INCONCLUSIVE
    assert "fewer than 3" in str(seed_interval([1.0], [0.0]))
    iv = seed_interval([0.91, 0.90, 0.92], [0.80, 0.81, 0.79])
    assert decide(iv) == HOLDS and abs(iv.estimate - 0.11) < 1e-12


def test_fit_exponent():
    x = np.array([16, 32, 64, 128, 256])
    assert abs(fit_exponent(x, 5 * x**1.5).estimate - 1.5) < 1e-9
    noisy = fit_exponent(x, x * np.exp(np.random.default_rng(0).normal(0, 0.3, 5)))
    assert noisy.low < 1 < noisy.high
    assert np.isinf(fit_exponent(x[:2], x[:2] ** 2).low)  # two points: no interval
    with pytest.raises(ValueError, match="positive"):
        fit_exponent(x, -x)


def test_cuda_graph_ms_needs_a_gpu_and_sane_counts():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            cuda_graph_ms(lambda: None)
        return
    with pytest.raises(ValueError, match="calls and warmup"):
        cuda_graph_ms(lambda: None, calls=0)
    x = torch.zeros(1024, device="cuda")
    assert cuda_graph_ms(lambda: x.add_(1), calls=4) > 0
