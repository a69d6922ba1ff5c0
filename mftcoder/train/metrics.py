"""Where metrics go: a console line, a JSONL file and TensorBoard scalars (main process only)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mftcoder.loss import TaskTotals


def _set_aside(path: Path) -> None:
    """metrics.jsonl of an earlier run -> metrics.1.jsonl (the first free number)."""
    if path.is_file() and path.stat().st_size:
        k = 1
        while path.with_name(f"metrics.{k}.jsonl").exists():
            k += 1
        path.rename(path.with_name(f"metrics.{k}.jsonl"))


def note(text: str) -> None:
    """A line on stderr that leaves the progress bar intact."""
    tqdm.write(text, file=sys.stderr)


def format_line(split: str, step: int, metrics: dict[str, float]) -> str:
    """'train step 10 | loss 5.1234 | loss/taskA 5.0000 | lr 1.00e-04 | ...' for the console."""
    parts = [f"{split} step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float) and (key == "lr" or (abs(value) < 1e-3 and value != 0)):
            parts.append(f"{key} {value:.3e}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes every metric record to output_dir/metrics.jsonl and TensorBoard; prints a line for each."""

    def __init__(self, output_dir: Path, tensorboard_dir: Path, enabled: bool = True, resumed=None):
        """`resumed`: the TrainerState of the checkpoint a run resumes from. What was logged after that checkpoint
        was saved is cut (those steps run again), so the logs hold each step once, as an uninterrupted run's do."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / "metrics.jsonl"
            if resumed is None:
                _set_aside(path)  # a fresh start: an earlier run's log is kept, not continued
            self.jsonl = open(path, "a", encoding="utf-8")
            if resumed is not None and resumed.metrics_bytes is not None and self.jsonl.tell() > resumed.metrics_bytes:
                self.jsonl.truncate(resumed.metrics_bytes)
                self.jsonl.seek(0, 2)  # writes append; tell() should say so before the first one
            # TensorBoard hides what earlier event files hold from this step on (all of it on a fresh start)
            self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=resumed.step + 1 if resumed else 0)

    def position(self) -> int | None:
        """Bytes written to metrics.jsonl so far (None in processes that do not log)."""
        return self.jsonl.tell() if self.jsonl is not None else None

    def log(self, split: str, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        if self.jsonl is None:
            return
        record = {"split": split, "step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                   for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()
        if echo:
            tqdm.write(format_line(split, step, metrics))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.writer.close()
            self.jsonl = self.writer = None


@dataclass
class Interval:
    """What happened since the last log line."""

    totals: TaskTotals
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    capacity: int = 0  # token slots of the batches, padding included
    grad_norm: float = float("nan")
    balance: dict = field(default_factory=dict)  # the balancer's metrics (task weights) of the last step
    started: float = field(default_factory=time.perf_counter)
