"""Fault soak: SIGKILL `mftcoder train` at random moments, resume, and check the run still ends exactly right.

One uninterrupted reference run first (a tiny random GPT-NeoX, three small tasks from the shipped demo data, a
checkpoint every step, two epochs). Then `--runs` runs, each in its own output_dir: start the same command
(`resume_from_checkpoint=auto`), SIGKILL its process group 1-3 times, restart it after each kill, and let the last
start finish. Half of the kills (by chance) wait for a checkpoint save to begin (a `.checkpoint-*.tmp` folder
appears) and strike after a random delay of up to 1.2 typical saves, so most land inside the save and some just
after it; the others strike at a random time (scaled to how fast the machine is running starts just now).

Every run must end like the reference:
- weights: every tensor of model.safetensors (a LoRA run: the adapter) in every surviving checkpoint, bitwise;
- state: the same surviving checkpoints, and in each the same optimizer state, RNG state and trainer_state.json;
- metrics: metrics.jsonl holds each (split, step) exactly once, with the reference's values (timing fields aside);
- exits: no start that was not killed exits non-zero (or hangs).

    .venv/bin/python bench/fault_soak.py [--runs 20] [--seed 0] [--work DIR] [--keep] [--set key=value ...]

Exit status 0 only when every run passes every check. Failing runs' folders are kept (logs per start inside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

RECORDS_PER_TASK = 20  # the shortest records of each shipped demo task
# The training every start runs: ~22 optimizer steps over two epochs, a checkpoint after every step.
TRAIN_SETTINGS = {
    "model_config": "tiny-test",
    "seq_length": 96,
    "per_device_train_batch_size": 4,
    "learning_rate": 2.0e-3,
    "num_warmup_steps": 2,
    "num_train_epochs": 2,
    "data_split": "80,20,0",
    "log_interval": 1,
    "evaluation_strategy": "steps,epoch",
    "evaluation_steps": 3,
    "checkpointing_steps": 1,
    "save_total_limit": 2,
    "per_device_valid_batch_size": 6,
    "seed": 7,
}
TIMING_FIELDS = {"tokens_per_s", "peak_gpu_memory_gib"}  # differ between runs by nature
# trainer_state.json fields that may differ: the length of the run's own metrics.jsonl (timing fields included)
RUN_SPECIFIC_STATE = {"metrics_bytes"}
STEP_NAME = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+|epoch-\d+)$")
POLL_S = 0.002
MID_SAVE_SHARE = 0.5


@dataclass
class Timing:
    """How long a start takes: measured on the reference run, rescaled as the machine gets busier or quieter."""

    total_steps: int
    saves: int  # checkpoint saves seen
    startup_s: float  # launch to the first save, less one step
    train_s: float
    save_s: float  # median time a `.tmp` folder was seen to exist
    pace: float = 1.0  # recent starts' wall time over what the reference predicts for them

    def expected_s(self, done: int) -> float:
        """Wall time of a start that resumes after `done` steps, at the reference's pace."""
        return self.startup_s + self.train_s * max(0.0, 1.0 - done / self.total_steps)

    def observe(self, done: int, seconds: float) -> None:
        """A start that resumed after `done` steps ran to its end in `seconds`: follow the machine's pace."""
        self.pace = 0.5 * self.pace + 0.5 * seconds / self.expected_s(done)


# --- starting and killing one training process ----------------------------------------------------------------

@dataclass
class Start:
    """One start of the training command and how it ended."""

    index: int
    plan: str  # "mid-save", "timed" or "finish"
    returncode: int | None = None
    killed: bool = False
    mid_save: bool = False  # the kill left a save of this start unfinished (its hidden folder remained)
    interrupted: list[str] = field(default_factory=list)  # those hidden folders
    seconds: float = 0.0
    resumed_at: int | None = None  # the step it resumed from ("resumed from ... at step N"), None if fresh
    hung: bool = False
    stderr_tail: str = ""


