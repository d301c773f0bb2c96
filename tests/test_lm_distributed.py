"""tinylab.lm.train_lm runs unchanged as several processes (DDP through Accelerate; gloo on CPUs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def test_train_lm_two_processes(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["num_processes"] == 2
    assert record["tokens"] == 20 * 4 * 16 * 2  # steps x per-process batch x block x processes
    assert record["eval_loss"][-1] < record["eval_loss"][0] - 1.0
