"""From task folders to the samples a run uses: length policy, per-task splits, counts for every skip."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mftcoder.config import Config, split_fractions
from mftcoder.data.records import DataError
from mftcoder.data.tasks import Task, discover_tasks, split_indices
from mftcoder.data.tokenize import Conversations, Template, TokenizedTask, load_tokenized


@dataclass
class TaskSamples:
    """One task after the length policy and the split; indices point into `data`'s records."""

    data: TokenizedTask
    seq_length: int
    lengths: np.ndarray  # per record (all its sequences), after truncation
    targets: np.ndarray  # supervised tokens per record, after truncation
    kept: np.ndarray  # bool per record
    truncated: int
    dropped_over_length: int
    dropped_no_target: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def task(self) -> Task:
        return self.data.task

    def sample(self, record: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, loss mask) of one record's first (for SFT its only) sequence, truncated to seq_length."""
        return self.data.sample(record, self.seq_length)

    def sequences(self, record: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input ids, loss mask) of each of one record's sequences, each truncated to seq_length."""
        return self.data.sequences(record, self.seq_length)


@dataclass
class PreparedData:
    tasks: list[Task]
    per_task: list[TaskSamples]

    @property
    def errors(self) -> list[str]:
        return [e for t in self.per_task for e in t.data.errors]

    @property
    def skipped_entries(self) -> list[str]:
        """`path: reason` for each entry under a task folder that was left out (a FIFO, a broken symlink, ...)."""
        return [line for t in self.tasks for line in t.skipped]


def apply_length_policy(data: TokenizedTask, seq_length: int, over_length: str) -> dict:
    """Which records survive seq_length under `over_length`, their lengths and supervised-token counts. A record of
    several sequences (a preference pair) is cut sequence by sequence, and dropped whole."""
    n, parts = len(data), data.parts
    full_lengths = data.sequence_lengths
    targets = (np.add.reduceat(np.asarray(data.mask), data.starts[:-1], dtype=np.int64).reshape(n, parts) if n
               else np.zeros((0, parts), np.int64))
    over = (full_lengths > seq_length).any(1)
    kept = np.ones(n, dtype=bool)
    dropped_no_target = 0
    if over_length == "drop":
        kept &= ~over
    else:
        for i in np.flatnonzero(over):
            for k, (_, mask) in enumerate(data.sequences(int(i), seq_length)):
                targets[i, k] = int(mask[1:].sum())  # position 0 has no context to predict it from
            if (targets[i] == 0).any():
                kept[i] = False
                dropped_no_target += 1
    return {
        "lengths": np.minimum(full_lengths, seq_length).sum(1),
        "targets": targets.sum(1),
        "kept": kept,
        "truncated": int(over.sum()) - dropped_no_target if over_length == "truncate" else 0,
        "dropped_over_length": int(over.sum()) if over_length == "drop" else 0,
        "dropped_no_target": dropped_no_target,
    }


def line_starts(data: TokenizedTask) -> np.ndarray:
    """The first record of each line (a JSONL line or a whole source file) that kept records: one per line for SFT
    and preference pairs, one or more (a document's chunks, adjacent) for pretraining."""
    files, lines = np.asarray(data.file_index[::data.parts]), np.asarray(data.lines[::data.parts])
    if not len(lines):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero((np.diff(files) != 0) | (np.diff(lines) != 0)) + 1]).astype(np.int64)


