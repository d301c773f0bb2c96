import json
import random
import time

import numpy as np
import pytest
import torch

from tinylab.core import SCALES, ClaimTable, benchmark, device_name, get_device, pick_scale, seed_everything


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
    t.add("a", "1.0", "1.1", True).add("b", "2", "3", np.bool_(False))
    assert list(t.to_frame()["holds"]) == ["yes", "no"]
    assert "demo" in t._repr_html_() and "test-device" in str(t)
    path = tmp_path / "sub" / "r.json"
    rec = t.save(path, losses=np.array([1.0, 0.5]), best=torch.tensor(0.5), n=np.int64(3))
    on_disk = json.loads(path.read_text())
    assert on_disk["claims"] == rec["claims"] and on_disk["claims"][1]["holds"] is False
    assert on_disk["metrics"] == {"losses": [1.0, 0.5], "best": 0.5, "n": 3}
    assert t.save(None)["chapter"] == "demo"


def test_claim_table_rejects_non_bool():
    with pytest.raises(TypeError, match="holds"):
        ClaimTable("demo", "ci", device="x").add("a", "1", "2", "yes")
