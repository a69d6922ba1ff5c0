"""Epoch order across tasks, rows (one sample, or whole samples packed), micro-batches, and the collator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from mftcoder.data.prepare import TaskSamples
from mftcoder.data.tasks import task_rng

PACK_WINDOW = 1000  # samples packed together: larger packs tighter, smaller keeps the order more random


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


def plan_lengths(per_task: list[TaskSamples], plan: np.ndarray) -> np.ndarray:
    """Token length (after truncation) of every (task, record) row of a plan."""
    lengths = np.zeros(len(plan), dtype=np.int64)
    for t in per_task:
        rows = plan[:, 0] == t.task.id
        lengths[rows] = t.lengths[plan[rows, 1]]
    return lengths


def pack_first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into lengths) of total length <= capacity: longest first, each into the
    first bin with room."""
    bins: list[list[int]] = []
    room = np.zeros(0, dtype=np.int64)
    for index in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room >= lengths[index])
        if len(fits):
            bins[fits[0]].append(int(index))
            room[fits[0]] -= lengths[index]
        else:
            bins.append([int(index)])
            room = np.append(room, capacity - lengths[index])
    return bins


def arrange_rows(plan: np.ndarray, lengths: np.ndarray, mode: str, seq_length: int, group: int,
                 rng: np.random.Generator, window: int = PACK_WINDOW) -> list[np.ndarray]:
    """Turn a shuffled plan into model rows, each an array of (task, record) samples.

    pack: whole samples packed into rows of seq_length (first-fit-decreasing within windows of the plan,
    then the rows shuffled, so the order stays random); dynamic: one sample per row, similar lengths grouped
    into runs of `group` rows (sorted within windows, runs shuffled); padding: one sample per row, plan order.
    """
    if mode == "padding":
        return [plan[i:i + 1] for i in range(len(plan))]
    rows: list[np.ndarray] = []
    step = window if mode == "pack" else group * 32
    for start in range(0, len(plan), step):
        part, part_lengths = plan[start:start + step], lengths[start:start + step]
        if mode == "pack":
            chunk = [part[b] for b in pack_first_fit_decreasing(part_lengths, seq_length)]
            rows += [chunk[i] for i in rng.permutation(len(chunk))]
        else:
            order = np.argsort(part_lengths, kind="stable")
            runs = [order[i:i + group] for i in range(0, len(order), group)]
            rows += [part[i:i + 1] for run in (runs[k] for k in rng.permutation(len(runs))) for i in run]
    return rows


def micro_batches(rows: list[np.ndarray], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[np.ndarray]]:
    """Split rows into global micro-batches of batch_size x world_size rows; return this rank's share of each.

    Every row lands on exactly one rank; the last global micro-batch may be smaller (a rank may get none).
    """
    global_size = batch_size * world_size
    return [rows[start:start + global_size][rank::world_size] for start in range(0, len(rows), global_size)]


class ValidationStream:
    """An endless, seeded walk over this rank's validation micro-batches, a fresh shuffle each pass. Its position
    (pass, batch) is its whole state, so a resumed run draws the same batches; every rank draws in step."""

    def __init__(self, arrange: Callable[[int], list]):
        self.arrange = arrange  # pass number -> this rank's micro-batches of that pass
        self.passes, self.position = 0, 0
        self._batches: list | None = None

    def take(self, count: int) -> list:
        taken = []
        while len(taken) < count:
            if self._batches is None:
                self._batches = self.arrange(self.passes)
                if not self._batches:
                    raise ValueError("the validation split is empty: nothing to sample")
            if self.position == len(self._batches):
                self.passes, self.position, self._batches = self.passes + 1, 0, None
                continue
            taken.append(self._batches[self.position])
            self.position += 1
        return taken

    def state_dict(self) -> dict:
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.position, self._batches = state.get("passes", 0), state.get("position", 0), None


