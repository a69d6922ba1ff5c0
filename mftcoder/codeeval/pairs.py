"""Preference pairs from tested answers (`mftcoder eval --pairs FILE`): for each problem where some of the model's
answers passed their tests and some failed, records in the DPO training format, {"chosen": turns, "rejected": turns},
both the conversation eval prompted with followed by one reply exactly as the model generated it: a passing one
(chosen) or a failing one (rejected). How pairs are chosen: `build_pairs` and docs/eval.md."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mftcoder.codeeval.problems import Problem

MAX_PAIRS_PER_PROBLEM = 4


@dataclass
class PairStats:
    """What the pairs came from: problems by outcome and pairs made."""

    problems_with_pairs: int = 0
    pairs: int = 0
    all_passed: int = 0  # every scored answer passed: nothing to reject
    all_failed: int = 0  # none passed: nothing to choose
    without_pair: int = 0  # answers that passed and answers that failed, but no usable pair (docs/eval.md)

    def line(self, path: Path) -> str:
        """The one-line summary `mftcoder eval` prints."""
        unusable = f", {self.without_pair} with both but no usable pair" if self.without_pair else ""
        return (f"pairs: {self.pairs} pair(s) from {self.problems_with_pairs} problem(s) written to {path}; "
                f"{self.all_passed} problem(s) all passed, {self.all_failed} all failed{unusable}")


@dataclass
class _Answer:
    """One distinct answer text of a problem: where it first appeared and what its runs said."""

    text: str
    sample: int
    completion: str
    status: str
    verdicts: set
    cut: bool


def prompt_turns(problem: Problem) -> list[dict]:
    """The conversation eval prompts the model with for this problem (the turns `generate_completions` renders), as
    training records write turns."""
    return [{"role": turn.role, "content": turn.content} for turn in problem.turns]


def build_pairs(problems: list[Problem], rows: list[dict],
                max_per_problem: int = MAX_PAIRS_PER_PROBLEM) -> tuple[list[dict], PairStats]:
    """Pairs from result rows (`execute`'s records: task_id, benchmark, sample, passed, status, completion, answer,
    max_new_tokens_reached), in problem order. Per problem:

    - only model answers (rows with an `answer`) that are not blank (a training turn cannot be empty) take part,
      and each distinct text once (its first sample); a text that both passed and failed takes no part;
    - chosen: the passing answers not cut by max_new_tokens (training ends a reply with the end-of-turn token,
      which such an answer never produced), by sample;
    - rejected: the failing answers whose executed code differs from every passing answer's (the same code that
      passed cannot be what failed), plain failures (a wrong result, an exception, code that does not compile)
      before the ones a limit stopped (timed out, out of memory, a signal), each by sample;
    - pair i (i = 0, 1, ...) is (chosen[i % C], rejected[i % R]) for min(max_per_problem, max(C, R)) pairs: every
      answer of the longer list is used once, the shorter list's in turn, and no pair repeats."""
    by_key = {(p.benchmark, p.task_id): p for p in problems}
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["benchmark"], row["task_id"]), []).append(row)
    pairs: list[dict] = []
    stats = PairStats()
    order = {key: i for i, key in enumerate(by_key)}
    for key in sorted(grouped, key=order.__getitem__):
        verdicts = {bool(row["passed"]) for row in grouped[key]}
        if verdicts != {True, False}:
            stats.all_passed += verdicts == {True}
            stats.all_failed += verdicts == {False}
            continue
        made = _pairs_of(by_key[key], grouped[key], max_per_problem)
        stats.problems_with_pairs += bool(made)
        stats.without_pair += not made
        stats.pairs += len(made)
        pairs += made
    return pairs, stats


def _pairs_of(problem: Problem, rows: list[dict], max_pairs: int) -> list[dict]:
    answers: dict[str, _Answer] = {}
    for row in sorted(rows, key=lambda row: row["sample"]):
        text = row.get("answer")
        if not isinstance(text, str) or not text.strip():
            continue
        answer = answers.setdefault(text, _Answer(text, row["sample"], row["completion"], row["status"], set(),
                                                  bool(row.get("max_new_tokens_reached"))))
        answer.verdicts.add(bool(row["passed"]))
    passing_code = {a.completion for a in answers.values() if True in a.verdicts}
    chosen = [a for a in answers.values() if a.verdicts == {True} and not a.cut]
    rejected = sorted((a for a in answers.values() if a.verdicts == {False} and a.completion not in passing_code),
                      key=lambda a: (a.status != "failed", a.sample))
    if not chosen or not rejected:
        return []
    made = []
    for i in range(min(max_pairs, max(len(chosen), len(rejected)))):
        good, bad = chosen[i % len(chosen)], rejected[i % len(rejected)]
        made.append({"chosen": prompt_turns(problem) + [{"role": "bot", "content": good.text}],
                     "rejected": prompt_turns(problem) + [{"role": "bot", "content": bad.text}],
                     "task_id": problem.task_id, "benchmark": problem.benchmark,
                     "chosen_sample": good.sample, "rejected_sample": bad.sample, "rejected_status": bad.status})
    return made


class PairsFile:
    """The --pairs file: checked before any work (by creating and removing its temporary file next to it), then written
    whole at the end to the temporary file and renamed into place, so that no run leaves a half-written pairs file
    (an earlier one stays as it was until then)."""

    def __init__(self, path: Path, option: str = "--pairs"):
        from mftcoder.config import ConfigError

        self.path = path
        if path.is_dir() or not path.name:
            raise ConfigError(f"{option} {path}: is a folder; give the path of a JSONL file to write")
        self.temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        existing = next(parent for parent in path.absolute().parents if parent.exists())
        if not existing.is_dir():
            raise ConfigError(f"{option} {path}: cannot write there ({existing} is a file, not a folder)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
            self.temporary.unlink()
        except OSError as exc:
            raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror})") from None

    def commit(self, pairs: list[dict]) -> None:
        """Write every pair to the temporary file, then put it in place; on any error the temporary file goes."""
        try:
            with open(os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "w",
                      encoding="utf-8") as file:
                file.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
                file.flush()
                os.fsync(file.fileno())
            os.replace(self.temporary, self.path)
        except BaseException:
            self.temporary.unlink(missing_ok=True)
            raise
