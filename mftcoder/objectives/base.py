"""The objective interface: the trainer's one seam for what differs between SFT, preference training and
pretraining. SFT is the plain implementation; the others override what they change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mftcoder.config import Config
from mftcoder.data.batching import Batch
from mftcoder.data.tokenize import Conversations
from mftcoder.loss import PassStats, StepCounts


@dataclass
class StepLoss:
    """How one training pass weighs its losses: the step's counts (all micro-batches, all ranks), the
    weighted_loss_mode, the task weights, and the share of the model's auxiliary loss."""

    counts: StepCounts
    mode: str
    task_weights: torch.Tensor
    aux_scale: float = 1.0


@dataclass
class RunParts:
    """What an objective may need of the run once the model is placed and wrapped."""

    model: torch.nn.Module  # the user's model (PEFT-wrapped with LoRA)
    runner: torch.nn.Module  # SupervisedLM around it, wrapped by the engine
    reader: object  # the SampleReader batches come from
    data: object  # PreparedData
    env: object  # DistEnv
    autocast: object
    output_dir: Path
    resuming: bool
    padding_mode: str


class Objective:
    """records: what a JSONL record holds and how it is tokenized (one sequence, or several kept together as one
    example); step_counts: the step's loss units per task; forward: one pass's loss and what it measured."""

    name = "sft"
    records: Conversations = Conversations()
    metric_names: tuple[str, ...] = ()  # extra per-task metrics logged beside the loss

    def __init__(self, config: Config | None = None):
        self.config = config

    def set_up(self, parts: RunParts) -> None:
        """Called once the model is placed and wrapped (a preference objective finds its reference model here)."""

    def step_counts(self, batches: list[Batch], num_tasks: int) -> StepCounts:
        return StepCounts.of(batches, num_tasks)

    def forward(self, runner: torch.nn.Module, batch: Batch,
                step: StepLoss | None) -> tuple[torch.Tensor, PassStats]:
        """The pass's loss to backpropagate (step None: evaluation, no weighting) and its per-sample measurements."""
        raise NotImplementedError
