"""Shared test set-up: nothing is downloaded, and Triton kernels run in its interpreter when there is no GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def poison_empty(monkeypatch):
    """Make `torch.empty` and `torch.empty_like` return NaN-filled floating tensors (as fla's tests do), so
    an output element a kernel forgets to write fails the comparison instead of passing by luck.
    Use it in kernel tests: `def test_kernel(poison_empty): ...`."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() or t.is_complex() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny models on one CPU thread, restored afterwards: for tensors this small a second
    thread only adds synchronisation, and on a shared machine it is far slower. Use it per module:
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Hypothesis profiles for tests/test_fuzz.py: "ci" is derandomised (the same examples every run) and small enough
# for CI's budget; "long" is for a search by hand: HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a GPU machine without it runs the other tests
    settings = None
if settings is not None:
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=quiet)
    settings.register_profile("long", max_examples=300, deadline=None, print_blob=True, suppress_health_check=quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
