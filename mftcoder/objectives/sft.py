"""Supervised fine-tuning: chat records, the loss on every bot turn, token losses weighted by weighted_loss_mode."""

from __future__ import annotations

import torch

from mftcoder.data.batching import Batch
from mftcoder.loss import PassStats, token_coefficients
from mftcoder.objectives.base import Objective, StepLoss


class SupervisedFineTuning(Objective):
    name = "sft"

    def forward(self, runner: torch.nn.Module, batch: Batch,
                step: StepLoss | None) -> tuple[torch.Tensor, PassStats]:
        if step is None:
            total, token_losses = runner(batch)
        else:  # the coefficients go into the fused output layer, which forms the gradient in the forward pass
            coefficients = token_coefficients(batch, step.mode, step.counts, step.task_weights)
            total, token_losses = runner(batch, coefficients, step.aux_scale)
        return total, PassStats.of_tokens(batch, token_losses)
