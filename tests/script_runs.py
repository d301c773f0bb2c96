"""Run a GPU script of benchmarks/ on its CPU --smoke path as the tests do: a subprocess from the repo root with the
package on its path, offline, one thread, `datasets` replaced by the scripts' stand-in (as on the GPU image) and a
fixed commit; a failure shows the tail of the script's output."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "TINYLAB_FAKE_DATASETS": "1", "TINYLAB_COMMIT": "abc123"}


def run_script(script: Path, *args, env: dict | None = None, timeout: int = 300) -> str:
    "Run `script` with `args` (any values, passed as strings); returns its stdout, failing the test if it fails."
    res = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                         env=SCRIPT_ENV if env is None else env, cwd=ROOT, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout
