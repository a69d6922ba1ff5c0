"""The reference's launchers: argument checks, and short real runs that leave checkpoints and TensorBoard files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ("model_config=tiny-test seq_length=64 max_steps=2 evaluation_steps=2 checkpointing_steps=2 "
        "num_warmup_steps=0 checkpoint_activations=false valid_iters=1")


def launch(script: str, args: list[str], tmp_path: Path, extra: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OUTPUT_DIR": str(tmp_path / "out"), "PYTHON": sys.executable,
           "MFTCODER_ARGS": f"{FAST} data_cache_dir={tmp_path / 'cache'} {extra}"}
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_tp_other_than_one_is_refused(tmp_path):
    done = launch("run_gpt_mft.sh", ["2", "2", "1", "1"], tmp_path)
    assert done.returncode == 2 and "TP must be 1" in done.stderr
    done = launch("run_gpt_mft.sh", ["2", "1"], tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_full_launcher_single_process(tmp_path):
    done = launch("run_gpt_mft.sh", ["2", "1", "1", "1"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert "final checkpoint:" in (out / "master-0-output.txt").read_text()


def test_lora_launcher_with_two_processes(tmp_path):
    done = launch("run_gpt_mft_peft.sh", ["2", "1", "2", "1"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert done.stdout.count("final checkpoint:") == 1
