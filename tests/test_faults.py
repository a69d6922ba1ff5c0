"""Faults a run must survive with a one-line message and nothing lost: a full or read-only disk, a damaged
checkpoint, a second run on the same folder, and logs after a resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import Killed, make_config, weights_of

from mftcoder.cli import main
from mftcoder.config import ConfigError
from mftcoder.train import checkpoint as ckpt
from mftcoder.train.distributed import DistEnv
from mftcoder.train.loop import Trainer, train
from mftcoder.train.manifest import MANIFEST, write_manifest
from mftcoder.train.run_folder import RunFolder
from mftcoder.train.stop import REPEAT_AFTER


def cli_args(small_tasks, output_dir, **overrides) -> list[str]:
    """`mftcoder train` arguments for make_config's settings (a tiny model, 6 steps, a checkpoint every 2)."""
    config = make_config(small_tasks, output_dir, **overrides)
    keys = {"data_paths", "data_cache_dir", "output_dir", *overrides}
    keys |= {"model_config", "seq_length", "per_device_train_batch_size", "learning_rate", "max_steps",
             "evaluation_steps", "checkpointing_steps", "data_split", "num_warmup_steps", "evaluate_before_training",
             "per_device_valid_batch_size"}
    return ["train", "/dev/null", *(f"{k}={json.dumps(getattr(config, k))}" for k in sorted(keys))]


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A small RAM disk at `path` (needs root); the test is skipped where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_says_so_removes_the_partial_checkpoint_and_resume_stays_exact(small_tasks, tmp_path, capsys):
    full = train(make_config(small_tasks, tmp_path / "full", max_steps=4))
    one_checkpoint = folder_bytes(tmp_path / "full" / "checkpoint-2")
    with tmpfs(tmp_path / "disk", int(one_checkpoint * 1.5)) as disk:
        out = disk / "run"
        assert main(cli_args(small_tasks, out, max_steps=4)) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = next(row for row in err.replace("\r", "\n").splitlines() if row.startswith("error: "))
        assert line.startswith(f"error: disk full: saving checkpoint-4 in {out} failed with ")
        assert f"the previous checkpoint, checkpoint-2, takes {one_checkpoint / 2**20:.1f} MiB" in line
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no .tmp left
        assert ckpt.checkpoint_problems(out / "checkpoint-2") == []
        remount(disk, f"size={one_checkpoint * 3}")  # space freed
        resumed = train(make_config(small_tasks, out, max_steps=4, resume_from_checkpoint="auto"))
        assert resumed.step_losses == full.step_losses[2:]
        final, expected = weights_of(out / "checkpoint-4"), weights_of(full.final_checkpoint)
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_no_space_reported_by_the_os_is_a_disk_full_error(small_tasks, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC as the OS raises it, from the second save."""
    original, calls = ckpt.write_resume_state, []

    def no_space_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0] / "rng-0.pt"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_resume_state", no_space_on_second_save)
    with pytest.raises(ckpt.CheckpointError, match=r"^disk full: saving checkpoint-4 in .* the previous checkpoint, "
                                                   r"checkpoint-2, takes [0-9.]+ MiB\. The partial checkpoint was removed"):
        train(make_config(small_tasks, tmp_path, max_steps=4))
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


def test_a_read_only_output_folder_is_refused_before_any_work(small_tasks, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        (disk / "run").mkdir()
        remount(disk, "ro")
        for out in (disk / "run", disk / "new" / "run"):  # an existing folder, and one to create
            assert main(cli_args(small_tasks, out)) == 2
            err = capsys.readouterr().err
            assert err.strip() == f"error: output_dir: cannot write to {out}: Read-only file system"


def test_a_second_run_on_a_held_folder_is_refused_and_a_killed_holder_leaves_no_lock(small_tasks, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mftcoder.train.run_folder import "
         "RunFolder; held = RunFolder.claim(Path(sys.argv[1]), True); print('held', flush=True); time.sleep(120)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(cli_args(small_tasks, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: output_dir: {tmp_path} is in use by another run (pid {holder.pid} on ")
        assert err.endswith("; wait for it to end or choose another output_dir")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    RunFolder.claim(tmp_path, True).release()  # the lock died with its process: nothing stale to clear


def test_the_log_holds_each_step_once_after_a_resume(small_tasks, tmp_path, monkeypatch):
    def rows(folder: Path) -> list[tuple]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["split"], r["step"], r["loss"]) for r in records]

    train(make_config(small_tasks, tmp_path / "full", evaluate_before_training=True))
    original = Trainer.after_step

    def killed_after_step_5(self, **kwargs):
        stop = original(self, **kwargs)
        if self.state.step == 5:
            raise Killed()  # steps 5 is logged and evaluated, checkpoint-4 is the newest
        return stop

    monkeypatch.setattr(Trainer, "after_step", killed_after_step_5)
    with pytest.raises(Killed):
        train(make_config(small_tasks, tmp_path / "run", evaluate_before_training=True))
    monkeypatch.setattr(Trainer, "after_step", original)
    assert ("train", 5) in [row[:2] for row in rows(tmp_path / "run")]
    train(make_config(small_tasks, tmp_path / "run", evaluate_before_training=True, resume_from_checkpoint="auto"))
    assert rows(tmp_path / "run") == rows(tmp_path / "full")  # each (split, step) once, with the same losses
    assert len(rows(tmp_path / "full")) == 6 + 4  # 6 train rows; evaluations at steps 0, 2, 4, 6


@pytest.fixture(scope="module")
def two_checkpoints(small_tasks, tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4, kept pristine (tests damage copies)."""
    out = tmp_path_factory.mktemp("pristine")
    result = train(make_config(small_tasks, out, max_steps=4))
    return out, result


def damaged_copy(two_checkpoints, tmp_path, damage) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], out)
    damage(out / "checkpoint-4")
    return out


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors has {:,} bytes, the manifest says"),
    "optimizer.pt missing": (lambda c: (c / "resume" / "optimizer.pt").unlink(), "resume/optimizer.pt is missing"),
    "rng-0.pt missing": (lambda c: (c / "resume" / "rng-0.pt").unlink(), "resume/rng-0.pt is missing"),
    "run config missing": (lambda c: (c / "resume" / "config.json").unlink(), "resume/config.json is missing"),
    "a flipped byte": (lambda c: flip_a_byte(c / "resume" / "optimizer.pt"),
                       "resume/optimizer.pt does not match its checksum"),
    "no manifest and no rng": (lambda c: [(c / MANIFEST).unlink(), (c / "resume" / "rng-0.pt").unlink()],
                               "resume/rng-0.pt is missing"),
    "a manifest naming a file outside": (lambda c: edit_manifest(c, lambda m: m["files"].update(
        {"../../../etc/passwd": {"bytes": 1, "sha256": "0"}})),
        f"{MANIFEST} cannot be used ('../../../etc/passwd' is not a path inside the checkpoint)"),
    "a manifest entry through a link": (lambda c: [os.symlink("/etc/passwd", c / "passwd"), edit_manifest(
        c, lambda m: m["files"].update({"passwd": {"bytes": 1, "sha256": "0"}}))],
        f"{MANIFEST} cannot be used ('passwd' leads outside the checkpoint)"),
    "a manifest of the wrong shape": (lambda c: edit_manifest(c, lambda m: m.update(files=list(m["files"]))),
                                      f"{MANIFEST} cannot be used (no 'files' table)"),
    "a manifest entry of the wrong shape": (lambda c: edit_manifest(c, lambda m: m["files"].update({"x": 3})),
                                            f"{MANIFEST} cannot be used (the entry for 'x' is not a size and a checksum)"),
}


