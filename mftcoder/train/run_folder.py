"""A run's output folder: checked writable before any work, and held by one live run at a time."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from mftcoder.config import ConfigError
from mftcoder.train.checkpoint import checkpoint_step, is_complete

LOCK_FILE = ".mftcoder.lock"


class RunFolder:
    """The main process holds an OS lock (flock) on output_dir/.mftcoder.lock while the run lives. The kernel
    drops it with the process, so a killed run never leaves a stale lock; a second run is refused at once."""

    def __init__(self, path: Path, lock_file=None):
        self.path = path
        self._lock_file = lock_file

    @classmethod
    def claim(cls, path: Path, is_main: bool) -> "RunFolder":
        """Create the folder, check it can be written and lock it (main process; the others only wait)."""
        if not is_main:
            return cls(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output_dir: {path} exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_file = open(path / LOCK_FILE, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot write to {path}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = _describe_holder(lock_file.read())
            lock_file.close()
            raise ConfigError(f"output_dir: {path} is in use by another run ({holder}); wait for it to end or "
                              "choose another output_dir") from None
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                        "command": " ".join(sys.argv)}) + "\n")
            lock_file.flush()
        except OSError as exc:
            lock_file.close()
            raise ConfigError(f"output_dir: cannot write to {path}: {exc.strerror}") from None
        return cls(path, lock_file)

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the lock
            self._lock_file = None


RANDOM_BASE = "base-model"  # a LoRA run on a random-initialised model keeps its base here


def earlier_runs_files(output_dir: Path, resume_from: Path | None) -> list[Path]:
    """What another run left in output_dir that this run would mix with its own: every complete checkpoint on a fresh
    start; on a resume from a checkpoint in output_dir, the checkpoints after it. (A fresh start replaces the random
    base, output_dir/base-model, with its own.)"""
    if not output_dir.is_dir():
        return []
    continuing = _resumes_inside(output_dir, resume_from)
    after = checkpoint_step(resume_from) if continuing else -1
    return [p for p in sorted(output_dir.iterdir()) if p.is_dir() and is_complete(p) and checkpoint_step(p) > after]


def _resumes_inside(output_dir: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and resume_from.resolve().parent == output_dir.resolve()


def clear_earlier_runs(output_dir: Path, resume_from: Path | None, overwrite: bool, say) -> None:
    """Refuse to mix two runs' checkpoints in one folder; with overwrite_output_dir, remove the other run's first."""
    found = earlier_runs_files(output_dir, resume_from)
    if not found:
        return
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if not overwrite:
        why = (f"are newer than {resume_from.name}, the checkpoint this run resumes from"
               if _resumes_inside(output_dir, resume_from) else "belong to another run")
        raise ConfigError(f"output_dir: {output_dir} holds {names}, which {why}; this run's checkpoints would be mixed "
                          "with them. Continue that run with resume_from_checkpoint: auto, choose another output_dir, "
                          "or set overwrite_output_dir: true to remove them")
    for path in found:
        shutil.rmtree(path)
    say(f"overwrite_output_dir: removed {names} from {output_dir}")


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"
