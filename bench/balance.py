#!/usr/bin/env python
"""Balance benchmark: do the task balancers (coba, dwa) beat fixed loss weights on deliberately unequal tasks?

Three tasks from the installed `transformers` package's documented functions (read with `ast` by
bench/build_bench_data.py; each function used by one task only):

* `docstring` -- large (1000 records): the implementation -> its docstring (prose);
* `implement` -- small (100 records): the signature + the docstring's summary -> the implementation (open-ended code);
* `names`     -- small (100 records): the implementation -> the names it defines and calls (copied from the code,
  so much easier than the other two).

Each mode (`weighted_loss_mode`: case1, case3, coba, dwa) trains the tiny random GPT-NeoX (`model_config:
tiny-test`, the shipped tokenizer, packed rows) for the same number of optimizer steps, once per seed, each run a
real `python -m mftcoder train` subprocess with its own output_dir. The split is fixed (records are shuffled once
with --data-seed, then split in file order); the seed changes the initialisation, the sample order and the
balancer's validation samples. The final evaluation covers the whole validation split at the last step.

Writes docs/balance.md (the table of each task's final validation loss, the worst task's and the mean over
tasks, as mean +- std over seeds) and docs/balance.png (those losses by mode; coba's and dwa's task weights
over steps for the first seed). A "What we conclude" section written by hand below the generated part is kept
when the file is written again.

    .venv/bin/python bench/balance.py                      # the default run (~25 minutes on 2 CPU cores)
    .venv/bin/python bench/balance.py --steps 20 --seeds 1 --modes case3,coba --doc /tmp/b.md   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "transformers"
MODES = ("case1", "case3", "coba", "dwa")
DYNAMIC = ("coba", "dwa")
HAND_WRITTEN = "<!-- Everything below this line is written by hand; bench/balance.py keeps it. -->"


def load_data_builder() -> ModuleType:
    """bench/build_bench_data.py as a module, loaded by file path (registered in sys.modules, as dataclasses need)."""
    path = REPO / "bench" / "build_bench_data.py"
    spec = importlib.util.spec_from_file_location("build_bench_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BENCH = load_data_builder()


# --------------------------------------------------------------------------- data


def names_record(fn, package: str, rng: random.Random) -> dict:
    """The easy task: list what a function defines (its name and parameters) and what it calls, all of which
    appear in the code shown (so the answer is mostly copied)."""
    human = f"List the names this function defines and the names it calls:\n\n```python\n{fn.code_without_doc}```"
    calls = ", ".join(fn.calls) or "nothing"
    bot = f"defines: {fn.name}({', '.join(fn.param_names)})\ncalls: {calls}"
    return {"chat_rounds": [{"role": "human", "content": human}, {"role": "bot", "content": bot}]}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable  # (Function, package, rng) -> record
    size: int
    description: str


def task_specs(large: int, small: int) -> list[TaskSpec]:
    """The three tasks, small ones first (they pick their functions first, so the large one cannot starve them)."""
    return [
        TaskSpec("implement", BENCH.generation_record, small,
                 "signature + the docstring's summary -> the implementation (docstring removed): open-ended code"),
        TaskSpec("names", names_record, small,
                 "the implementation -> `defines: f(params)` and `calls: ...`: names copied from the code (easy)"),
        TaskSpec("docstring", BENCH.docstring_record, large,
                 "the implementation (docstring removed) -> its docstring: prose"),
    ]


def build_data(out: Path, specs: list[TaskSpec], seed: int, max_tokens: int) -> dict:
    """Write one folder per task (train.jsonl, records in a seeded order) and out/profile.json; each function of
    the package goes to at most one task, and a record is kept only if it fits in max_tokens."""
    started = time.perf_counter()
    pool = BENCH.collect(PACKAGE)
    random.Random(f"balance-{seed}").shuffle(pool)
    tokenizer, template = BENCH.renderer()
    used: set[int] = set()
    profiles: dict[str, dict] = {}
    for spec in specs:
        rng = random.Random(f"balance-{seed}-{spec.name}")
        kept: list[dict] = []
        lengths: list[tuple[int, int]] = []
        candidates = (i for i in range(len(pool)) if i not in used)
        while len(kept) < spec.size:
            chunk = [i for _, i in zip(range(spec.size - len(kept) + 64), candidates)]
            if not chunk:
                raise SystemExit(f"only {len(kept)} {spec.name} records of at most {max_tokens} tokens; "
                                 "lower --large/--small or raise --seq-length")
            records = [spec.build(pool[i], PACKAGE, rng) for i in chunk]
            for i, record, length in zip(chunk, records, BENCH.measure(records, tokenizer, template)):
                if length[0] <= max_tokens and len(kept) < spec.size:
                    used.add(i)
                    kept.append(record)
                    lengths.append(length)
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                                            encoding="utf-8")
        profiles[spec.name] = BENCH.profile(lengths)
    meta = {"package": PACKAGE, "package_version": BENCH._version(PACKAGE), "pool": len(pool), "seed": seed,
            "max_tokens": max_tokens, "profile": profiles, "seconds": time.perf_counter() - started}
    (out / "profile.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# --------------------------------------------------------------------------- runs


def train_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings every run shares (the mode and seed are added per run)."""
    return {
        "model_config": "tiny-test",
        "seq_length": args.seq_length,
        "padding_mode": "pack",
        "data_split": args.data_split,
        "shuffle_before_split": False,
        "per_device_train_batch_size": args.batch_rows,
        "max_steps": args.steps,
        "num_train_epochs": 100,  # max_steps ends the run
        "learning_rate": args.learning_rate,
        "min_lr": args.learning_rate / 10,
        "lr_scheduler_type": "cosine",
        "num_warmup_steps": max(1, args.steps // 15),
        "evaluation_strategy": "steps",
        "evaluation_steps": args.eval_every,
        "per_device_valid_batch_size": 8,
        "checkpointing_steps": 10**6,  # only the final checkpoint, written when a run ends
        "log_interval": 1,  # a train record (with the task weights) every step
        "plot_curves": False,
    }


def balancer_settings(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Per-mode extras, sized to the run length."""
    warmup = max(1, round(args.steps * 0.1))
    return {
        "coba": {"coba_warmup_steps": warmup, "coba_history_length": 3 * warmup, "coba_update_interval": 1,
                 "coba_sample_valid_num": 2, "coba_tau": 5.0},
        "dwa": {"dwa_window": 10, "dwa_temperature": 2.0},
    }


def command(data: Path, tasks: list[str], settings: dict[str, object], output_dir: Path) -> list[str]:
    """The `python -m mftcoder train` command line of one run."""
    values = {"data_paths": "[" + ",".join(str(data / t) for t in tasks) + "]", **settings, "output_dir": output_dir}
    return [sys.executable, "-m", "mftcoder", "train", "/dev/null", *(f"{k}={_cli(v)}" for k, v in values.items())]


def _cli(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_one(cmd: list[str], output_dir: Path, cache: Path) -> tuple[float, float]:
    """Run one training to the end (its console output to output_dir/train.log); return the wall seconds and the
    machine's 1-minute load average at the end (this run included)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # OpenMP threads that sleep instead of spinning while they wait: the same numbers, and on a machine shared with
    # other jobs a run took 166 s instead of 322-729 s (96 s alone).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "MFTCODER_CACHE": str(cache)}
    started = time.perf_counter()
    with open(output_dir / "train.log", "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = (output_dir / "train.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"run failed (exit {done.returncode}): {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - started, os.getloadavg()[0]


@dataclass
class RunResult:
    mode: str
    seed: int
    final: dict[str, float]  # task -> validation loss at the last step
    weights: dict[str, tuple[list[int], list[float]]]  # task -> (steps, weight share); empty for static modes
    seconds: float
    load: float  # 1-minute load average when the run ended (the run's own ~2 threads included)


def read_run(output_dir: Path, tasks: list[str], steps: int) -> tuple[dict[str, float], dict]:
    """Each task's validation loss at the last step, and the logged task weights over steps."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if r["split"] == "eval" and r["step"] == steps]
    if not last:
        raise SystemExit(f"{output_dir}: no evaluation at step {steps} in metrics.jsonl")
    final = {t: last[-1][f"loss/{t}"] for t in tasks}
    weights = {t: ([r["step"] for r in rows if r["split"] == "train" and f"weight/{t}" in r],
                   [r[f"weight/{t}"] for r in rows if r["split"] == "train" and f"weight/{t}" in r]) for t in tasks}
    return final, {t: w for t, w in weights.items() if w[0]}


# --------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(results: list[RunResult], tasks: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """mode -> column (each task, worst, mean) -> (mean, std) over seeds."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in dict.fromkeys(r.mode for r in results):
        runs = [r for r in results if r.mode == mode]
        columns = {t: [r.final[t] for r in runs] for t in tasks}
        columns["worst"] = [max(r.final.values()) for r in runs]
        columns["mean"] = [statistics.fmean(r.final.values()) for r in runs]
        table[mode] = {name: mean_std(values) for name, values in columns.items()}
    return table


def markdown_table(table: dict[str, dict[str, tuple[float, float]]], tasks: list[str]) -> str:
    columns = [*tasks, "worst", "mean"]
    best = {c: min(row[c][0] for row in table.values()) for c in columns}
    lines = ["| mode | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for mode, row in table.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in columns]
        cells = [f"**{cell}**" if row[c][0] == best[c] else cell for c, cell in zip(columns, cells)]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[RunResult], tasks: list[str], path: Path) -> None:
    """Left: final validation loss per task, bars per mode (error bars: std over seeds). Right: coba's and dwa's
    task weights over steps (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    table = summary(results, tasks)
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(tasks))]
        bars.bar(xs, [table[mode][t][0] for t in tasks], width, yerr=[table[mode][t][1] for t in tasks],
                 capsize=3, label=mode)
    bars.set_xticks(range(len(tasks)), tasks)
    low = min(table[m][t][0] for m in modes for t in tasks)
    bars.set_ylim(low - 0.5, None)
    bars.set_ylabel("final validation loss")
    bars.set_title("final validation loss per task (mean ± std over seeds)")
    bars.legend(fontsize="small")
    bars.grid(axis="y", alpha=0.3)
    first_seed = min(r.seed for r in results)
    styles = {"coba": "-", "dwa": "--"}
    for run in (r for r in results if r.seed == first_seed and r.mode in DYNAMIC):
        for k, task in enumerate(tasks):
            steps, values = run.weights.get(task, ([], []))
            curves.plot(steps, values, styles[run.mode], color=f"C{k}", label=f"{run.mode}: {task}")
    curves.axhline(1 / len(tasks), color="grey", linewidth=0.8)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("task weight (share of 1)")
    curves.set_title(f"dynamic task weights (seed {first_seed})")
    curves.legend(fontsize="small", ncol=2)
    curves.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def hand_written_part(doc: Path) -> str:
    """What follows the hand-written marker in an existing doc (kept across runs)."""
    if doc.exists() and HAND_WRITTEN in doc.read_text():
        return doc.read_text().split(HAND_WRITTEN, 1)[1].lstrip("\n")
    return "## What we conclude\n\n(to be written from the numbers above)\n"


def write_doc(doc: Path, figure: Path, results: list[RunResult], tasks: list[str], specs: list[TaskSpec],
              meta: dict, args: argparse.Namespace, rerun: str, wall_s: float) -> None:
    table = summary(results, tasks)
    extras = balancer_settings(args)
    settings = train_settings(args)
    profile_rows = ["| task | what | records (train / valid) | median tokens | max | supervised tokens per record |",
                    "|---|---|---:|---:|---:|---:|"]
    for spec in specs:
        p = meta["profile"][spec.name]
        valid = _valid_count(p["count"], args.data_split)
        profile_rows.append(f"| {spec.name} | {spec.description} | {p['count'] - valid} / {valid} | "
                            f"{p['median']:.0f} | {p['max']} | {p['supervised_fraction'] * p['mean']:.0f} |")
    per_mode = ", ".join(f"{mode} {statistics.fmean(r.seconds for r in results if r.mode == mode):.0f} s"
                         for mode in table)
    loads = [r.load for r in results]
    seeds = sorted({r.seed for r in results})
    text = f"""# Balance benchmark: CoBa and DWA against fixed loss weights

Generated by `bench/balance.py` ({time.strftime('%Y-%m-%d')}). Rerun:

```bash
{rerun}
```

(`--work DIR` keeps each run's `train.log` and `metrics.jsonl`, and `results.json`, under DIR.)

## Result

Final validation loss per task (the whole validation split, at step {args.steps}), the worst task's and the mean
over tasks; mean ± std over seeds {', '.join(map(str, seeds))}; lower is better, the best of each column in bold.

{markdown_table(table, tasks)}

![final validation loss per task by mode; coba and dwa task weights over steps]({figure.name})

Wall time: {_minutes(wall_s)} in all on {os.cpu_count()} CPU cores: the data {meta['seconds']:.0f} s, then {len(results)}
runs; a run (start-up and evaluations included) took on average {per_mode}. The machine's 1-minute load average
at the end of each run (the run's own two threads included, so about 2 on an otherwise idle machine): mean
{statistics.fmean(loads):.1f}, highest {max(loads):.1f}.

## Data

{meta['pool']} documented functions of `{meta['package']}` {meta['package_version']} (read with `ast` by
`bench/build_bench_data.py`), shuffled once (data seed {meta['seed']}); each task takes the next functions whose record
fits in {meta['max_tokens']} tokens (mftcoder's template and the shipped GPT-NeoX-20B tokenizer), so no function
appears in two tasks. Split `{args.data_split}` in file order (`shuffle_before_split: false`): the same
validation records for every run.

{chr(10).join(profile_rows)}

## Settings

Every run: `python -m mftcoder train /dev/null key=value ...` with

```
{chr(10).join(f'{k}: {_cli(v)}' for k, v in settings.items())}
```

Modes: `case1` (token mean over all tasks: the large task dominates), `case3` (per-task token mean, equal weights),
`coba` ({', '.join(f'{k}={v}' for k, v in extras['coba'].items())}; warm-up 10% of the steps, history 3x the
warm-up) and `dwa` ({', '.join(f'{k}={v}' for k, v in extras['dwa'].items())}). Seeds {', '.join(map(str, seeds))}
change the initialisation, the sample order and the balancers' validation samples, not the split.

{HAND_WRITTEN}

{hand_written_part(doc)}"""
    doc.write_text(text)


def _valid_count(n: int, data_split: str) -> int:
    from mftcoder.config import split_fractions
    from mftcoder.data.tasks import split_counts

    return split_counts(n, split_fractions(data_split))[1]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated weighted_loss_modes (default {','.join(MODES)})")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per mode (default 3)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every run (default 150)")
    p.add_argument("--batch-rows", type=int, default=10, help="packed rows per optimizer step (default 10: "
                   "about 2.4 epochs in 150 steps)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per row; longer records are not used (256)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (default 1e-3, cosine)")
    p.add_argument("--eval-every", type=int, help="evaluation interval in steps; must divide --steps (default: "
                   "--steps, i.e. before training and at the end only)")
    p.add_argument("--large", type=int, default=1000, help="records of the large task (default 1000)")
    p.add_argument("--small", type=int, default=100, help="records of each small task (default 100)")
    p.add_argument("--data-split", default="80,20,0", help="train,valid,test per task (default 80,20,0)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data set (fixed across runs)")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the runs' checkpoints (else only logs and metrics)")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "balance.md", help="the report (default docs/balance.md)")
    args = p.parse_args(argv)
    args.eval_every = args.eval_every or args.steps
    if args.steps % args.eval_every:
        p.error("--eval-every must divide --steps (the last evaluation must fall on the last step)")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    return args


def rerun_command(argv: list[str]) -> str:
    """The command line that reproduces the numbers (--work and --keep only say where files go: left out)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--keep" or arg.startswith("--work="):
            skip = False
            continue
        skip = arg == "--work"
        if not skip:
            kept.append(arg)
    return shlex.join([".venv/bin/python", "bench/balance.py", *kept])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="mftcoder-balance-")) if temporary else args.work.resolve()
    try:
        specs = task_specs(args.large, args.small)
        tasks = [s.name for s in specs]
        meta = build_data(work / "data", specs, args.data_seed, args.seq_length)
        counts = ", ".join(f"{t} {meta['profile'][t]['count']}" for t in tasks)
        print(f"data: {counts} records ({meta['seconds']:.0f} s)", flush=True)
        results: list[RunResult] = []
        plan = [(mode, seed) for seed in range(args.seeds) for mode in args.modes]
        for index, (mode, seed) in enumerate(plan, 1):
            output_dir = work / "runs" / f"{mode}-seed{seed}"
            settings = {**train_settings(args), **balancer_settings(args).get(mode, {}),
                        "weighted_loss_mode": mode, "seed": seed}
            seconds, load = run_one(command(work / "data", tasks, settings, output_dir), output_dir, work / "cache")
            final, weights = read_run(output_dir, tasks, args.steps)
            results.append(RunResult(mode, seed, final, weights, seconds, load))
            if not args.keep:
                for checkpoint in output_dir.glob("checkpoint-*"):
                    shutil.rmtree(checkpoint)
            losses = ", ".join(f"{t} {v:.3f}" for t, v in final.items())
            print(f"[{index}/{len(plan)}] {mode} seed {seed}: {losses} ({seconds:.0f} s, load {load:.1f}; "
                  f"{_minutes(time.perf_counter() - started)} so far)", flush=True)
        (work / "results.json").write_text(json.dumps([vars(r) for r in results], indent=1) + "\n")
        print(markdown_table(summary(results, tasks), tasks))
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        figure = args.doc.with_suffix(".png")
        plot(results, tasks, figure)
        write_doc(args.doc, figure, results, tasks, specs, meta, args, rerun_command(argv),
                  time.perf_counter() - started)
        print(f"wrote {args.doc} and {figure} ({_minutes(time.perf_counter() - started)})")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
