"""Epoch order across tasks, micro-batches, and the collator (dynamic padding, labels shifted once)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mftcoder.data.prepare import TaskSamples
from mftcoder.data.tasks import task_rng


def epoch_plan(per_task: list[TaskSamples], weights: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Rows of (task id, record) for one epoch: each task's train split repeated by its sampling weight
    (2.5 = twice plus a random half), then shuffled together. Deterministic from (seed, epoch)."""
    rows = []
    for task_samples, weight in zip(per_task, weights):
        train = task_samples.train
        whole, fraction = int(weight), weight - int(weight)
        picked = [np.tile(train, whole)]
        if fraction > 0:
            rng = task_rng(seed, task_samples.task.name, f"sample-epoch-{epoch}")
            picked.append(rng.choice(train, size=round(fraction * len(train)), replace=False))
        records = np.concatenate(picked)
        rows.append(np.stack([np.full(len(records), task_samples.task.id), records], axis=1))
    plan = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(plan))
    return plan[order].astype(np.int64)


def micro_batches(plan: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Split the plan into global micro-batches of batch_size x world_size rows; return this rank's share.

    Every row lands on exactly one rank; the last global micro-batch may be smaller (a rank may get none).
    """
    global_size = batch_size * world_size
    out = []
    for start in range(0, len(plan), global_size):
        rows = plan[start:start + global_size]
        out.append(rows[rank::world_size])
    return out


def optimizer_steps(batches: list[np.ndarray], accumulation: int) -> list[list[np.ndarray]]:
    """Group micro-batches into optimizer steps of `accumulation` each; the last step may be shorter."""
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


@dataclass
class Batch:
    """A padded micro-batch. targets[b, j] is the token after input_ids[b, j]; loss_mask marks supervised targets."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    targets: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool
    token_task: torch.Tensor  # [B, T] long, task id of each position
    token_sample: torch.Tensor  # [B, T] long, which sample of the batch each position belongs to (unique per batch)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.attention_mask, self.targets, self.loss_mask, self.token_task, self.token_sample)))


def collate(samples: list[tuple[np.ndarray, np.ndarray, int]], pad_id: int, pad_to: int | None = None) -> Batch:
    """Pad (ids, mask, task) samples to the longest one (or to pad_to) and shift the labels once."""
    width = max(len(ids) for ids, _, _ in samples) if samples else 0
    width = max(width, pad_to or 0)
    size = len(samples)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    supervised = torch.zeros((size, width), dtype=torch.bool)
    token_task = torch.zeros((size, width), dtype=torch.long)
    for row, (ids, mask, task) in enumerate(samples):
        n = len(ids)
        input_ids[row, :n] = torch.from_numpy(ids.astype(np.int64))
        attention[row, :n] = 1
        supervised[row, :n] = torch.from_numpy(mask.astype(bool))
        token_task[row] = task
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = torch.zeros_like(supervised)
    loss_mask[:, :-1] = supervised[:, 1:]
    token_sample = torch.arange(size).unsqueeze(1).expand(size, width).contiguous()
    return Batch(input_ids, attention, targets, loss_mask, token_task, token_sample)


class SampleReader(torch.utils.data.Dataset):
    """Maps a micro-batch of (task, record) rows to a collated Batch; usable as a DataLoader dataset."""

    def __init__(self, per_task: list[TaskSamples], pad_id: int, pad_to: int | None = None):
        self.per_task = per_task
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __len__(self) -> int:  # not used for sampling; batches come from the plan
        return sum(len(t.data) for t in self.per_task)

    def __getitem__(self, rows: np.ndarray) -> Batch:
        samples = [(*self.per_task[task].sample(int(record)), int(task)) for task, record in rows]
        return collate(samples, self.pad_id, self.pad_to)