def edit_manifest(checkpoint: Path, change) -> None:
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    change(manifest)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_named_with_what_is_wrong(two_checkpoints, small_tasks, tmp_path, kind):
    damage, problem = DAMAGE[kind]
    out = damaged_copy(two_checkpoints, tmp_path, damage)
    if kind == "truncated weights":
        problem = problem.format((out / "checkpoint-4" / "model.safetensors").stat().st_size)
    problems = ckpt.checkpoint_problems(out / "checkpoint-4")
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    assert ckpt.checkpoint_problems(out / "checkpoint-2") == []
    explicit = make_config(small_tasks, out, resume_from_checkpoint=str(out / "checkpoint-4"))
    with pytest.raises(ConfigError) as error:
        Trainer(explicit, DistEnv())
    assert str(error.value) == f"resume_from_checkpoint: {out / 'checkpoint-4'} cannot be resumed from: {problems[0]}"


def test_auto_resume_sets_a_damaged_checkpoint_aside_and_falls_back(two_checkpoints, small_tasks, tmp_path, capsys):
    out = damaged_copy(two_checkpoints, tmp_path, lambda c: truncate(c / "model.safetensors"))
    resumed = train(make_config(small_tasks, out, max_steps=4, resume_from_checkpoint="auto"))
    err = capsys.readouterr().err
    assert f"warning: checkpoint {out / 'checkpoint-4'} is damaged (model.safetensors has " in err
    assert "set aside as checkpoint-4.corrupt, falling back to the previous checkpoint" in err
    assert (out / "checkpoint-4.corrupt" / "model.safetensors").is_file()  # kept for a post-mortem, never deleted
    assert len(resumed.step_losses) == 2  # steps 3 and 4 again, from checkpoint-2
    final, expected = weights_of(out / "checkpoint-4"), weights_of(two_checkpoints[1].final_checkpoint)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_an_explicit_path_that_is_no_checkpoint_is_one_line(small_tasks, tmp_path, capsys):
    for target, reason in ((tmp_path / "nowhere", "no such folder"), (tmp_path, "not a checkpoint (no trainer_state.json)")):
        assert main(cli_args(small_tasks, tmp_path / "out", resume_from_checkpoint=str(target))) == 2
        assert capsys.readouterr().err.strip() == f"error: resume_from_checkpoint: {target} cannot be resumed from: {reason}"


