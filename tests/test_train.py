"""`mftcoder train` end to end on the tiny model: checkpoints, resume, retention, early stopping, logs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mftcoder.config import ConfigError, build_config
from mftcoder.train import checkpoint as ckpt
from mftcoder.train.loop import Trainer, TrainingError, train
from mftcoder.train.distributed import DistEnv


def make_config(small_tasks, output_dir, **overrides):
    values = {**small_tasks, "model_config": "tiny-test", "output_dir": str(output_dir), "seq_length": 96,
              "per_device_train_batch_size": 2, "learning_rate": 2e-3, "max_steps": 6, "log_interval": 1,
              "evaluation_steps": 2, "checkpointing_steps": 2, "data_split": "80,20,0", "num_warmup_steps": 1,
              "evaluate_before_training": False, "per_device_valid_batch_size": 6, "plot_curves": False,
              **overrides}
    return build_config(values)[0]


def weights_of(checkpoint):
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_reproduces_the_uninterrupted_run(small_tasks, tmp_path, lora):
    extra = {"peft_type": "lora", "lora_dropout": 0.1, "learning_rate": 1e-2} if lora else {}
    extra.update(gradient_accumulation_steps=2, checkpointing_steps=3, evaluation_steps=3)
    full = train(make_config(small_tasks, tmp_path / "full", **extra))
    assert len(full.step_losses) == 6
    # A run that stopped after step 3 leaves exactly checkpoint-3; resume it elsewhere.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(make_config(small_tasks, tmp_path / "resumed", resume_from_checkpoint="auto", **extra))
    assert resumed.step_losses == full.step_losses[3:]  # bitwise: same floats
    final_full, final_resumed = weights_of(full.final_checkpoint), weights_of(resumed.final_checkpoint)
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert resumed.state.step == 6 and resumed.state.best_checkpoint == full.state.best_checkpoint
    if lora:
        assert (full.final_checkpoint / "adapter_config.json").exists()
        assert not (full.final_checkpoint / "model.safetensors").exists()


def test_full_checkpoint_is_a_loadable_hf_model_with_the_chat_template(small_tasks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(make_config(small_tasks, tmp_path, max_steps=2))
    path = result.final_checkpoint
    assert path.name == "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template.startswith("{%- for message in messages")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|padding|>")
    assert model.config.pad_token_id == 1 and model.config.eos_token_id == 0
    saved = load_file(path / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    assert (path / "resume" / "optimizer.pt").exists() and (path / ckpt.STATE_FILE).exists()


def test_retention_keeps_best_and_newest_and_survives_a_restart(small_tasks, tmp_path):
    # greater_is_better on a falling loss makes the first checkpoint the best: best != newest.
    common = dict(evaluation_steps=1, checkpointing_steps=1, save_total_limit=2, greater_is_better=True,
                  extra_save_by_epoch=True, max_steps=-1, num_train_epochs=1, padding_mode="dynamic")
    first = train(make_config(small_tasks, tmp_path, **common, per_device_train_batch_size=12))
    steps = first.state.step
    assert steps == 4  # 48 training samples / 12
    evals = {e["step"]: e["loss"] for e in first.evaluations}
    assert first.state.best_checkpoint == f"checkpoint-{max(evals, key=evals.get)}" == "checkpoint-1"
    survivors = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert survivors == ["checkpoint-1", "checkpoint-4", "checkpoint-epoch-1"]
    # Restart with a second epoch: the best is remembered from trainer_state.json.
    second = train(make_config(small_tasks, tmp_path, **{**common, "num_train_epochs": 2}, per_device_train_batch_size=12,
                               resume_from_checkpoint="auto"))
    assert second.state.step == 8
    survivors = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert survivors == ["checkpoint-1", "checkpoint-8", "checkpoint-epoch-1", "checkpoint-epoch-2"]


def test_retention_unit(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text(ckpt.TrainerState(step=step).to_json())
    (tmp_path / "checkpoint-epoch-1").mkdir()
    assert ckpt.apply_retention(tmp_path, 3, "checkpoint-2") == ["checkpoint-3", "checkpoint-1"]
    assert ckpt.apply_retention(tmp_path, 1, "checkpoint-2") == ["checkpoint-4"]  # best and newest both stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-5", "checkpoint-epoch-1"]


def test_early_stopping_after_exactly_patience_evaluations(small_tasks, tmp_path):
    # With greater_is_better on a falling loss, every evaluation after the first fails to improve.
    result = train(make_config(small_tasks, tmp_path, evaluation_steps=1, early_stopping_patience=2,
                               greater_is_better=True, max_steps=20, evaluate_before_training=True))
    recorded = [e for e in result.evaluations if e["step"] > 0]
    assert [e["step"] for e in recorded] == [1, 2, 3]
    assert result.state.step == 3 and result.state.evals_without_improvement == 2
    assert result.final_checkpoint.name == "checkpoint-3"


class Killed(BaseException):
    """Stands for the process dying mid-save: nothing of mftcoder's own runs after it (no cleanup)."""


