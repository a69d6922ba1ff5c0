"""The training loop, readable top to bottom: set up, then optimizer steps with logs, evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mftcoder.balance import Observation, make_balancer
from mftcoder.config import Config, ConfigError, check_metric_name, resolve_for_world, to_dict
from mftcoder.data.batching import (Batch, SampleReader, arrange_rows, epoch_plan, micro_batches, optimizer_steps,
                                    plan_lengths)
from mftcoder.data.prepare import PreparedData, prepare_data
from mftcoder.data.tasks import per_task_values
from mftcoder.loss import StepCounts, TaskTotals
from mftcoder.model import load_tokenizer
from mftcoder.objectives import Objective, StepLoss, make_objective
from mftcoder.objectives.base import RunParts
from mftcoder.plan.check import PlanCheck
from mftcoder.train import checkpoint as ckpt
from mftcoder.train.distributed import DistEnv, Parallelism, init_distributed, shutdown
from mftcoder.train.evaluators import make_evaluators
from mftcoder.train.metrics import Interval, MetricsLogger, note
from mftcoder.train.plots import write_curves
from mftcoder.train.run_folder import RunFolder, clear_earlier_runs
from mftcoder.train.stop import StopAtStepEnd
from mftcoder.train.schedule import learning_rate
from mftcoder.train.model_setup import set_up_model
from mftcoder.train.validation import Validation


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says why."""


@dataclass
class RunResult:
    output_dir: Path
    final_checkpoint: Path
    state: ckpt.TrainerState
    step_losses: list[float] = field(default_factory=list)  # the objective of each step run in this process
    evaluations: list[dict] = field(default_factory=list)
    tokens_seen: int = 0  # real (non-pad) input tokens trained on, all ranks
    supervised_tokens_seen: int = 0  # loss units (supervised tokens; pairs for a preference objective), all ranks
    train_seconds: float = 0.0  # wall time of the optimizer steps (no evaluation, no saving)
    stopped_by: int = 0  # the signal (SIGTERM, SIGINT) that ended the run early after a checkpoint, 0 if none


def accumulate_gradients(runner: torch.nn.Module, batches: list[Batch], objective: Objective, counts: StepCounts,
                         mode: str, task_weights: torch.Tensor, parallel: Parallelism, totals: TaskTotals,
                         autocast: contextlib.AbstractContextManager, max_forward_tokens: int = 0) -> float:
    """Forward and backward every micro-batch of one optimizer step (each in passes of at most
    max_forward_tokens positions, never splitting an example); returns the step's objective.

    Weights come from step-level counts, so the summed gradient equals that of one big batch; under
    data parallelism each rank's share is scaled by the world size because DDP and FSDP average gradients. Every rank
    runs as many passes (env.lockstep), since each is a collective under FSDP.
    """
    env, step_loss = parallel.env, 0.0
    passes, real_passes = env.lockstep([piece for batch in batches for piece in batch.split_rows(max_forward_tokens)])
    for i, batch in enumerate(passes):
        aux_scale = 1.0 / real_passes if batch.num_tokens else 0.0  # a model's auxiliary loss: its mean over the step
        batch = batch.to(env.device)
        with parallel.gradient_sync(runner, sync=i == len(passes) - 1):
            with autocast:
                output = objective.forward(runner, batch, StepLoss(counts, mode, task_weights, aux_scale))
            loss = parallel.loss(batch, output)
            (loss * env.world_size).backward()
        step_loss += float(loss.detach())
        totals.add_stats(output[1])
    return float(env.all_reduce_sum(torch.tensor([step_loss], dtype=torch.float64))[0])