def split_by_line(data: TokenizedTask, fractions: tuple[float, float, float], seed: int,
                  shuffle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/valid/test record indices, a line's records all in one split (a document's chunks never straddle
    training and validation). With one record per line this is split_indices over the records, value for value."""
    first = line_starts(data)
    sizes = np.diff(np.append(first, len(data)))

    def records_of(chosen: np.ndarray) -> np.ndarray:
        counts = sizes[chosen]
        return np.repeat(first[chosen] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum(), dtype=np.int64)

    split = split_indices(len(first), fractions, seed, data.task.name, shuffle)
    return records_of(split[0]), records_of(split[1]), records_of(split[2])


def prepare_task(data: TokenizedTask, config: Config) -> TaskSamples:
    policy = apply_length_policy(data, config.seq_length, config.over_length)
    train, valid, test = split_by_line(data, split_fractions(config.data_split), config.seed,
                                       config.shuffle_before_split)
    kept = policy["kept"]
    return TaskSamples(data, config.seq_length, train=train[kept[train]], valid=valid[kept[valid]],
                       test=test[kept[test]], **policy)


def prepare_data(config: Config, tokenizer, template: Template, raise_on_bad: bool = True,
                 records: Conversations | None = None) -> PreparedData:
    """Discover, tokenize (or read the cache), apply the length policy and split every task. `records`: what a
    record holds and which files a task reads (the objective's; default SFT's conversations in JSONL).

    Under on_bad_record=error any bad record raises DataError listing all of them (after reading every task).
    """
    tasks = discover_tasks(config.data_paths, config.tasks, (records or Conversations()).suffixes)
    cache_root = Path(config.data_cache_dir) if config.data_cache_dir else None
    rebuild_before = time.time() if config.overwrite_cache else None  # older caches only: not one a rank just built
    per_task = [prepare_task(load_tokenized(t, tokenizer, template, cache_root, config.preprocessing_num_workers,
                                            rebuild_before, config.seq_length, records), config) for t in tasks]
    prepared = PreparedData(tasks, per_task)
    empty = [t.task.name for t in per_task if len(t.train) == 0 and len(t.valid) == 0]
    if raise_on_bad and config.on_bad_record == "error" and prepared.skipped_entries:
        skipped = prepared.skipped_entries
        raise DataError("\n".join(skipped) + f"\n{len(skipped)} entry(ies) under the task folders cannot be read as "
                        "data; remove them or set on_bad_record: skip to skip and count them")
    if raise_on_bad and config.on_bad_record == "error" and prepared.errors:
        raise DataError("\n".join(prepared.errors) + f"\n{len(prepared.errors)} bad record(s); fix them or set "
                        "on_bad_record: skip to skip and count them")
    if raise_on_bad and empty:
        raise DataError(f"task(s) with no usable sample: {', '.join(empty)} (see `mftcoder data check`)")
    return prepared


def _percentiles(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return f"{p50:.0f}/{p90:.0f}/{p99:.0f}/{values.max()}"


def check_report(prepared: PreparedData) -> str:
    """The `data check` table: one row per task, then totals."""
    header = ("task", "lines", "bad", "kept", "truncated", "dropped", "supervised", "len p50/p90/p99/max",
              "train", "valid", "test", "ctl-as-text")
    rows = []
    for t in prepared.per_task:
        kept = t.kept
        rows.append((t.task.name, t.data.num_lines, len(t.data.errors), int(kept.sum()), t.truncated,
                     t.dropped_over_length + t.dropped_no_target, int(t.targets[kept].sum()),
                     _percentiles(t.lengths[kept]), len(t.train), len(t.valid), len(t.test), t.data.as_text))
    if len(rows) > 1:
        totals = [sum(r[i] for r in rows) if isinstance(rows[0][i], int) else "" for i in range(len(header))]
        rows.append(("all", *totals[1:]))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
             for r in (header, *rows)]
    note = ("ctl-as-text: records whose messages contain control-token text (e.g. <|endoftext|>); it is trained as "
            "the characters it is, never as a control token")
    pairs = ("each record is a preference pair: truncated counts pairs with either answer cut to seq_length, "
             "supervised the tokens of both answers, lengths both sequences together")
    return "\n".join(lines + [pairs] * any(t.data.parts == 2 for t in prepared.per_task) + _chunk_notes(prepared)
                     + [note] * any(t.data.as_text for t in prepared.per_task))


def _chunk_notes(prepared: PreparedData) -> list[str]:
    """For pretraining tasks: how many documents were cut into chunks (nothing is truncated or dropped)."""
    notes = []
    for t in prepared.per_task:
        if t.data.chunk_length is not None:
            first = line_starts(t.data)
            sizes = np.diff(np.append(first, len(t.data)))
            notes.append(f"{t.task.name}: {len(first)} document(s), {int((sizes > 1).sum())} of them longer than "
                         f"{t.data.chunk_length} tokens and cut into chunks; {len(t.data)} chunk(s) in all")
    if notes:
        notes.append("pretraining: the kept/train/valid/test columns count chunks; a long document's chunks overlap by "
                     "one token, so every token after its first is a target exactly once (none truncated)")
    return notes
