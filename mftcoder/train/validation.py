"""The validation split as micro-batches, and per-task loss totals over any of them (what evaluation and the
balancers' validation samples share)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mftcoder.config import Config
from mftcoder.data.batching import SampleReader, ValidationStream, arrange_rows, micro_batches, plan_lengths
from mftcoder.data.prepare import PreparedData
from mftcoder.loss import TaskTotals
from mftcoder.objectives import Objective
from mftcoder.train.distributed import DistEnv


class Validation:
    """This rank's share of the validation split, in a fixed order (evaluation) or in seeded shuffles (an endless
    stream of samples, whose position is saved with the checkpoint)."""

    def __init__(self, config: Config, data: PreparedData, reader: SampleReader, env: DistEnv, padding_mode: str,
                 objective: Objective):
        self.config, self.data, self.reader, self.env, self.padding_mode = config, data, reader, env, padding_mode
        self.objective = objective
        self.num_tasks = len(data.tasks)
        self.stream = ValidationStream(lambda passes: self.batches(shuffle=passes))

    def batches(self, shuffle: int | None = None) -> list[list[np.ndarray]]:
        """Micro-batches of the whole split: in a fixed order, or (shuffle=k) in the k-th seeded shuffle."""
        config = self.config
        plan = np.concatenate([np.stack([np.full(len(t.valid), t.task.id), t.valid], axis=1)
                               for t in self.data.per_task]).astype(np.int64)
        if not len(plan):
            return []
        if shuffle is not None:
            plan = plan[np.random.default_rng([config.seed, shuffle, 0xC0BA]).permutation(len(plan))]
        rows = arrange_rows(plan, plan_lengths(self.data.per_task, plan), self.padding_mode,
                            config.seq_length * self.objective.records.parts,
                            config.per_device_valid_batch_size * self.env.world_size,
                            np.random.default_rng(0 if shuffle is None else [config.seed, shuffle]), window=len(plan))
        return micro_batches(rows, config.per_device_valid_batch_size, self.env.rank, self.env.world_size)

    @torch.no_grad()
    def totals(self, runner: torch.nn.Module, batches: list[list[np.ndarray]],
               autocast: contextlib.AbstractContextManager) -> TaskTotals:
        """Per-task loss sums over these micro-batches, summed over ranks (every rank runs every batch: an empty
        share is a 1-token stand-in)."""
        runner.eval()
        totals = TaskTotals.zeros(self.num_tasks, self.objective.metric_names)
        for rows_of_batch in batches:
            batch = self.reader[rows_of_batch].to(self.env.device)
            with autocast:
                totals.add_stats(self.objective.forward(runner, batch, None)[1])
        runner.train()
        return totals.from_tensor(self.env.all_reduce_sum(totals.as_tensor()))

    def sample(self, runner: torch.nn.Module, autocast: contextlib.AbstractContextManager) -> np.ndarray:
        """Per-task validation loss of the stream's next `coba_sample_valid_num` micro-batches (NaN: task absent)."""
        batches = self.stream.take(self.config.coba_sample_valid_num)
        return self.totals(runner, batches, autocast).per_task_loss().numpy()
