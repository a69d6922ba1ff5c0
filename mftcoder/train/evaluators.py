"""What the trainer measures at evaluation time: each evaluator returns named metrics (validation loss; pass@1 of
generated code), and metric_for_best_model picks any of them by name."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch

from mftcoder.balance import Balancer
from mftcoder.codeeval.evaluate import generate_completions, load_problems
from mftcoder.codeeval.problems import benchmark_name
from mftcoder.codeeval.sandbox import Limits, Sandbox, SandboxError
from mftcoder.codeeval.score import execute, summarize
from mftcoder.config import Config, ConfigError
from mftcoder.infer import Sampling
from mftcoder.train.distributed import DistEnv
from mftcoder.train.validation import Validation


class Evaluator(Protocol):
    names: list[str]  # the metrics it returns

    def __call__(self, runner: torch.nn.Module, model: torch.nn.Module, autocast: contextlib.AbstractContextManager,
                 step: int) -> dict[str, float]: ...


class ValidationLoss:
    """Validation loss overall (the training objective over the whole split) and per task (token mean)."""

    def __init__(self, validation: Validation, balancer: Balancer, task_names: list[str], max_batches: int | None):
        self.validation, self.balancer, self.task_names, self.max_batches = validation, balancer, task_names, max_batches
        extras = validation.objective.metric_names
        self.names = ["loss", *(f"loss/{name}" for name in task_names), *extras,
                      *(f"{extra}/{name}" for extra in extras for name in task_names)]

    def __call__(self, runner, model, autocast, step) -> dict[str, float]:
        batches = self.validation.batches()
        if not batches:
            return {}
        totals = self.validation.totals(runner, batches[:self.max_batches or None], autocast)
        metrics = {"loss": totals.objective(self.balancer.loss_mode, self.balancer.objective_weights())}
        metrics.update({f"loss/{n}": float(v) for n, v in zip(self.task_names, totals.per_task_loss())})
        metrics.update(totals.extra_metrics(self.task_names))
        return metrics


class GenerationPassRate:
    """pass@1 of greedy completions for the first `generation_eval_problems` problems of each benchmark, executed in
    the sandbox; every rank takes its share of the problems, then all ranks score the gathered results. Each
    evaluation's completions and verdicts go to output_dir/generation_eval/step-N.jsonl."""

    def __init__(self, config: Config, tokenizer, env: DistEnv, output_dir: Path, sharded: bool):
        limit = max(0, config.generation_eval_problems)  # -1: all
        self.problems = load_problems(config.generation_eval, limit, key="generation_eval")
        self.names = ["pass@1", *(f"pass@1/{benchmark_name(name)}" for name in config.generation_eval)]
        try:
            self.sandbox = Sandbox(Limits(timeout=config.generation_eval_timeout))
        except SandboxError as exc:
            raise ConfigError(f"generation_eval: {exc}") from None
        self.sampling = Sampling(max_new_tokens=config.generation_eval_max_new_tokens)
        self.tokenizer, self.env, self.sharded = tokenizer, env, sharded
        self.batch_size, self.folder = config.generation_eval_batch_size, output_dir / "generation_eval"

    def __call__(self, runner, model, autocast, step) -> dict[str, float]:
        env = self.env
        share = self.problems[env.rank::env.world_size]
        # Sharded weights: every rank runs as many generation batches and forward passes (synced_gpus), padded
        # with a repeated problem whose result is not counted.
        rounds = -(-len(self.problems) // env.world_size)
        padded = share + [self.problems[0]] * (rounds - len(share)) if self.sharded else share
        devices = [env.device] if env.device.type == "cuda" else []
        model.eval()
        with torch.random.fork_rng(devices=devices), autocast, _gathered_root(runner if self.sharded else None):
            completions = generate_completions(model, self.tokenizer, padded, self.sampling, self.batch_size,
                                               progress=False, synced_gpus=self.sharded)[:len(share)]
        runner.train()
        rows = self._gathered(execute(completions, self.sandbox, progress=False))
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"step-{step}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return summarize(rows, [1])

    def _gathered(self, rows: list[dict]) -> list[dict]:
        """Every rank's result rows, on every rank."""
        if not self.env.distributed:
            return rows
        import torch.distributed as dist

        gathered: list = [None] * self.env.world_size
        dist.all_gather_object(gathered, rows)  # plain dicts this run produced
        return [row for part in gathered for row in part]


@contextlib.contextmanager
def _gathered_root(runner: torch.nn.Module | None):
    """FSDP2: the root unit's own parameters (embeddings, final norm, head) gathered while the model is called
    directly (the decoder layers gather themselves); without FSDP, nothing."""
    if runner is None:
        yield
        return
    runner._get_fsdp_state()._lazy_init()  # as the root's first forward would: the layers are not roots themselves
    runner.unshard()
    try:
        yield
    finally:
        runner.reshard()


def make_evaluators(config: Config, validation: Validation, balancer: Balancer, task_names: list[str], tokenizer,
                    env: DistEnv, output_dir: Path, sharded: bool) -> list[Evaluator]:
    evaluators: list[Evaluator] = [ValidationLoss(validation, balancer, task_names, config.valid_iters)]
    if config.generation_eval:
        evaluators.append(GenerationPassRate(config, tokenizer, env, output_dir, sharded))
    return evaluators