def log_keys(folder: Path, name: str = "metrics.jsonl") -> list[tuple]:
    return [(r["split"], r["step"]) for r in map(json.loads, (folder / name).read_text().splitlines())]


def test_an_epoch_end_evaluation_at_the_last_step_is_in_the_checkpoint_and_survives_a_resume(small_tasks, tmp_path):
    # 48 training samples / 12 = 4 steps: step 4 ends the epoch, is evaluated ('epoch') and checkpointed (every 2).
    values = dict(evaluation_strategy="epoch", checkpointing_steps=2, per_device_train_batch_size=12,
                  padding_mode="dynamic", max_steps=-1)
    first = train(make_config(small_tasks, tmp_path, **values))
    saved = ckpt.read_state(tmp_path / "checkpoint-4")
    assert (saved.last_eval["step"], saved.epoch, saved.step_in_epoch) == (4, 1, 0)  # evaluated before the save
    assert saved.checkpoint_metrics["checkpoint-4"] == first.evaluations[-1]["loss"]
    again = train(make_config(small_tasks, tmp_path, resume_from_checkpoint="auto", **values))  # a finished run
    assert again.step_losses == [] and again.evaluations == []
    assert log_keys(tmp_path).count(("eval", 4)) == 1


def test_a_fresh_start_keeps_the_earlier_log_aside_instead_of_continuing_it(small_tasks, tmp_path):
    train(make_config(small_tasks, tmp_path, max_steps=2, checkpointing_steps=1000))
    shutil.rmtree(tmp_path / "checkpoint-2")  # killed before its first checkpoint
    earlier = log_keys(tmp_path)
    train(make_config(small_tasks, tmp_path, max_steps=2, checkpointing_steps=1000, resume_from_checkpoint="auto"))
    assert log_keys(tmp_path) == earlier == [("train", 1), ("train", 2), ("eval", 2)]
    assert log_keys(tmp_path, "metrics.1.jsonl") == earlier


