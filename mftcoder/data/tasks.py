"""Task discovery (one folder per task), deterministic per-task splits, per-task weights."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mftcoder.config import ConfigError
from mftcoder.data.records import DataError


@dataclass(frozen=True)
class Task:
    """One task: its id (position in the run's task list), name, folder and JSONL files (sorted)."""

    id: int
    name: str
    path: Path
    files: tuple[Path, ...]


def discover_tasks(data_paths: list[str], task_map: dict[str, str] | None = None) -> list[Task]:
    """Tasks from folders (name = basename) and an explicit {name: folder} map; all problems in one error."""
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
        if not path.is_dir():
            problems.append(f"{path}: task folder does not exist" if not path.exists() else f"{path}: not a folder")
            continue
        files = tuple(sorted(p for p in path.rglob("*.jsonl") if p.is_file()))
        if not files:
            problems.append(f"{path}: no .jsonl files under this folder")
            continue
        tasks.append(Task(len(tasks), name, path, files))
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
