"""`mftcoder eval`: generate completions for code problems with a model (or read existing ones), execute them in the
sandbox, and report pass@k."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mftcoder.codeeval.problems import Problem, benchmark_name, load_benchmark
from mftcoder.codeeval.sandbox import Sandbox
from mftcoder.codeeval.score import Completion, execute, read_completions, summarize, write_results
from mftcoder.data.records import DataError
from mftcoder.data.template import saved_template
from mftcoder.infer import Sampling, generate, prompt_ids


def closed_code_block(text: str) -> bool:
    """The answer holds a whole code block (an opening and a closing fence): the code is complete."""
    return text.count("```") >= 2


def generate_completions(model, tokenizer, problems: list[Problem], sampling: Sampling, batch_size: int = 8,
                         progress: bool = True, synced_gpus: bool = False) -> list[Completion]:
    """sampling.num_return_sequences completions per problem, prompted with the model's own chat template; prompts
    of similar length are batched together (longest first), and each answer stops at its closing code fence."""
    template = saved_template(tokenizer)
    prompts = [prompt_ids(tokenizer, problem.turns, template) for problem in problems]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = generate(model, tokenizer, [prompts[i] for i in order], sampling, batch_size, progress,
                       stop_when=closed_code_block, synced_gpus=synced_gpus)
    by_problem = dict(zip(order, answers))
    return [Completion(problem, sample, problem.completion(answer), answer)
            for i, problem in enumerate(problems) for sample, answer in enumerate(by_problem[i])]


@dataclass
class Report:
    rows: list[dict]
    metrics: dict[str, float]
    problems: int
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """pass@k overall (and per benchmark when there are several), counts and times."""
        several = len({name.split("/", 1)[1] for name in self.metrics if "/" in name}) > 1
        scores = ", ".join(f"{name} {value:.4f}" for name, value in self.metrics.items() if several or "/" not in name)
        times = ", ".join(f"{what} {s:.1f} s" for what, s in self.seconds.items())
        return f"{scores or 'no pass@k'}: {self.problems} problem(s), {self.samples} completion(s) ({times})"


def load_problems(benchmarks: list[str], limit: int = 0, key: str = "--benchmark") -> list[Problem]:
    """The problems of each benchmark (the first `limit` of each when limit > 0); their names (a file's name
    without .jsonl) must differ, since each names its pass@k."""
    names = [benchmark_name(name) for name in benchmarks]
    if len(set(names)) < len(names):
        raise DataError(f"{key}: two benchmarks share a name ({', '.join(names)}); each names its own pass@k")
    return [p for name in benchmarks for p in load_benchmark(name)[:limit or None]]


def run_eval(problems: list[Problem], ks: list[int], sandbox: Sandbox, output: Path, *, model=None, tokenizer=None,
             sampling: Sampling | None = None, batch_size: int = 8, completions_file: Path | None = None,
             workers: int | None = None) -> Report:
    """Score a model's completions (or those of completions_file) on the problems; writes every completion with
    its verdict to `output` (JSONL) and the summary next to it (.summary.json)."""
    seconds = {}
    started = time.perf_counter()
    if completions_file is not None:
        completions = read_completions(completions_file, problems)
    else:
        completions = generate_completions(model, tokenizer, problems, sampling, batch_size)
        seconds["generation"] = time.perf_counter() - started
    started = time.perf_counter()
    rows = execute(completions, sandbox, workers)
    seconds["execution"] = time.perf_counter() - started
    attempted = len({(c.problem.benchmark, c.problem.task_id) for c in completions})
    report = Report(rows, summarize(rows, ks), attempted, len(rows), seconds)
    write_results(output, rows)
    summary = {"metrics": report.metrics, "problems": report.problems, "completions": report.samples,
               "seconds": seconds, "benchmarks": sorted({p.benchmark for p in problems}),
               "sandbox": sandbox.describe(), "sampling": vars(sampling) if sampling else None}
    output.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report