class Trainer:
    """Holds one run's parts; `run()` is the loop."""

    def __init__(self, config: Config, env: DistEnv):
        self.config = config = resolve_for_world(config, env.world_size)
        self.env = env
        self.output_dir = Path(config.output_dir or "outputs")
        self.folder = RunFolder.claim(self.output_dir, env.is_main)  # before any work: writable, and ours alone
        try:
            self._set_up(config, env)
        except BaseException:
            self.folder.release()
            raise

    def _set_up(self, config: Config, env: DistEnv) -> None:
        torch.manual_seed(config.seed)
        self.objective = make_objective(config)
        self._build_data(config, env)
        self._build_model(config, env)
        self._build_batches(config, env)
        self._build_schedule(config)
        self.plan_check = PlanCheck.start(config, env, self.total_steps, self.steps_per_epoch, self.padding_mode)
        self.state = ckpt.TrainerState()
        tb_dir = Path(config.tensorboard_dir) if config.tensorboard_dir else self.output_dir / "runs"
        resumed = ckpt.read_state(self.resume_from) if self.resume_from else None
        self.logger = MetricsLogger(self.output_dir, tb_dir, enabled=env.is_main, resumed=resumed)
        self.result = RunResult(self.output_dir, self.output_dir, self.state)
        self.interval = self._new_interval()

    def _build_data(self, config: Config, env: DistEnv) -> None:
        """Tokenizer and template, the tasks' samples, the balancer; the run folder checked against a resume."""
        self.tokenizer, self.template = load_tokenizer(config)
        self.data: PreparedData = prepare_data(config, self.tokenizer, self.template, records=self.objective.records)
        self._set_up_tasks(config)
        self.layout = {"world_size": env.world_size, "data": {t.task.name: t.data.digest for t in self.data.per_task}}
        if env.is_main:
            ckpt.remove_incomplete(self.output_dir)  # a save that crashed: its leftovers go, a set-aside one returns
        env.barrier()
        self.resume_from = ckpt.resume_checkpoint(config.resume_from_checkpoint, self.output_dir, env, note)
        if self.resume_from is not None:
            ckpt.check_resume(self.resume_from, to_dict(config), self.layout, note if env.is_main else None)
        if env.is_main:
            clear_earlier_runs(self.output_dir, self.resume_from, config.overwrite_output_dir, note)
        env.barrier()

    def _build_model(self, config: Config, env: DistEnv) -> None:
        """The model as it trains (see train/model_setup.py) and the batch shape decided on it."""
        setup = set_up_model(config, env, self.tokenizer, self.template, self.data.per_task, self.resume_from,
                             self.output_dir)
        self.model, self.runner, self.optimizer, self.parallel = setup.model, setup.runner, setup.optimizer, setup.parallel
        self.autocast, self.forward_tokens, self.save_dtype = setup.autocast, setup.forward_tokens, setup.save_dtype
        self.padding_mode = self.layout["padding_mode"] = setup.padding_mode

    def _build_batches(self, config: Config, env: DistEnv) -> None:
        """The collator, the objective's own set-up (a reference model), the validation split and the evaluators."""
        pad_to = config.seq_length if self.padding_mode == "padding" else None
        self.row_capacity = config.seq_length * self.objective.records.parts  # a packed row holds a whole example
        self.reader = SampleReader(self.data.per_task, self.tokenizer.pad_token_id, pad_to,
                                   packed=self.padding_mode == "pack")
        self.objective.set_up(RunParts(self.model, self.runner, self.reader, self.data, env, self.autocast,
                                       self.output_dir, self.resume_from is not None, self.padding_mode))
        self.validation = Validation(config, self.data, self.reader, env, self.padding_mode, self.objective)
        self.evaluators = make_evaluators(config, self.validation, self.balancer, self.task_names, self.tokenizer, env,
                                          self.output_dir, self.parallel.sharded)
        check_metric_name(config, [name for evaluator in self.evaluators for name in evaluator.names])

    def _build_schedule(self, config: Config) -> None:
        """Steps per epoch and in all."""
        epoch_lengths = [len(self._epoch_steps(e)) for e in range(config.num_train_epochs)]  # packing varies a little
        self.steps_per_epoch = epoch_lengths[0]
        total = sum(epoch_lengths)
        if total == 0:
            raise ConfigError(f"no training steps: the training split holds {sum(len(t.train) for t in self.data.per_task)}"
                              f" sample(s) (data_split {config.data_split!r}, data_weights {config.data_weights})")
        self.total_steps = min(total, config.max_steps) if config.max_steps > 0 else total

    def _new_interval(self) -> "Interval":
        return Interval(TaskTotals.zeros(self.num_tasks, self.objective.metric_names))

    def _set_up_tasks(self, config: Config) -> None:
        """Task names, the balancer with the task weights, and the sampling weights."""
        self.num_tasks = len(self.data.tasks)
        self.task_names = [t.name for t in self.data.tasks]
        task_weights = np.array(per_task_values("task_weights", config.task_weights, self.data.tasks))
        if task_weights.sum() <= 0:
            raise ConfigError("task_weights: at least one task needs a positive weight")
        self.balancer = make_balancer(config, self.task_names, task_weights)
        if self.balancer.needs_validation and not all(len(t.valid) for t in self.data.per_task):
            empty = [t.task.name for t in self.data.per_task if not len(t.valid)]
            raise ConfigError(f"weighted_loss_mode: {config.weighted_loss_mode} weighs tasks by their validation loss, "
                              f"and task(s) {', '.join(empty)} have no validation samples (data_split "
                              f"{config.data_split!r}); give the split a validation part, e.g. '95,5,0'")
        self.sampling_weights = per_task_values("data_weights", config.data_weights, self.data.tasks)

    # --- set-up helpers -------------------------------------------------------------------------
    def _epoch_steps(self, epoch: int) -> list[list[np.ndarray]]:
        config = self.config
        plan = epoch_plan(self.data.per_task, self.sampling_weights, config.seed, epoch)
        rows = arrange_rows(plan, plan_lengths(self.data.per_task, plan), self.padding_mode, self.row_capacity,
                            config.per_device_train_batch_size * self.env.world_size,
                            np.random.default_rng([config.seed, epoch, 0xA11]))
        batches = micro_batches(rows, config.per_device_train_batch_size, self.env.rank, self.env.world_size)
        return optimizer_steps(batches, config.gradient_accumulation_steps)

    def resume(self) -> None:
        """Restore optimizer, RNG, data position and trainer state (and a LoRA adapter) from the checkpoint."""
        if self.resume_from is None:
            return
        self.state = ckpt.restore_training_state(self.resume_from, self.runner, self.optimizer, self.parallel)
        self.balancer.load_state_dict(self.state.balancer)
        self.validation.stream.load_state_dict(self.state.validation_stream)
        self.result.state = self.state
        if self.state.step_in_epoch == len(self._epoch_steps(self.state.epoch)):  # older checkpoints were saved
            self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0  # before their epoch's end
        if self.env.is_main:
            tqdm.write(f"resumed from {self.resume_from} at step {self.state.step} (epoch {self.state.epoch})")

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        config, state = self.config, self.state
        if config.evaluate_before_training and state.step == 0 and "no" != config.evaluation_strategy:
            self.evaluate(record=False)
        if state.step == 0:
            self._observe(np.full(self.num_tasks, np.nan))  # the balancer's starting point
        with tqdm(total=self.total_steps, initial=state.step, desc="train", disable=not self.env.is_main,
                  dynamic_ncols=True) as progress, \
                StopAtStepEnd(note if self.env.is_main else None) as self.stop:  # SIGTERM/SIGINT
            early_stop = False
            while not early_stop and state.epoch < config.num_train_epochs and state.step < self.total_steps:
                steps = self._epoch_steps(state.epoch)
                for batches in self._prefetch(steps[state.step_in_epoch:][:self.total_steps - state.step]):
                    loss = self.train_step(batches)
                    state.step += 1
                    state.step_in_epoch += 1
                    self._observe(self.step_task_losses)
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr(state.step - 1):.2e}")
                    if state.step % config.log_interval == 0 or state.step == self.total_steps:
                        self.log_train()
                    early_stop = self.after_step(epoch_done=state.step_in_epoch == len(steps))
                    if early_stop:
                        break
        self.result.final_checkpoint = self.save(f"checkpoint-{state.step}", only_if_missing=True)
        self.plan_check.end(self.result.train_seconds, len(self.result.step_losses))
        if config.plot_curves and self.env.is_main:
            drawn = write_curves(self.output_dir)
            tqdm.write(f"curves: {drawn}" if drawn else "note: no curves.png: matplotlib is not installed "
                       "(pip install 'mftcoder[plot]')")
        self.close()
        return self.result

    def close(self) -> None:
        """Close the logs and let go of output_dir (a later run may use it)."""
        self.logger.close()
        self.folder.release()

    def _prefetch(self, steps: list[list[np.ndarray]]):
        """Collated micro-batches grouped per optimizer step (DataLoader workers when num_workers > 0)."""
        flat = [rows for step in steps for rows in step]
        loader = torch.utils.data.DataLoader(self.reader, sampler=flat, batch_size=None, collate_fn=_identity,
                                             num_workers=self.config.num_workers,
                                             pin_memory=self.env.device.type == "cuda",  # so .to(cuda) is asynchronous
                                             generator=torch.Generator().manual_seed(self.config.seed))
        iterator = iter(loader)
        for step in steps:
            yield [next(iterator) for _ in step]

    def _lr(self, step: int) -> float:
        c = self.config
        return learning_rate(step, kind=c.lr_scheduler_type, peak=c.learning_rate, total_steps=self.total_steps,
                             warmup_steps=c.num_warmup_steps, min_lr=c.min_lr)

    def train_step(self, batches: list[Batch]) -> float:
        """One optimizer update over the step's micro-batches; a non-finite loss skips the update."""
        started = time.perf_counter()
        try:
            return self._train_step(batches)
        finally:
            self.result.train_seconds += time.perf_counter() - started

    def _train_step(self, batches: list[Batch]) -> float:
        config, state = self.config, self.state
        self.step_task_losses = np.full(self.num_tasks, np.nan)  # what the balancer sees of a skipped step
        self.interval.balance = self.balancer.metrics()  # the weights this step trains with
        self.runner.train()
        counts = self.objective.step_counts(batches, self.num_tasks)
        counts = StepCounts(*self.env.all_reduce_sum(torch.stack([counts.tokens, counts.samples])))
        step_totals = self.interval.totals.zeros_like()
        loss = accumulate_gradients(self.runner, batches, self.objective, counts, self.balancer.loss_mode,
                                    self.balancer.weights(), self.parallel, step_totals, self.autocast,
                                    self.forward_tokens)
        tokens, capacity = (int(x) for x in self.env.all_reduce_sum(torch.tensor(
            [sum(b.num_tokens for b in batches), sum(b.attention_mask.numel() for b in batches)])))
        self.interval.tokens += tokens
        self.interval.capacity += capacity
        self.result.tokens_seen += tokens
        self.result.supervised_tokens_seen += int(counts.tokens.sum())
        if not math.isfinite(loss):
            return self._skip_update(loss, "loss")
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(state.step)
        max_norm = config.max_grad_norm if config.max_grad_norm else float("inf")
        self.interval.grad_norm = self.parallel.clip_gradients(self.runner, self.optimizer, max_norm)
        if not math.isfinite(self.interval.grad_norm):
            return self._skip_update(loss, "gradient norm")
        state.nonfinite_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_totals = step_totals.from_tensor(self.env.all_reduce_sum(step_totals.as_tensor()))
        self.interval.totals.merge(step_totals)
        self.step_task_losses = step_totals.per_task_loss().numpy()
        self.interval.losses.append(loss)
        self.result.step_losses.append(loss)
        return loss

    def _skip_update(self, loss: float, what: str) -> float:
        """A NaN/inf loss or gradient norm: no update (the step still counts); too many in a row stop the run."""
        state = self.state
        self.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        self.logger.log("train", state.step + 1, {"nonfinite_skipped": state.nonfinite_total})
        if state.nonfinite_in_row >= self.config.max_nonfinite_steps:
            raise TrainingError(f"the {what} was NaN or infinite for {state.nonfinite_in_row} steps in a row "
                                f"(at step {state.step + 1}); lower learning_rate or check the data")
        return loss

    def log_train(self) -> None:
        interval, elapsed = self.interval, time.perf_counter() - self.interval.started
        metrics = {"loss": float(np.mean(interval.losses)) if interval.losses else float("nan")}
        metrics.update({f"loss/{n}": float(v) for n, v in zip(self.task_names, interval.totals.per_task_loss())
                        if not math.isnan(v)})  # a task absent from the interval has no loss to show
        metrics.update(interval.totals.extra_metrics(self.task_names))  # e.g. a preference objective's rewards
        metrics.update({"lr": self._lr(self.state.step - 1), "grad_norm": interval.grad_norm,
                        "tokens_per_s": interval.tokens / max(elapsed, 1e-9),
                        "packing_efficiency": interval.tokens / max(1, interval.capacity),
                        "epoch": self.state.epoch + self.state.step_in_epoch / max(1, self.steps_per_epoch),
                        **interval.balance})
        if self.env.device.type == "cuda":  # this (the main) process's peak since it started
            metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.logger.log("train", self.state.step, metrics)
        self.interval = self._new_interval()

    def after_step(self, epoch_done: bool) -> bool:
        """Evaluation and checkpoints after an optimizer step, the epoch's end included when the step ends one:
        all of it before the checkpoint is written, so a run resumed from it has nothing of this step to redo.
        True means stop early."""
        config, state = self.config, self.state
        if (("steps" in config.evaluation_strategy and state.step % config.evaluation_steps == 0)
                or (epoch_done and "epoch" in config.evaluation_strategy)):
            self.evaluate()
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
        if (("steps" in config.save_strategy and state.step % config.checkpointing_steps == 0)
                or (epoch_done and "epoch" in config.save_strategy)):
            self.save(f"checkpoint-{state.step}")
        if epoch_done and config.extra_save_by_epoch:
            self.save(f"checkpoint-epoch-{state.epoch}", only_if_missing=True)
        self.result.stopped_by = self.stop.agreed(self.env.all_reduce_max)  # every rank stops after the same step
        return self._early_stop() or self.result.stopped_by != 0

    def _early_stop(self) -> bool:
        patience = self.config.early_stopping_patience
        if patience > 0 and self.state.evals_without_improvement >= patience:
            if self.env.is_main:
                tqdm.write(f"early stopping: {patience} evaluations without improvement of "
                           f"{self.config.metric_for_best_model} (best {self.state.best_metric:.4f})")
            return True
        return False

    # --- evaluation and checkpoints -------------------------------------------------------------
    def evaluate(self, record: bool = True) -> dict | None:
        """Every evaluator's metrics (validation loss, pass@1, ...), logged and, when recorded, ranked."""
        metrics = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator(self.runner, self.model, self.autocast, self.state.step))
        if not metrics:
            return None
        self.logger.log("eval", self.state.step, metrics)
        self.result.evaluations.append({"step": self.state.step, **metrics})
        if record and self.config.metric_for_best_model in metrics:
            self._track_best(metrics)
        return metrics

    def _observe(self, train_losses: np.ndarray) -> None:
        """Let the balancer see this step (its weights for the next step may change)."""
        self.balancer.update(Observation(self.state.step, train_losses,
                                         lambda: self.validation.sample(self.runner, self.autocast)))

    def _track_best(self, metrics: dict) -> None:
        state, config = self.state, self.config
        value = metrics[config.metric_for_best_model]
        better = state.best_metric is None or (value > state.best_metric if config.greater_is_better
                                               else value < state.best_metric)
        if better:
            state.best_metric = value
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        state.last_eval = {"step": state.step, "metric": value, "improved": better}

    def save(self, name: str, only_if_missing: bool = False) -> Path:
        """Save a checkpoint (main process), record its metric, and apply save_total_limit."""
        state, path = self.state, self.output_dir / name
        if only_if_missing and ckpt.is_complete(path):
            return path
        if state.last_eval and state.last_eval["step"] == state.step and ckpt.STEP_NAME.match(name):
            state.checkpoint_metrics[name] = state.last_eval["metric"]
            if state.last_eval["improved"]:
                state.best_checkpoint = name
        state.metrics_bytes = self.logger.position()
        state.balancer, state.validation_stream = self.balancer.state_dict(), self.validation.stream.state_dict()
        ckpt.save_checkpoint(self.output_dir, name, self.model, self.runner, self.tokenizer, self.optimizer, state,
                             {"config.json": to_dict(self.config), "layout.json": self.layout}, self.parallel,
                             self.save_dtype)
        if self.env.is_main:
            ckpt.apply_retention(self.output_dir, self.config.save_total_limit, state.best_checkpoint)
        self.env.barrier()
        return path


def _identity(x):
    return x


def train(config: Config) -> RunResult:
    """Run `mftcoder train` for a validated config (single process or one rank under torchrun)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is enough; saving shards is quick
    env = init_distributed()
    # On an error this rank leaves at once (no barrier: the others may be inside a collective); torchrun
    # then ends the other ranks, so a failure on one rank never hangs the job.
    trainer = Trainer(config, env)
    try:
        trainer.resume()
        result = trainer.run()
    finally:
        trainer.close()
    del trainer  # release DDP/FSDP before leaving the process group (an occasional abort at exit otherwise)
    shutdown(env)
    return result