def optimizer_steps(batches: list, accumulation: int) -> list[list]:
    """Group micro-batches into optimizer steps of `accumulation` each; the last step may be shorter."""
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


@dataclass
class Batch:
    """A padded micro-batch. targets[b, j] is the token after input_ids[b, j] in the same sample; loss_mask
    marks supervised targets. Packed rows carry position_ids that restart at every sample (and no attention
    mask: the model then isolates the samples)."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    targets: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool
    token_task: torch.Tensor  # [B, T] long, task id of each position
    token_sample: torch.Tensor  # [B, T] long, which sample of the batch each position belongs to (unique per batch)
    position_ids: torch.Tensor | None = None  # [B, T] long, packed rows only
    # An example is what the objective keeps together (one sequence, or a preference pair's two): its id (its place
    # in the micro-batch's rows, -1 on padding) and each sequence's part within it (0 chosen, 1 rejected). Rows never split one.
    token_example: torch.Tensor | None = None  # [B, T] long
    token_part: torch.Tensor | None = None  # [B, T] long
    reference_logps: torch.Tensor | None = None  # [B, T] float64: a sequence's reference log-prob at its first target

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fill(self) -> float:
        """Real tokens over the batch's capacity (padding or packing efficiency)."""
        return self.num_tokens / max(1, self.attention_mask.numel())

    def split_rows(self, max_tokens: int) -> list["Batch"]:
        """Consecutive rows in pieces of at most max_tokens positions (at least one row each); 0: no split.
        Running the pieces one by one bounds activation memory; the step's loss is unchanged."""
        rows, width = self.input_ids.shape
        per_piece = max(1, max_tokens // max(1, width)) if max_tokens > 0 else rows
        if per_piece >= rows:
            return [self]
        cuts = [0]  # a piece ends only where the next row starts another example (a pair's rows stay together)
        row_example = self.token_example[:, 0].tolist() if self.token_example is not None else list(range(rows))
        for row in range(1, rows):
            if row - cuts[-1] >= per_piece and row_example[row] != row_example[row - 1]:
                cuts.append(row)
        cuts.append(rows)
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return [Batch(**{k: v[start:end] if v is not None else None for k, v in parts.items()})
                for start, end in zip(cuts, cuts[1:])]

    def flattened(self) -> "Batch":
        """The rows one after another as a single row ([1, B*T]; loss_mask order unchanged). Packed samples then stay
        apart in attention kernels that read sample boundaries from restarting position_ids only in a batch of one
        row (flash-attention); each row's trailing padding restarts its positions too, so it is a segment of its own."""
        return self if self.input_ids.shape[0] == 1 else self._map(lambda t: t.reshape(1, -1))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (the DataLoader calls this with pin_memory=True), so that .to(cuda) runs asynchronously."""
        return self._map(torch.Tensor.pin_memory)

    def stand_in(self) -> "Batch":
        """A loss-free forward pass of one token (this batch's first), counted as no token: what a rank runs to keep
        in step with ranks that have more passes."""
        return stand_in(int(self.input_ids[0, 0]))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in dataclasses.fields(self)})


class Sample(NamedTuple):
    """One sequence as collate takes it: input ids, loss mask over input tokens, task id, and (for objectives whose
    examples hold several sequences) its example's id, its part and its reference log-prob."""

    ids: np.ndarray
    mask: np.ndarray
    task: int
    example: int = -1  # -1: an example of its own
    part: int = 0
    reference: float = 0.0


def collate(rows: list[list[Sample]], pad_id: int, pad_to: int | None = None, packed: bool = False) -> Batch:
    """Pad rows of samples (one sample per row unless packed) to the longest row or to pad_to, shift labels
    once within each sample, and give each sample its own id (and, packed, its own positions)."""
    width = max((sum(len(s[0]) for s in row) for row in rows), default=0)
    width = max(width, pad_to or 0)
    size = len(rows)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    targets = torch.full((size, width), pad_id, dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    loss_mask = torch.zeros((size, width), dtype=torch.bool)
    token_task = torch.zeros((size, width), dtype=torch.long)
    token_sample = torch.full((size, width), -1, dtype=torch.long)
    token_example = torch.full((size, width), -1, dtype=torch.long)
    token_part = torch.zeros((size, width), dtype=torch.long)
    reference = torch.zeros((size, width), dtype=torch.float64)
    positions = torch.zeros((size, width), dtype=torch.long)
    sample_id = 0
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            ids, mask, task, example, part, logp = Sample(*sample)
            n, end = len(ids), start + len(ids)
            ids_t = torch.from_numpy(ids.astype(np.int64))
            input_ids[r, start:end] = ids_t
            targets[r, start:end - 1] = ids_t[1:]
            loss_mask[r, start:end - 1] = torch.from_numpy(mask[1:].astype(bool))
            attention[r, start:end] = 1
            token_task[r, start:end] = task
            token_sample[r, start:end] = sample_id
            token_example[r, start:end] = example if example >= 0 else -2 - sample_id  # unique either way
            token_part[r, start:end] = part
            if logp:  # only a preference objective's cached reference gives one (the search costs per sample)
                supervised = loss_mask[r, start:end].nonzero()
                if len(supervised):
                    reference[r, start + int(supervised[0])] = logp
            positions[r, start:end] = torch.arange(n)
            sample_id, start = sample_id + 1, end
        positions[r, start:] = torch.arange(width - start)  # trailing padding: a segment of its own
        token_sample[r, start:] = sample_id
        sample_id += 1
    return Batch(input_ids, attention, targets, loss_mask, token_task, token_sample, positions if packed else None,
                 token_example, token_part, reference)


class SampleReader(torch.utils.data.Dataset):
    """Maps a micro-batch (a list of rows of (task, record)) to a collated Batch; a DataLoader dataset. Each record is
    an example of one or more sequences: packed, a row holds its examples' sequences one after another; otherwise
    every sequence is a row of its own, an example's rows side by side. `reference`: per task, each example's
    reference log-probs [records, parts] (preference objectives with a precomputed reference)."""

    def __init__(self, per_task: list[TaskSamples], pad_id: int, pad_to: int | None = None, packed: bool = False,
                 reference: list[np.ndarray] | None = None):
        self.per_task = per_task
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.packed = packed
        self.reference = reference

    def __len__(self) -> int:  # not used for sampling; batches come from the plan
        return sum(len(t.data) for t in self.per_task)

    def __getitem__(self, rows: list[np.ndarray]) -> Batch:
        if not rows:  # this rank's share of the last global batch is empty, but collectives need a forward
            return self.stand_in()
        examples = [[(int(task), int(record)) for task, record in row] for row in rows]
        numbered = iter(range(sum(map(len, examples))))  # an example's id: its place in the micro-batch
        samples = [[sample for task, record in row for sample in self.example(task, record, next(numbered))]
                   for row in examples]
        if not self.packed:
            samples = [[sample] for row in samples for sample in row]
        return collate(samples, self.pad_id, self.pad_to, self.packed)

    def example(self, task: int, record: int, example: int) -> list[Sample]:
        """The example's sequences, in part order, under the id `example`."""
        logps = self.reference[task][record] if self.reference is not None else None
        return [Sample(ids, mask, task, example, part, float(logps[part]) if logps is not None else 0.0)
                for part, (ids, mask) in enumerate(self.per_task[task].sequences(record))]

    def stand_in(self) -> Batch:
        return stand_in(self.pad_id)


def stand_in(token_id: int) -> Batch:
    """One token, packed (no attention mask to fully mask), carrying no loss and counted as no token."""
    batch = collate([[Sample(np.array([token_id]), np.zeros(1, dtype=np.uint8), 0)]], token_id, packed=True)
    batch.attention_mask.zero_()
    return batch