def test_a_new_run_into_a_folder_with_another_runs_checkpoints_is_refused_or_replaces_them(small_tasks, tmp_path,
                                                                                            capsys):
    old = train(make_config(small_tasks, tmp_path, max_steps=4, checkpointing_steps=4))
    old_weights = weights_of(old.final_checkpoint)
    again = dict(max_steps=3, checkpointing_steps=1, save_total_limit=1, learning_rate=1e-2, evaluation_strategy="no")
    with pytest.raises(ConfigError, match=r"output_dir: .* holds checkpoint-4, which belong to another run; .*"
                                          r"resume_from_checkpoint: auto.*overwrite_output_dir: true"):
        train(make_config(small_tasks, tmp_path, **again))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    new = train(make_config(small_tasks, tmp_path, **again, overwrite_output_dir=True))
    assert f"overwrite_output_dir: removed checkpoint-4 from {tmp_path}" in capsys.readouterr().err
    assert new.final_checkpoint == tmp_path / "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert ckpt.read_state(new.final_checkpoint).step == 3
    new_weights = weights_of(new.final_checkpoint)
    assert not torch.equal(new_weights["embed_out.weight"], old_weights["embed_out.weight"])
    # Resuming from an older checkpoint of the same folder: the newer ones would be mixed in, so also refused.
    shutil.copytree(new.final_checkpoint, tmp_path / "checkpoint-2")  # stands for an older checkpoint of the run
    (tmp_path / "checkpoint-2" / ckpt.STATE_FILE).write_text(ckpt.TrainerState(step=2, step_in_epoch=2).to_json())
    write_manifest(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"holds checkpoint-3, which are newer than checkpoint-2, the checkpoint"):
        train(make_config(small_tasks, tmp_path, **again, resume_from_checkpoint=str(tmp_path / "checkpoint-2")))


def test_resume_names_changed_settings_and_refuses_another_model(small_tasks, tmp_path, capsys):
    train(make_config(small_tasks, tmp_path, max_steps=2, peft_type="lora", lora_rank=4))
    with pytest.raises(ConfigError, match=r"^lora_rank: the checkpoint .*checkpoint-2 trained a model with 4, this run "
                                          r"asks for 8; a resume continues the checkpoint's model"):
        train(make_config(small_tasks, tmp_path, max_steps=4, peft_type="lora", lora_rank=8,
                          resume_from_checkpoint="auto"))
    with pytest.raises(ConfigError, match=r"^model_config: the checkpoint"):
        train(make_config(small_tasks, tmp_path, max_steps=4, peft_type="lora", lora_rank=4, model_config="tiny-demo",
                          resume_from_checkpoint="auto"))
    capsys.readouterr()
    resumed = train(make_config(small_tasks, tmp_path, max_steps=3, peft_type="lora", lora_rank=4, learning_rate=1e-2,
                                resume_from_checkpoint="auto"))
    assert resumed.state.step == 3
    note = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: resuming from"))
    assert note == (f"note: resuming from {tmp_path / 'checkpoint-2'} with changed settings (the new values are used): "
                    "learning_rate 0.002 -> 0.01; max_steps 2 -> 3")


