"""bench/gpu.py, the script a lent GPU runs once, at the tiny shapes on this CPU: every case runs
and reports a row."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_case_at_tiny_shapes():
    env = {**os.environ, "FOT_PEAK_FLOPS": "1e11"}  # skip measuring the CPU's matmul peak
    out = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--steps", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for case in ("100m", "3b-shaped", "3b-shaped+cudnn"):
        row = re.search(rf"^\| {re.escape(case)} \| (.*)$", out.stdout, re.M)
        assert row, (case, out.stdout)
        assert "n/a" in row.group(1) or re.search(r"\d+\.\d%", row.group(1)), row.group(1)
    assert re.search(r"read: 2048 tokens into memory in [\d.]+ s", out.stdout)
