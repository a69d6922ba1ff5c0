"""Preference training on chosen/rejected pairs: DPO (with its IPO and hinge variants, and RPO's added NLL) and ORPO.
A pair is one example of two sequences (prompt + chosen, prompt + rejected) that stay together in one row or in
adjacent rows of one pass on one rank; its loss is one unit, weighted per task like a sample (weighted_loss_mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mftcoder.config import Config
from mftcoder.data.batching import Batch
from mftcoder.loss import PassStats, StepCounts, unit_coefficients
from mftcoder.objectives.base import Objective, RunParts, StepLoss
from mftcoder.objectives.pairs import PreferencePairs, pair_counts, sequence_sums
from mftcoder.objectives.reference import make_reference


class PreferenceObjective(Objective):
    """The shared part: pair records, pairs as loss units, the policy's log-probs of each answer."""

    records = PreferencePairs()
    needs_reference = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.beta = config.beta
        self.reference = None

    def set_up(self, parts: RunParts) -> None:
        if self.needs_reference:
            self.reference = make_reference(self.config, parts)

    def step_counts(self, batches: list[Batch], num_tasks: int) -> StepCounts:
        pairs = sum((pair_counts(batch, num_tasks) for batch in batches), torch.zeros(num_tasks, dtype=torch.float64))
        return StepCounts(pairs, pairs.clone())

    def forward(self, runner: torch.nn.Module, batch: Batch,
                step: StepLoss | None) -> tuple[torch.Tensor, PassStats]:
        aux_scale = step.aux_scale if step is not None else 1.0
        # keep_graph always: the policy and the reference (here or cached) go through the same output-layer code, so
        # policy = reference gives exactly ln 2 (the fused kernel differs from it by ~1e-6 per token in float32).
        aux, token_losses = runner(batch, None, aux_scale, keep_graph=True)
        policy, sizes, task = sequence_sums(batch, -token_losses)
        reference = None
        if self.needs_reference:
            reference, _, _ = sequence_sums(batch, self.reference(runner, batch))
        losses, extras = self.pair_losses(policy, sizes, reference)
        if step is None:
            total = losses.sum()
        else:
            coefficients = unit_coefficients(task, torch.ones_like(losses), step.mode, step.counts, step.task_weights)
            total = (losses * coefficients).sum() + aux  # aux: the model's auxiliary loss, 0 x the tokens' otherwise
        stats = PassStats(task.cpu(), losses.detach().cpu(), torch.ones(len(losses), dtype=torch.float64),
                          {name: value.detach().double().cpu() for name, value in extras.items()})
        return total.float(), stats

    def pair_losses(self, policy: torch.Tensor, sizes: torch.Tensor,
                    reference: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class DirectPreference(PreferenceObjective):
    """DPO: with h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), summed over answer
    tokens: sigmoid -log sigmoid(beta h); ipo (h - 1/(2 beta))^2; hinge max(0, 1 - beta h). rpo_alpha adds the
    chosen answer's token-mean NLL with that weight."""

    name = "dpo"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected")

    def pair_losses(self, policy, sizes, reference):
        beta, config = self.beta, self.config
        rewards = beta * (policy - reference)
        h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
        if config.dpo_loss == "sigmoid":
            losses = -F.logsigmoid(beta * h)
        elif config.dpo_loss == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            losses = torch.relu(1 - beta * h)
        if config.rpo_alpha:
            losses = losses + config.rpo_alpha * (-policy[:, 0] / sizes[:, 0])
        rewards = rewards.detach()
        return losses, {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
                        "rewards/margins": rewards[:, 0] - rewards[:, 1],
                        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).double(),
                        "logps/chosen": policy[:, 0].detach(), "logps/rejected": policy[:, 1].detach()}


class OddsRatioPreference(PreferenceObjective):
    """ORPO (no reference model): with the answers' token-mean log-probs a, b, the chosen answer's NLL -a minus
    beta log sigmoid(log odds(a) - log odds(b)), where log odds(x) = x - log(1 - e^x)."""

    name = "orpo"
    needs_reference = False
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "log_odds_ratio", "nll")

    def pair_losses(self, policy, sizes, reference):
        mean = policy / sizes
        # log(1 - e^x) with x kept below 0: an answer predicted with certainty (x = 0 in float) would give -inf
        log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-7)))
        ratio = log_odds[:, 0] - log_odds[:, 1]
        nll = -mean[:, 0]
        losses = nll - self.beta * F.logsigmoid(ratio)
        rewards = (self.beta * mean).detach()
        return losses, {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
                        "rewards/margins": rewards[:, 0] - rewards[:, 1],
                        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).double(),
                        "logps/chosen": mean[:, 0].detach(), "logps/rejected": mean[:, 1].detach(),
                        "log_odds_ratio": ratio.detach(), "nll": nll.detach()}
