"""The tests' access to the GPU scripts of benchmarks/: run one on its CPU --smoke path (a subprocess from the repo root
with the package on its path, offline, one thread, `datasets` replaced by the scripts' stand-in as on the GPU image,
and a fixed commit; a failure shows the tail of the script's output; skipped, saying why, where Triton's interpreter
cannot run a loop), load one as a module, and read the PRESETS table of the chapter a script must agree with."""
import functools
import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "TINYLAB_FAKE_DATASETS": "1", "TINYLAB_COMMIT": "abc123"}
INTERPRET_ENV = {**SCRIPT_ENV, "TRITON_INTERPRET": "1"}   # the same, with Triton kernels in the interpreter


# a kernel with a loop whose bound is an argument: Triton 3.6's interpreter cannot run it with NumPy 2.4 (its range()
# gets a one-element array, which NumPy no longer turns into an int); Triton 3.9's can
LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count(O, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(O, acc)
o = torch.zeros(1, dtype=torch.int32)
count[(1,)](o, 3)
assert o.item() == 3, o
"""


@functools.cache
def interpreter_fault() -> str | None:
    "Why Triton's interpreter cannot run a loop on this machine (the last line of the probe's error), or None if it can."
    res = subprocess.run([sys.executable, "-c", LOOP_PROBE], capture_output=True, text=True, env=INTERPRET_ENV, timeout=300)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["no output"])[-1]


def run_script(script: Path, *args, env: dict | None = None, timeout: int = 300) -> str:
    """Run `script` with `args` (any values, passed as strings); returns its stdout, failing the test if it fails.
    With TRITON_INTERPRET=1 in `env`, skipped where the interpreter cannot run a loop (`interpreter_fault`)."""
    if env is not None and env.get("TRITON_INTERPRET") == "1" and (fault := interpreter_fault()):
        pytest.skip(f"Triton {version('triton')}'s interpreter cannot run a loop here (NumPy {version('numpy')}): {fault}")
    res = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                         env=SCRIPT_ENV if env is None else env, cwd=ROOT, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def load_script(script: Path):
    "A benchmarks/ script as a module (its `__main__` part not run), able to import its sibling scripts."
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"{script.stem}_under_test", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(script.parent))
    return mod


def chapter_presets(notebook: str, **names) -> dict:
    "A chapter's PRESETS table: its `PRESETS = {` cell up to `cfg = pick_scale`, run with `names` in scope."
    import nbformat  # here, not at the top: the GPU image has no nbformat, and its kernel tests import this module
    nb = nbformat.read(ROOT / "nbs" / notebook, as_version=4)
    src = next(c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("PRESETS = {"))
    ns = dict(names)
    exec(src.split("cfg = pick_scale")[0], ns)
    return ns["PRESETS"]
