"""The reference's launchers: argument checks, and short real runs that leave checkpoints and TensorBoard files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mftcoder.config import load_config
from mftcoder.train.loop import train
from test_atorch import needs_atorch

ROOT = Path(__file__).resolve().parents[1]
FAST = ("model_config=tiny-test seq_length=64 max_steps=2 evaluation_steps=2 checkpointing_steps=2 "
        "num_warmup_steps=0 checkpoint_activations=false valid_iters=1 log_interval=1")


def launch(script: str, args: list[str], tmp_path: Path, extra: str = "",
           **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUTPUT_DIR": str(tmp_path / "out"), "PYTHON": sys.executable,
           "MFTCODER_ARGS": f"{FAST} data_cache_dir={tmp_path / 'cache'} {extra}", **variables}
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_tp_other_than_one_is_refused(tmp_path):
    done = launch("run_gpt_mft.sh", ["2", "2", "1", "1"], tmp_path)
    assert done.returncode == 2 and "TP must be 1" in done.stderr
    done = launch("run_gpt_mft.sh", ["2", "1"], tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr


def saved_run(out: Path, step: int) -> tuple[dict, list[float]]:
    """The config a launcher's run resolved to (as its checkpoint records it) and its logged training losses."""
    config = json.loads((out / f"checkpoint-{step}" / "resume" / "config.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return config, [r["loss"] for r in records if r["split"] == "train"]


def in_process(tmp_path: Path, name: str, overrides: list[str]):
    """The same run started in this process from the reference config, for comparison."""
    config, _ = load_config(ROOT / "configs" / "reference_gpt_mft.yaml",
                            [*FAST.split(), f"data_cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / name}",
                             *overrides])
    return train(config)


def test_full_launcher_single_process(tmp_path):
    done = launch("run_gpt_mft.sh", ["2", "1", "1", "1"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert "final checkpoint:" in (out / "master-0-output.txt").read_text()
    config, losses = saved_run(out, 2)
    demo = [str(ROOT / "mftcoder" / "assets" / "demo_data" / t) for t in ("code_generation", "code_docstring",
                                                                            "code_multiturn")]
    assert (config["per_device_train_batch_size"], config["per_device_valid_batch_size"], config["tp"], config["dp"],
            config["num_train_epochs"], config["peft_type"], config["data_paths"]) == (2, 2, 1, 1, 1, None, demo)
    assert (config["padding_mode"], config["checkpoint_activations"], config["weighted_loss_mode"]) == \
        ("padding", False, "case3")  # the reference config, then the test's overrides
    # The launcher's run is the run its arguments describe: the same losses and weights as started directly.
    direct = in_process(tmp_path, "direct", ["per_device_train_batch_size=2", "per_device_valid_batch_size=2",
                                             "num_train_epochs=1", f"data_paths=[{','.join(demo)}]"])
    assert losses == pytest.approx(direct.step_losses, rel=1e-6) and len(losses) == 2
    mine, theirs = load_file(out / "checkpoint-2" / "model.safetensors"), load_file(direct.final_checkpoint / "model.safetensors")
    assert all(torch.allclose(mine[k], theirs[k], rtol=1e-5, atol=1e-7) for k in theirs)


def test_lora_launcher_with_two_processes(tmp_path):
    # (no dropout: each process draws its own masks; adam_epsilon: see test_distributed)
    done = launch("run_gpt_mft_peft.sh", ["2", "1", "2", "1"], tmp_path, extra="adam_epsilon=1e-5 lora_dropout=0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert done.stdout.count("final checkpoint:") == 1
    config, losses = saved_run(out, 2)
    assert (config["per_device_train_batch_size"], config["dp"], config["peft_type"], config["learning_rate"],
            config["min_lr"]) == (2, 2, "lora", 2e-4, 2e-5)
    # 2 processes x 2 samples train like 1 process x 4 (the same global batches).
    direct = in_process(tmp_path, "direct", ["per_device_train_batch_size=4", "per_device_valid_batch_size=2",
                                             "num_train_epochs=1", "peft_type=lora", "learning_rate=2e-4",
                                             "min_lr=2e-5", "adam_epsilon=1e-5", "lora_dropout=0", f"data_paths={config['data_paths']}"])
    assert losses == pytest.approx(direct.step_losses, rel=1e-5) and len(losses) == 2



@needs_atorch
def test_engine_atorch_reaches_the_run(tmp_path):
    # ENGINE and ATORCH_STRATEGY as the reference's launchers take them; the checkpoint records what ran.
    done = launch("run_gpt_mft.sh", ["2", "1", "2", "1"], tmp_path, ENGINE="atorch",
                  ATORCH_STRATEGY="[parallel_mode, zero1]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[1] zero1" in (tmp_path / "out" / "master-0-output.txt").read_text()  # ATorch's own strategy log
    config, losses = saved_run(tmp_path / "out", 2)
    assert (config["distributed_strategy"], config["atorch_strategy"], config["dp"]) == \
        ("atorch", ["parallel_mode", "zero1"], 2)
    assert len(losses) == 2