def hidden_folders(output_dir: Path) -> dict[str, int]:
    """Temporary and set-aside checkpoint folders (`.checkpoint-*.tmp` / `.old`): name -> inode."""
    found = {}
    try:
        with os.scandir(output_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".checkpoint-") and entry.name.endswith((".tmp", ".old")):
                    found[entry.name] = entry.inode()
    except FileNotFoundError:
        pass
    return found


class SaveWatch:
    """The hidden checkpoint folders of one start. Those an earlier, killed start left behind are not its own: they
    count as leftovers while they stay (same name, same inode), and the start's own saves are the others."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.leftovers = hidden_folders(output_dir)
        self.saves: set[tuple[str, int]] = set()  # (name, inode) of every `.tmp` folder of this start seen

    def own(self) -> list[str]:
        """This start's hidden folders present now; the `.tmp` ones are noted as saves begun."""
        present = hidden_folders(self.output_dir)
        self.leftovers = {n: inode for n, inode in self.leftovers.items() if present.get(n) == inode}
        own = sorted(n for n, inode in present.items() if self.leftovers.get(n) != inode)
        self.saves.update((n, present[n]) for n in own if n.endswith(".tmp"))
        return own


def latest_step(output_dir: Path) -> int:
    """The step of the newest complete step checkpoint (0 if none): what a resume would start from."""
    steps = [int(match.group(1)) for p in output_dir.glob("checkpoint-*")
             if (match := STEP_NAME.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(steps, default=0)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, progress-bar carriage returns counted as line ends."""
    text = path.read_text(errors="replace") if path.exists() else ""
    parts = [p.rstrip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return "\n".join(parts[-lines:])


def run_start(command: list[str], output_dir: Path, index: int, plan: str, rng: random.Random,
              timing: Timing, timeout_s: float) -> Start:
    """Start the command in its own session and kill its process group as `plan` says ("finish": never)."""
    start = Start(index, plan)
    done = latest_step(output_dir)
    remaining = max(0.0, 1.0 - done / timing.total_steps)
    # timed: a moment in the start-up or training still to do; mid-save: the n-th save this start begins, then a
    # delay that lands most kills inside that save and some just after it (rename, retention, the next step).
    kill_at = rng.uniform(0.05, 0.95) * timing.expected_s(done) * timing.pace
    target_save = rng.randint(1, max(1, round(timing.saves * remaining)))
    delay = rng.uniform(0.0, 1.2 * timing.save_s)
    out, err = output_dir / f"start-{index}.out", output_dir / f"start-{index}.err"
    output_dir.mkdir(parents=True, exist_ok=True)
    watch = SaveWatch(output_dir)
    launched = time.perf_counter()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
        strike_at = None
        while process.poll() is None:
            now = time.perf_counter() - launched
            watch.own()  # every poll, so that a leftover removed by this start is seen to go
            if now > timeout_s:
                start.hung = True
                break
            if plan == "timed" and now >= kill_at:
                break
            if plan == "mid-save":
                if strike_at is None and len(watch.saves) >= target_save:
                    strike_at = now + delay
                if strike_at is not None and now >= strike_at:
                    break
            time.sleep(POLL_S)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            start.killed = not start.hung
        process.wait()
    start.seconds = time.perf_counter() - launched
    start.returncode = process.returncode
    if start.killed:
        start.interrupted = watch.own()
        start.mid_save = bool(start.interrupted)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("resumed from ") and " at step " in line:
            start.resumed_at = int(line.rsplit(" at step ", 1)[1].split()[0])
    if not start.killed and start.returncode == 0:
        timing.observe(done, start.seconds)
    if not start.killed and start.returncode != 0:
        start.stderr_tail = tail(err)
    return start


# --- the reference run ----------------------------------------------------------------------------------------

def run_reference(command: list[str], output_dir: Path, timeout_s: float) -> Timing:
    """Run the training once, uninterrupted, watching its saves; raise if it fails."""
    appeared: dict[tuple[str, int], float] = {}
    gone: dict[tuple[str, int], float] = {}
    output_dir.mkdir(parents=True)
    launched = time.perf_counter()
    with open(output_dir / "start-0.out", "wb") as stdout, open(output_dir / "start-0.err", "wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
        while process.poll() is None:
            now = time.perf_counter() - launched
            if now > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise RuntimeError(f"the reference run took over {timeout_s:.0f} s")
            present = {(n, ino) for n, ino in hidden_folders(output_dir).items() if n.endswith(".tmp")}
            for key in present - appeared.keys():
                appeared[key] = now
            for key in appeared.keys() - present - gone.keys():
                gone[key] = now
            time.sleep(POLL_S)
    wall = time.perf_counter() - launched
    if process.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {process.returncode}):\n"
                           f"{tail(output_dir / 'start-0.err')}")
    total = latest_step(output_dir)
    if not appeared or total == 0:
        raise RuntimeError("the reference run saved no step checkpoint the soak could see")
    first = min(appeared.values())
    per_step = (wall - first) / total
    startup = max(0.5, first - per_step)
    durations = [gone[k] - appeared[k] for k in gone]
    return Timing(total_steps=total, saves=len(appeared), startup_s=startup, train_s=wall - startup,
                  save_s=statistics.median(durations) if durations else 0.05)


# --- comparing a run with the reference --------------------------------------------------------------------

def tree_diff(a, b, where: str = "") -> list[str]:
    """Where two nested dicts/lists of tensors and plain values differ (tensors: dtype, shape and bits)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where or "tensor"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))[:3]} in one only"]
        return [d for k in a for d in tree_diff(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_diff(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{where}: {a!r} != {b!r}"]


def checkpoints(output_dir: Path) -> list[str]:
    """The complete checkpoints (step and epoch) in output_dir."""
    return sorted(p.name for p in output_dir.glob("checkpoint-*")
                  if CHECKPOINT_NAME.match(p.name) and (p / "trainer_state.json").is_file())


def checkpoint_like(output_dir: Path) -> list[str]:
    """Every entry named like a checkpoint: complete ones, and any other (e.g. one set aside as damaged)."""
    return sorted(p.name for p in output_dir.glob("checkpoint*"))


def weight_differences(reference: Path, run: Path) -> list[str]:
    """Tensors of the weights file that differ, in every checkpoint both runs kept (the final one included).
    The weights file: model.safetensors, or adapter_model.safetensors for a LoRA run."""
    final = reference / f"checkpoint-{latest_step(reference)}"
    weights = next(f for f in ("model.safetensors", "adapter_model.safetensors") if (final / f).is_file())
    if not (run / final.name / weights).is_file():
        return [f"{final.name}/{weights} is missing"]
    found = []
    for name in sorted(set(checkpoints(reference)) & set(checkpoints(run))):
        mine, theirs = load_file(run / name / weights), load_file(reference / name / weights)
        found += [f"{name}/{weights}{d}" for d in tree_diff(theirs, mine)]
    return found


def state_differences(reference: Path, run: Path) -> list[str]:
    """Other checkpoints kept, or another optimizer, RNG or trainer state in any checkpoint both kept."""
    kept, expected = checkpoint_like(run), checkpoint_like(reference)
    found = [] if kept == expected else [f"checkpoints kept: {kept}, reference: {expected}"]
    for name in sorted(set(checkpoints(run)) & set(checkpoints(reference))):
        for part in ("resume/optimizer.pt", "resume/rng-0.pt"):
            a = torch.load(reference / name / part, weights_only=True)
            b = torch.load(run / name / part, weights_only=True)
            found += [f"{name}/{part}{d}" for d in tree_diff(a, b)]
        a, b = ({k: v for k, v in json.loads((d / name / "trainer_state.json").read_text()).items()
                 if k not in RUN_SPECIFIC_STATE} for d in (reference, run))
        found += [f"{name}/trainer_state.json{d}" for d in tree_diff(a, b)]
    return found


def read_metrics(path: Path) -> tuple[dict[tuple[str, int], list[dict]], list[str]]:
    """metrics.jsonl as (split, step) -> its records, and the lines that are not JSON records."""
    records: dict[tuple[str, int], list[dict]] = {}
    bad = []
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            key = (record["split"], int(record["step"]))
        except (ValueError, KeyError, TypeError):
            bad.append(f"line {number} is not a metrics record: {line[:60]!r}")
            continue
        records.setdefault(key, []).append({k: v for k, v in record.items() if k not in TIMING_FIELDS})
    return records, bad


def metrics_differences(reference: Path, run: Path) -> list[str]:
    """Records that are missing, repeated, extra or carry other values than the reference's."""
    expected, _ = read_metrics(reference / "metrics.jsonl")
    found_records, found = read_metrics(run / "metrics.jsonl")
    for key in sorted(expected.keys() | found_records.keys()):
        mine, theirs = found_records.get(key, []), expected.get(key, [])
        label = f"{key[0]} step {key[1]}"
        if not theirs:
            found.append(f"{label}: not in the reference run")
        elif not mine:
            found.append(f"{label}: missing")
        else:
            if len(mine) > 1:
                found.append(f"{label}: {len(mine)} times")
            found += [f"{label}{d}" for record in mine for d in tree_diff(theirs[0], record)][:3]
    return found


# --- the soak -------------------------------------------------------------------------------------------------

@dataclass
class RunReport:
    name: str
    starts: list[Start] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(s.killed for s in self.starts)

    @property
    def mid_save_kills(self) -> int:
        return sum(s.mid_save for s in self.starts)

    @property
    def failed(self) -> bool:
        return bool(self.weights or self.state or self.metrics or self.exits)


@dataclass
class Summary:
    runs: list[RunReport] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, what: str) -> int:
        """How many runs failed check `what` (weights, state, metrics or exits)."""
        return sum(bool(getattr(r, what)) for r in self.runs)

    @property
    def kills(self) -> int:
        return sum(r.kills for r in self.runs)

    @property
    def mid_save_kills(self) -> int:
        return sum(r.mid_save_kills for r in self.runs)

    @property
    def missed(self) -> int:
        """Planned kills that never came: the start had finished first."""
        return sum(s.plan != "finish" and not s.killed and not s.hung for r in self.runs for s in r.starts)

    @property
    def restarts(self) -> list[Start]:
        return [s for r in self.runs for s in r.starts[1:]]

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.runs)

    def line(self) -> str:
        n = len(self.runs)
        resumed = sum(s.resumed_at is not None for s in self.restarts)
        return (f"runs: {n}, kills survived: {self.kills} ({self.mid_save_kills} mid-save; {self.missed} more came "
                f"too late), "
                f"restarts: {len(self.restarts)} ({resumed} resumed from a checkpoint), "
                f"weights bitwise equal: {n - self.count('weights')}/{n}, "
                f"optimizer/RNG/trainer state equal: {n - self.count('state')}/{n}, "
                f"metrics once each: {n - self.count('metrics')}/{n}, "
                f"clean exits: {n - self.count('exits')}/{n}, {self.seconds:.0f} s")


def soak_run(name: str, command: list[str], output_dir: Path, reference: Path, rng: random.Random,
             timing: Timing, timeout_s: float) -> RunReport:
    """One run: 1-3 kills at random moments, a restart after each, then a start left to finish; then the checks."""
    report = RunReport(name)
    plans = ["mid-save" if rng.random() < MID_SAVE_SHARE else "timed" for _ in range(rng.randint(1, 3))]
    for index, plan in enumerate(plans + ["finish"]):
        start = run_start(command, output_dir, index, plan, rng, timing, timeout_s)
        report.starts.append(start)
        if start.hung:
            report.exits.append(f"start {index} still running after {timeout_s:.0f} s (killed)")
            return report
        if not start.killed:  # finished (the last start, or before its kill came)
            if start.returncode != 0:
                report.exits.append(f"start {index} exited {start.returncode}:\n{start.stderr_tail}")
                return report
            break
    report.weights = weight_differences(reference, output_dir)
    report.state = state_differences(reference, output_dir)
    report.metrics = metrics_differences(reference, output_dir)
    return report


def describe(report: RunReport) -> str:
    """One line per run, then the first few differences of each failed check."""
    kills = []
    for s in report.starts:
        if s.killed:
            where = f" in {', '.join(s.interrupted)}" if s.mid_save else " (no save left unfinished)"
            kills.append(f"{s.plan} kill at {s.seconds:.1f} s{where}")
    resumed = [str(s.resumed_at) for s in report.starts[1:] if s.resumed_at is not None]
    verdicts = [f"{what} {'FAIL' if getattr(report, what) else 'ok'}" for what in ("weights", "state", "metrics")]
    lines = [f"{report.name}: {'; '.join(kills) or 'no kill landed'}; resumed at step(s) {', '.join(resumed) or '-'}; "
             + ", ".join(verdicts) + (", exit FAIL" if report.exits else "")]
    for what in ("weights", "state", "metrics", "exits"):
        problems = getattr(report, what)
        lines += [f"    {what}: {p}" for p in problems[:4]]
        if len(problems) > 4:
            lines.append(f"    {what}: ... {len(problems) - 4} more")
    return "\n".join(lines)


def write_inputs(work: Path) -> Path:
    """Three small tasks (the shortest records of each shipped demo task) and the config file; returns its path."""
    from mftcoder.model import DEMO_DATA  # imported here: only the set-up needs mftcoder itself

    paths = []
    for task in sorted(p for p in DEMO_DATA.iterdir() if p.is_dir()):
        lines = sorted((task / "train.jsonl").read_text().splitlines(), key=len)[:RECORDS_PER_TASK]
        folder = work / "data" / task.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
        paths.append(str(folder))
    config = {"data_paths": paths, "data_cache_dir": str(work / "cache"), **TRAIN_SETTINGS}
    path = work / "soak.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="interrupted runs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (the training's is fixed)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep every run's folder, not only failing ones")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra training setting for every start, e.g. --set peft_type=lora (repeatable)")
    return parser.parse_args(argv)


def run_soak(args: argparse.Namespace) -> Summary:
    """The reference run, then args.runs interrupted runs, each checked against it; prints as it goes."""
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="mftcoder-fault-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    config = write_inputs(work)

    def command(output_dir: Path) -> list[str]:
        return [sys.executable, "-m", "mftcoder", "train", str(config), *args.set, f"output_dir={output_dir}",
                "resume_from_checkpoint=auto"]

    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    print(f"fault soak in {work}: reference run ...", flush=True)
    timing = run_reference(command(reference), reference, timeout_s=1800)
    expected, _ = read_metrics(reference / "metrics.jsonl")
    repeated = [k for k, v in expected.items() if len(v) > 1]
    if repeated:
        raise RuntimeError(f"the reference run itself logged {repeated[:3]} more than once")
    print(f"reference: {timing.total_steps} steps, {timing.saves} saves, start-up {timing.startup_s:.1f} s, "
          f"training {timing.train_s:.1f} s, a save {1000 * timing.save_s:.0f} ms", flush=True)
    timeout_s = max(120.0, 10 * (timing.startup_s + timing.train_s))
    rng = random.Random(args.seed)
    summary = Summary()
    for i in range(args.runs):
        name = f"run-{i:02d}"
        output_dir = work / name
        shutil.rmtree(output_dir, ignore_errors=True)
        report = soak_run(name, command(output_dir), output_dir, reference, rng, timing, timeout_s)
        summary.runs.append(report)
        print(describe(report), flush=True)
        if not report.failed and not args.keep:
            shutil.rmtree(output_dir)
    summary.seconds = time.perf_counter() - began
    if not summary.failed and not args.keep and args.work is None:
        shutil.rmtree(work)
    elif summary.failed:
        print(f"failing runs kept under {work}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = run_soak(parse_args(argv))
    print(summary.line(), flush=True)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
