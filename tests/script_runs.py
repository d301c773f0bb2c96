"""The tests' access to the GPU scripts of benchmarks/: run one on its CPU --smoke path (a subprocess from the repo root
with the package on its path, offline, one thread, `datasets` replaced by the scripts' stand-in as on the GPU image,
and a fixed commit; a failure shows the tail of the script's output), load one as a module, and read the PRESETS
table of the chapter a script must agree with."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "TINYLAB_FAKE_DATASETS": "1", "TINYLAB_COMMIT": "abc123"}
INTERPRET_ENV = {**SCRIPT_ENV, "TRITON_INTERPRET": "1"}   # the same, with Triton kernels in the interpreter


def run_script(script: Path, *args, env: dict | None = None, timeout: int = 300) -> str:
    "Run `script` with `args` (any values, passed as strings); returns its stdout, failing the test if it fails."
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
