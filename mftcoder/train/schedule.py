"""Learning-rate schedules as pure functions of the optimizer step (so resume needs only the step)."""

from __future__ import annotations

import math


def learning_rate(step: int, *, kind: str, peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `peak`, then cosine (to min_lr), linear (to 0)
    or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return peak
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return peak * (1.0 - progress)
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")
