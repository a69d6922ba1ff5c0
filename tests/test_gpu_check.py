"""scripts/gpu_check.sh: its shell parses, and its CPU fallback (the tiny model under torchrun with 2 processes,
FSDP2 on gloo, sdpa and eager, packed vs unpacked step-0 validation loss) runs end to end with this venv."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_cpu_fallback_end_to_end(tmp_path):
    env = {**os.environ, "MFTCODER_SKIP_SETUP": "1", "MFTCODER_PYTHON": sys.executable,
           "GPU_CHECK_WORKDIR": str(tmp_path / "work"), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(["bash", str(SCRIPT), "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its ranks too
        raise
    assert process.returncode == 0, output[-6000:]
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model ") and "tokens/s" in line)
    rows = [line.split() for line in lines[header + 2:header + 5]]
    assert [(r[2], r[3], r[4]) for r in rows] == [("sdpa", "dynamic", "fsdp"), ("sdpa", "pack", "fsdp"),
                                                  ("eager", "pack", "fsdp")], output[-3000:]
    assert all(r[0] == "tiny-test" and r[-1] == "PASS" and float(r[6].replace(",", "")) > 0 for r in rows)
    losses = [float(r[9]) for r in rows]
    assert max(losses) - min(losses) <= 1e-4
    assert "packed == unpacked (step-0 validation loss, tolerance 0.0001): passed" in output
    assert re.search(r"^gpu_check: PASS$", output, re.M)
    assert not (tmp_path / "work" / "runs" / "tiny-test-pack-sdpa" / "checkpoint-3").exists()  # checkpoints go
