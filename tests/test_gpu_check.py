"""scripts/gpu_check.py rehearsed on CPU with the GPU machine's packages (.venv-image: torch 2.11, transformers 5.17;
bash scripts/setup.sh image), mftcoder run from the checkout as there, and no network (a network namespace of its own
where the machine allows one): the table, the packed == unpacked checks, the exit status."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PYTHON = ROOT / ".venv-image" / "bin" / "python"


def without_network(command: list[str]) -> tuple[list[str], bool]:
    """The command in a network namespace with only loopback, where unshare works here (root, or user namespaces)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return command, False
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return command, False
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command], True


def test_gpu_check_rehearsal_with_the_gpu_machines_packages_offline(tmp_path):
    if not IMAGE_PYTHON.exists():
        message = "no .venv-image (bash scripts/setup.sh image)"
        if os.environ.get("MFTCODER_REQUIRE_IMAGE_ENV") == "1":
            pytest.fail(message)
        pytest.skip(message)
    command, isolated = without_network([str(IMAGE_PYTHON), str(ROOT / "scripts" / "gpu_check.py"), "--cpu",
                                         "--only", "sdpa", "--out", str(tmp_path / "out")])  # (no eager row: time)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                               env={**env, "TMPDIR": str(tmp_path)}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its ranks too
        raise
    assert process.returncode == 0, output[-6000:]
    assert re.search(r"torch 2\.11\.\d\+\w+, transformers 5\.17\.0", output), output[:2000]
    table = (tmp_path / "out" / "table.txt").read_text()
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = [line.split() for line in lines[header + 2:header + 5]]
    assert [tuple(r[1:5]) for r in rows] == [("full", "sdpa", "dynamic", "fsdp"), ("full", "sdpa", "pack", "fsdp"),
                                             ("lora", "sdpa", "pack", "fsdp")], table
    assert all(r[0] == "tiny-test" and r[-1] == "PASS" and float(r[5].replace(",", "")) > 0 for r in rows)
    losses = [float(r[8]) for r in rows]
    assert max(losses) - min(losses) <= 1e-4 and 10 < losses[0] < 11.5  # packed == unpacked at step 0, ~ln(vocab)
    assert re.search(r"^gpu_check: PASS;", table, re.M)
    assert not list((tmp_path / "out").glob("**/checkpoint-*"))  # the work folder (checkpoints) is gone
    if not isolated:  # the script sets HF_HUB_OFFLINE and downloads nothing; the namespace proves it where allowed
        warnings.warn("gpu_check rehearsal ran with the network reachable: unshare --net is not allowed here")
