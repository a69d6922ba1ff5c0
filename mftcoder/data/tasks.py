"""Task discovery (one folder per task), deterministic per-task splits, per-task weights."""

from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mftcoder.config import ConfigError, task_name_problem
from mftcoder.data.records import DataError


@dataclass(frozen=True)
class Task:
    """One task: its id (position in the run's task list), name, folder, data files (sorted), and a
    `path: reason` line for each entry under the folder that was skipped."""

    id: int
    name: str
    path: Path
    files: tuple[Path, ...]
    skipped: tuple[str, ...] = ()


def find_jsonl(folder: Path, suffixes: tuple[str, ...] = (".jsonl",)) -> tuple[list[Path], list[str]]:
    """The `*.jsonl` files (or files ending in any of `suffixes`) under a folder, sorted, and a `path: reason;
    skipped` line for each entry left out. Symlinks are followed (to files and folders); a folder reached a second
    time (a symlink loop, or two links to one folder) is read once. Left out: a data file that is not a regular file
    (a FIFO, socket or device; it is never opened), broken or looping symlinks, folders that cannot be read."""
    files: list[Path] = []
    skipped: list[str] = []
    seen: dict[tuple[int, int], Path] = {}
    pending = [folder]
    while pending:
        current = pending.pop()
        info = os.stat(current)
        if (info.st_dev, info.st_ino) in seen:
            skipped.append(f"{current}: the same folder as {seen[info.st_dev, info.st_ino]} (a symlink loop or a "
                           "second link to it); read once, skipped here")
            continue
        seen[info.st_dev, info.st_ino] = current
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(f"{current}: cannot read this folder ({exc.strerror}); skipped")
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = os.stat(path).st_mode  # follows symlinks; never opens anything
            except OSError as exc:
                what = "broken symlink" if entry.is_symlink() else "cannot be read"
                target = f" (to '{os.readlink(path)}')" if entry.is_symlink() else ""
                reason = "a symlink loop" if exc.errno == errno.ELOOP else f"{what}{target}"
                skipped.append(f"{path}: {reason}; skipped")
                continue
            if stat.S_ISDIR(mode):
                pending.append(path)
            elif entry.name.endswith(suffixes):
                if stat.S_ISREG(mode):
                    files.append(path)
                else:
                    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
                    skipped.append(f"{path}: not a regular file ({kind}); not read, skipped")
    return sorted(files), skipped


def discover_tasks(data_paths: list[str], task_map: dict[str, str] | None = None,
                   suffixes: tuple[str, ...] = (".jsonl",)) -> list[Task]:
    """Tasks from folders (name = basename) and an explicit {name: folder} map; all problems in one error.
    `suffixes`: the endings of a task's data files (the objective's records say which)."""
    named = [(Path(p).resolve().name, Path(p)) for p in data_paths] + [(n, Path(p)) for n, p in (task_map or {}).items()]
    problems: list[str] = []
    if not named:
        raise DataError("no tasks: set data_paths (task folders) or tasks ({name: folder})")
    seen: dict[str, Path] = {}
    tasks: list[Task] = []
    for name, path in named:
        if name in seen:
            problems.append(f"{path}: duplicate task name '{name}' (also {seen[name]}); use the tasks map to rename one")
            continue
        seen[name] = path
        problem = task_name_problem(name)
        if problem:
            source = "(the folder's name) " if (name, path) in named[:len(data_paths)] else ""
            problems.append(f"{path}: task name {name!r} {source}{problem}; rename it with tasks: {{name: folder}}")
            continue
        if not path.is_dir():
            problems.append(f"{path}: task folder does not exist" if not path.exists() else f"{path}: not a folder")
            continue
        files, skipped = find_jsonl(path, suffixes)
        if not files:
            problems.append(f"{path}: no {' or '.join(suffixes)} files under this folder"
                            + (f" ({len(skipped)} entries skipped: {skipped[0]}{', ...' if len(skipped) > 1 else ''})"
                               if skipped else ""))
            continue
        tasks.append(Task(len(tasks), name, path, tuple(files), tuple(skipped)))
    if problems:
        raise DataError("\n".join(problems))
    return tasks


def per_task_values(name: str, values: list[float] | dict[str, float], tasks: list[Task], default: float = 1.0) -> np.ndarray:
    """A list (in task order) or {task: value} mapping -> one float per task; unknown names are an error."""
    if isinstance(values, dict):
        unknown = sorted(set(values) - {t.name for t in tasks})
        if unknown:
            raise ConfigError(f"{name}: unknown task '{unknown[0]}'; tasks are {', '.join(t.name for t in tasks)}")
        return np.array([values.get(t.name, default) for t in tasks], dtype=np.float64)
    if not values:
        return np.full(len(tasks), default, dtype=np.float64)
    if len(values) != len(tasks):
        raise ConfigError(f"{name}: {len(values)} values for {len(tasks)} tasks ({', '.join(t.name for t in tasks)})")
    return np.array(values, dtype=np.float64)


def task_rng(seed: int, task_name: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on the seed, the task and what it is for (stable across runs)."""
    return np.random.default_rng([seed, zlib.crc32(task_name.encode()), zlib.crc32(purpose.encode())])


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes of train/valid/test for n samples; a non-zero valid/test share gets at least one sample
    when n >= 2, and train keeps at least one sample whenever its share is non-zero."""
    train_share, valid_share, test_share = fractions
    if train_share == 0:
        valid = round(n * valid_share / (valid_share + test_share))
        return 0, valid, n - valid
    valid, test = (max(1, round(n * f)) if f > 0 and n >= 2 else 0 for f in (valid_share, test_share))
    while valid + test >= n and valid + test > 0:
        if test >= valid:
            test -= 1
        else:
            valid -= 1
    return n - valid - test, valid, test


def split_indices(n: int, fractions: tuple[float, float, float], seed: int, task_name: str,
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/valid/test index arrays over a task's n records."""
    order = task_rng(seed, task_name, "split").permutation(n) if shuffle else np.arange(n)
    n_train, n_valid, _ = split_counts(n, fractions)
    return order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]