def signal_during_step(monkeypatch, step: int, pauses: tuple[float, ...] = ()) -> None:
    """SIGTERM this process while optimizer step `step` runs (as a cluster's preemption would), and again after
    each of `pauses` seconds."""
    original = Trainer.train_step

    def train_step(self, batches):
        loss = original(self, batches)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
            for pause in pauses:
                time.sleep(pause)
                os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigterm_finishes_the_step_saves_it_and_the_resumed_run_is_exact(two_checkpoints, small_tasks, tmp_path,
                                                                          monkeypatch, capsys):
    _, full = two_checkpoints  # the uninterrupted 4-step run
    signal_during_step(monkeypatch, 3, pauses=(0.01,))  # one stop delivered twice (Ctrl-C under torchrun): one stop
    out = tmp_path / "stopped"
    assert main(cli_args(small_tasks, out, max_steps=4)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this optimizer step and saving a checkpoint" in err
    assert "stopped by SIGTERM after step 3; continue with resume_from_checkpoint: auto" in err
    assert ckpt.checkpoint_problems(out / "checkpoint-3") == [] and ckpt.read_state(out / "checkpoint-3").step == 3
    monkeypatch.undo()
    resumed = train(make_config(small_tasks, out, max_steps=4, resume_from_checkpoint="auto"))
    assert resumed.step_losses == full.step_losses[3:]
    final, expected = weights_of(out / "checkpoint-4"), weights_of(full.final_checkpoint)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    # A second signal (a second or more later) stops at once: the step's checkpoint is not written, the earlier stays.
    signal_during_step(monkeypatch, 3, pauses=(REPEAT_AFTER + 0.1,))
    again = tmp_path / "twice"
    assert main(cli_args(small_tasks, again, max_steps=4)) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.rstrip().endswith("interrupted (SIGTERM)")
    assert sorted(p.name for p in again.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]


def test_sigterm_during_tokenization_leaves_no_workers_and_no_temporary_cache(tmp_path):
    lines = (Path(__file__).parents[1] / "mftcoder/assets/demo_data/code_generation/train.jsonl").read_bytes()
    task = tmp_path / "big"
    task.mkdir()
    (task / "data.jsonl").write_bytes(lines * (16 * 2**20 // len(lines)))  # 16 MB: tokenized by worker processes
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mftcoder", "data", "check", "/dev/null", f"data_paths=[{json.dumps(str(task))}]",
               f"data_cache_dir={json.dumps(str(cache))}", "preprocessing_num_workers=2", "data_split=98,2,0"]
    checker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    for _ in range(600):  # until the workers are there (at most 60 s)
        workers = children_of(checker.pid)
        if len(workers) >= 2 or checker.poll() is not None:
            break
        time.sleep(0.1)
    assert len(workers) >= 2, checker.communicate()
    checker.send_signal(signal.SIGTERM)
    _, err = checker.communicate(timeout=60)
    assert checker.returncode == 128 + signal.SIGTERM and err.rstrip().endswith("interrupted (SIGTERM)"), err
    assert "Traceback" not in err
    assert [p.name for p in cache.rglob("*.tmp-*")] == []
    assert [pid for pid in workers if alive(pid)] == []


def children_of(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()} if alive(pid) else set()


def alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_forked_worker_leaves_sigint_to_its_parent_and_dies_of_sigterm():
    # DataLoader workers are forked inside the training loop and inherit its handlers: Ctrl-C (sent to the whole
    # process group) must not stop them mid-step, and their parent's SIGTERM (how it ends a worker) must end them.
    from mftcoder.train.stop import StopAtStepEnd, raise_on_signals

    for handlers in (raise_on_signals(), StopAtStepEnd(say=lambda text: None)):
        with handlers:
            child = os.fork()
            if child == 0:
                try:
                    time.sleep(10)
                finally:
                    os._exit(0)  # never back into pytest, whatever happened
            os.kill(child, signal.SIGINT)
            time.sleep(0.3)
            assert os.waitpid(child, os.WNOHANG) == (0, 0)  # still running
            os.kill(child, signal.SIGTERM)
            _, status = os.waitpid(child, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_running_out_of_memory_is_a_sentence_with_what_to_change(small_tasks, tmp_path, monkeypatch, capsys):
    import mftcoder.train.loop as loop

    def a_step_too_large(config):
        return torch.empty(2**62, dtype=torch.uint8)  # the allocator's own refusal, as a huge padded batch gets

    monkeypatch.setattr(loop, "train", a_step_too_large)
    assert main(cli_args(small_tasks, tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory (") and "can't allocate memory" in err and "\n" not in err
    assert err.endswith("a step needs less with a smaller per_device_train_batch_size or seq_length (padding_mode: "
                        "padding pads every sample to seq_length), max_forward_tokens, or checkpoint_activations: true")

    def a_bug(config):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(loop, "train", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not dressed up as memory
        main(cli_args(small_tasks, tmp_path))
