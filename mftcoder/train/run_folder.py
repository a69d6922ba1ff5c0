"""A run's output folder: checked writable before any work, and held by one live run at a time."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from mftcoder.config import ConfigError

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


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"