def test_a_killed_save_leaves_nothing_resume_would_pick(small_tasks, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ckpt.write_resume_state

    def crash_on_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_resume_state", crash_on_second_save)
    with pytest.raises(Killed):
        train(make_config(small_tasks, tmp_path))
    assert (tmp_path / ".checkpoint-4.tmp" / "model.safetensors").exists()  # half-written
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint-2"
    monkeypatch.setattr(ckpt, "write_resume_state", original)
    result = train(make_config(small_tasks, tmp_path, resume_from_checkpoint="auto"))
    assert result.state.step == 6 and len(result.step_losses) == 4
    assert not (tmp_path / ".checkpoint-4.tmp").exists()


def test_tensorboard_and_jsonl_hold_per_task_scalars(small_tasks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_config(small_tasks, tmp_path, max_steps=4, tensorboard_dir=str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    tasks = ["code_docstring", "code_generation", "code_multiturn"]
    for split in ("train", "eval"):
        assert {f"{split}/loss/{t}" for t in tasks} | {f"{split}/loss"} <= tags
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "eval"):
        for key in ["loss"] + [f"loss/{t}" for t in tasks]:
            logged = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            scalars = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
            assert len(logged) == len(scalars) > 0
            assert [s for s, _ in scalars] == [s for s, _ in logged]
            assert [v for _, v in scalars] == pytest.approx([v for _, v in logged])


def test_nonfinite_loss_skips_updates_and_stops(small_tasks, tmp_path):
    trainer = Trainer(make_config(small_tasks, tmp_path, max_nonfinite_steps=2), DistEnv())
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[5, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match="NaN or infinite for 2 steps in a row"):
        trainer.run()
    assert trainer.state.nonfinite_total == 2
    assert trainer.state.step == 1  # a skipped update still counts as a step (data and schedule move on)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_validation_loss_falls_per_task(small_tasks, tmp_path):
    result = train(make_config(small_tasks, tmp_path, evaluate_before_training=True, max_steps=10,
                               evaluation_steps=10, per_device_train_batch_size=4, learning_rate=5e-3))
    start, end = result.evaluations[0], result.evaluations[-1]
    for task in ("code_docstring", "code_generation", "code_multiturn"):
        assert end[f"loss/{task}"] < start[f"loss/{task}"] - 1.0


def test_an_epoch_end_on_an_evaluation_step_evaluates_and_saves_once(small_tasks, tmp_path):
    # 48 training samples / 12 = 4 steps; evaluation every 2 steps and at the epoch end (step 4 is both).
    result = train(make_config(small_tasks, tmp_path, evaluation_strategy="steps,epoch", save_strategy="steps,epoch",
                               evaluation_steps=2, checkpointing_steps=2, per_device_train_batch_size=12,
                               padding_mode="dynamic", max_steps=-1, early_stopping_patience=2,
                               greater_is_better=True))  # a falling loss never improves: patience counts each eval
    assert [e["step"] for e in result.evaluations] == [2, 4]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
    assert result.state.step == 4 and result.state.evals_without_improvement == 1  # not stopped early at 2
    saved = ckpt.TrainerState.from_json((tmp_path / "checkpoint-4" / ckpt.STATE_FILE).read_text())
    assert (saved.step, saved.evals_without_improvement) == (4, 1)


def test_replacing_a_checkpoint_never_leaves_none(small_tasks, tmp_path, monkeypatch):
    train(make_config(small_tasks, tmp_path, max_steps=2))
    first = weights_of(tmp_path / "checkpoint-2")
    renames = []
    original = ckpt.os.rename

    def crash_on_placing_the_replacement(src, dst):
        renames.append(Path(src).name)
        if Path(src).name == ".checkpoint-2.tmp":
            raise OSError("killed (simulated)")
        return original(src, dst)

    trainer = Trainer(make_config(small_tasks, tmp_path, max_steps=2, resume_from_checkpoint="auto"), DistEnv())
    trainer.resume()
    trainer.optimizer.param_groups[0]["params"][0].data.add_(1.0)  # other weights, saved under the same name
    monkeypatch.setattr(ckpt.os, "rename", crash_on_placing_the_replacement)
    with pytest.raises(OSError, match="simulated"):
        trainer.save("checkpoint-2")
    trainer.close()
    monkeypatch.setattr(ckpt.os, "rename", original)
    assert renames == ["checkpoint-2", ".checkpoint-2.tmp"]  # the old one was set aside, not deleted
    ckpt.remove_incomplete(tmp_path)  # what the next run does first: the set-aside checkpoint comes back
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint-2"
    assert all(torch.equal(first[k], v) for k, v in weights_of(tmp_path / "checkpoint-2").items())


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_update(small_tasks, tmp_path):
    trainer = Trainer(make_config(small_tasks, tmp_path, max_steps=3, max_nonfinite_steps=3), DistEnv())
    layer = trainer.model.get_input_embeddings().weight
    layer.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match="the gradient norm was NaN or infinite for 3 steps in a row"):
        trainer.run()
    assert trainer.state.nonfinite_total == 3 and all(math.isfinite(x) for x in trainer.result.evaluations[0].values())
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_resume_on_changed_data_is_refused(small_tasks, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(small_tasks["data_paths"][0]), data / "task")
    values = {"data_paths": [str(data / "task")], "data_cache_dir": str(tmp_path / "cache")}
    train(make_config(values, tmp_path / "out", max_steps=2))
    with open(data / "task" / "train.jsonl", "a") as f:
        f.write((data / "task" / "train.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ConfigError, match=r"the data of task\(s\) task changed since .*checkpoint-2 was written"):
        train(make_config(values, tmp_path / "out", max_steps=4, resume_from_checkpoint="auto"))


def test_an_unknown_best_model_metric_is_refused_before_training(small_tasks, tmp_path):
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'loss/code_generaton' is not a metric of "
                                          r"this run; choose from loss, loss/code_docstring, loss/code_generation"):
        Trainer(make_config(small_tasks, tmp_path, metric_for_best_model="loss/code_generaton"), DistEnv())
    assert not list(tmp_path.glob("checkpoint-*"))


def test_activation_checkpointing_full_fine_tuning_trains_exactly_as_without(small_tasks, tmp_path):
    """Recomputing each layer's activations in backward (full fine-tuning, one process) changes no loss."""
    plain = train(make_config(small_tasks, tmp_path / "plain", max_steps=3, evaluation_strategy="no"))
    recomputed = train(make_config(small_tasks, tmp_path / "ckpt", max_steps=3, evaluation_strategy="no",
                                   checkpoint_activations=True))
    assert recomputed.step_losses == pytest.approx(plain.step_losses, rel=1e-6)
    assert plain.step_losses[-1] < plain.step_losses[0]
    a, b = weights_of(plain.final_checkpoint), weights_of(recomputed.final_checkpoint)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_resume_keeps_the_batch_layout_the_checkpoint_recorded(small_tasks, tmp_path):
    """padding_mode auto is decided at start-up; a resumed run that would decide otherwise (another kernel, dtype or
    device) would see the data in another order, so it follows the checkpoint (or refuses to pack where that leaks)."""
    train(make_config(small_tasks, tmp_path, max_steps=2, evaluation_strategy="no"))
    checkpoint, notes = tmp_path / "checkpoint-2", []
    layout_file = checkpoint / ckpt.RESUME_DIR / "layout.json"
    layout = json.loads(layout_file.read_text())
    assert layout["padding_mode"] == "pack"  # what auto decided for the tiny model
    assert ckpt.resumed_padding_mode(checkpoint, "pack") == "pack"
    with pytest.raises(ConfigError, match="was trained with packed rows, and packing is not safe here"):
        ckpt.resumed_padding_mode(checkpoint, "dynamic")
    layout_file.write_text(json.dumps({**layout, "padding_mode": "dynamic"}))  # as if trained where packing was off
    from mftcoder.train.manifest import write_manifest

    write_manifest(checkpoint)
    assert ckpt.resumed_padding_mode(checkpoint, "pack", notes.append) == "dynamic"
    assert "continuing with 'dynamic' so that the data order stays the same" in notes[0]
    trainer = Trainer(make_config(small_tasks, tmp_path, max_steps=3, resume_from_checkpoint="auto"), DistEnv())
    assert trainer.padding_mode == "dynamic" and trainer.reader.packed is False
    trainer.close()
