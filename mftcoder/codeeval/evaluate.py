"""`mftcoder eval`: generate completions for code problems with a model (or read existing ones), execute them in the
sandbox, and report pass@k."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mftcoder.codeeval.problems import Problem, benchmark_name, load_benchmark
from mftcoder.codeeval.sandbox import Sandbox
from mftcoder.codeeval.score import Completion, ResultsFile, execute, summarize
from mftcoder.data.records import DataError
from mftcoder.data.template import saved_template
from mftcoder.infer import Sampling, generate, open_output, prompt_ids


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
    return [Completion(problem, sample, problem.completion(answer), answer,
                       reached_token_limit(tokenizer, answer, sampling.max_new_tokens))
            for i, problem in enumerate(problems) for sample, answer in enumerate(by_problem[i])]


def reached_token_limit(tokenizer, answer: str, max_new_tokens: int) -> bool:
    """Whether generation stopped at max_new_tokens rather than where the model ended the answer: no closed code
    block (generation stops at one) and, tokenized again, at least max_new_tokens - 1 tokens (an answer the model
    ended has at most that many before its end-of-turn token). Decoding and tokenizing again can give fewer tokens
    than were sampled, so a cut answer can be missed; an answer that ended one token short of the limit is counted."""
    if closed_code_block(answer):
        return False
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1


@dataclass
class Report:
    rows: list[dict]
    metrics: dict[str, float]
    problems: int  # attempted: with at least one scored completion
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)
    scorable: int = 0  # problems of the benchmarks that can score a model (not broken)
    broken: dict[Problem, str] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        """The completions cover only some of the scorable problems: pass@k is over those only."""
        return self.problems < self.scorable

    def line(self) -> str:
        """pass@k overall (and per benchmark when there are several), coverage, counts and times."""
        several = len({name.split("/", 1)[1] for name in self.metrics if "/" in name}) > 1
        scores = ", ".join(f"{name} {value:.4f}" for name, value in self.metrics.items() if several or "/" not in name)
        times = ", ".join(f"{what} {s:.1f} s" for what, s in self.seconds.items())
        broken = f", {len(self.broken)} broken problem(s) not scored" if self.broken else ""
        return (f"{scores or 'no pass@k'}: {self.problems} of {self.scorable} problem(s){broken}, "
                f"{self.samples} completion(s) ({times})")

    def warnings(self) -> list[str]:
        """One line per broken problem, and one if the completions cover only part of the problems."""
        lines = [f"warning: {p.benchmark} problem {p.task_id} is broken and not scored: {why}"
                 for p, why in self.broken.items()]
        if self.partial:
            lines.append(f"warning: PARTIAL: completions for only {self.problems} of {self.scorable} problems; pass@k "
                         f"is over those {self.problems} alone and not comparable with a full run (\"partial\": true)")
        return lines


def open_results(path: Path, option: str = "--output") -> ResultsFile:
    """The results file, opened (parents made) before any work, or a one-sentence error naming it."""
    return ResultsFile(path, open_output(path, option))


def load_problems(benchmarks: list[str], limit: int = 0, key: str = "--benchmark") -> list[Problem]:
    """The problems of each benchmark (the first `limit` of each when limit > 0); their names (a file's name
    without .jsonl) must differ, since each names its pass@k."""
    names = [benchmark_name(name) for name in benchmarks]
    if len(set(names)) < len(names):
        raise DataError(f"{key}: two benchmarks share a name ({', '.join(names)}); each names its own pass@k")
    return [p for name in benchmarks for p in load_benchmark(name)[:limit or None]]


def run_eval(problems: list[Problem], ks: list[int], sandbox: Sandbox, results: ResultsFile, *, model=None,
             tokenizer=None, sampling: Sampling | None = None, batch_size: int = 8,
             completions: list[Completion] | None = None, workers: int | None = None,
             broken: dict[Problem, str] | None = None) -> Report:
    """Score a model's completions (or the given ones) on the problems that are not `broken`; writes every
    completion with its verdict to `results` as it is known (JSONL) and the summary next to it (.summary.json)."""
    broken = broken or {}
    scorable = [p for p in problems if p not in broken]
    seconds = {}
    started = time.perf_counter()
    if completions is not None:
        completions = [c for c in completions if c.problem not in broken]
    else:
        completions = generate_completions(model, tokenizer, scorable, sampling, batch_size)
        seconds["generation"] = time.perf_counter() - started
    started = time.perf_counter()
    try:
        rows = execute(completions, sandbox, workers, on_row=results.write)
    finally:
        results.close()
    seconds["execution"] = time.perf_counter() - started
    attempted = len({(c.problem.benchmark, c.problem.task_id) for c in completions})
    report = Report(rows, summarize(rows, ks), attempted, len(rows), seconds, len(scorable), broken)
    summary = {"metrics": report.metrics, "problems": report.problems, "completions": report.samples,
               "coverage": {"attempted": attempted, "problems": len(scorable),
                            "fraction": attempted / len(scorable) if scorable else 0.0},
               "partial": report.partial,
               "broken": [{"benchmark": p.benchmark, "task_id": p.task_id, "reason": why} for p, why in broken.items()],
               "seconds": seconds, "benchmarks": sorted({p.benchmark for p in problems}),
               "sandbox": sandbox.describe(), "sampling": vars(sampling) if sampling else None}
    results.path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report
