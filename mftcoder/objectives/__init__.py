"""Training objectives: what a record holds, how an example becomes a loss, and what is measured. The trainer asks
its objective; it never tests the objective's name. A new objective is one module and one entry in OBJECTIVES."""

from __future__ import annotations

from mftcoder.config import Config
from mftcoder.objectives.base import Objective, StepLoss
from mftcoder.objectives.preference import DirectPreference, OddsRatioPreference
from mftcoder.objectives.pretrain import Pretraining
from mftcoder.objectives.sft import SupervisedFineTuning

OBJECTIVES: dict[str, type[Objective]] = {
    "sft": SupervisedFineTuning,
    "dpo": DirectPreference,
    "orpo": OddsRatioPreference,
    "pretrain": Pretraining,
}


def make_objective(config: Config) -> Objective:
    return OBJECTIVES[config.objective](config)


__all__ = ["OBJECTIVES", "Objective", "StepLoss", "make_objective"]
