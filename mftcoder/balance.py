"""Task balancers: the per-task weights of the multi-task loss, fixed (case1-4) or recomputed during training from
what the run observes (coba, dwa). One interface; a new balancer is one class and one entry in BALANCERS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Observation:
    """What a balancer may look at after optimizer step `step` (step 0: before training)."""

    step: int
    train_losses: np.ndarray  # per-task token-mean training loss of that step (NaN: task absent; all NaN at 0)
    sample_validation: Callable[[], np.ndarray]  # per-task validation loss of a fresh sample; every rank calls it


class Balancer:
    """Task weights for the loss; constant within an optimizer step (the loop reads them once per step)."""

    loss_mode = "case3"  # the loss the weights enter: per-task token means, weighted over the tasks present
    needs_validation = False

    def __init__(self, task_weights: np.ndarray):
        self._weights = np.asarray(task_weights, dtype=np.float64)

    def weights(self) -> torch.Tensor:
        return torch.tensor(self._weights, dtype=torch.float64)

    def update(self, observation: Observation) -> None:
        """Take in one observation (called after every optimizer step, and once at step 0)."""

    def metrics(self) -> dict[str, float]:
        """What to log next to the losses (dynamic balancers: their weights, as shares of 1)."""
        return {}

    def objective_weights(self) -> torch.Tensor:
        """Task weights of the validation objective: fixed weights as trained; a dynamic balancer's moving weights
        would make validation losses of different steps incomparable, so those validate with equal weights."""
        return self.weights()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StaticWeights(Balancer):
    """case1-4: the fixed `task_weights` (case1 and case2 do not use weights)."""

    def __init__(self, task_weights: np.ndarray, mode: str):
        super().__init__(task_weights)
        self.loss_mode = mode


class _Dynamic(Balancer):
    """A balancer whose weights move: it logs them, and its whole state is plain JSON data."""

    def objective_weights(self) -> torch.Tensor:
        return torch.ones(len(self._weights), dtype=torch.float64)

    def metrics(self) -> dict[str, float]:
        shares = self._weights / self._weights.sum()
        return {f"weight/{name}": float(w) for name, w in zip(self.task_names, shares)}

    def state_dict(self) -> dict:
        return {key: _jsonable(value) for key, value in vars(self).items() if key not in self._settings}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            current = getattr(self, key)
            if isinstance(current, np.ndarray):  # JSON lists back to arrays of the same shape ([] of a history too)
                value = np.array(value, dtype=np.float64).reshape((-1, *current.shape[1:]))
            setattr(self, key, value)


def _jsonable(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _ratio(numerator: np.ndarray, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (all slopes flat: no preference)."""
    denominator = np.broadcast_to(np.asarray(denominator, dtype=np.float64), numerator.shape)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def window_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over x, on the points where y is known (each loss keeps its own x)."""
    known = np.isfinite(y)
    x, y = x[known], y[known]
    if len(x) < 2:
        return 0.0
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


class CoBa(_Dynamic):
    """Convergence Balancer (Gong et al., EMNLP 2024). Every `interval` steps a few validation batches give each
    task's loss l_i, normalized by its first value: y_i = l_i / l_i(0). alpha_i: the least-squares slope of y_i over
    the last `history` points. RCS_i = softmax(K alpha_i / sum_j |alpha_j|) gives less weight to a task that
    converges faster; ACS_i = softmax(-n alpha_i / sum of task i's last n |alpha_i|) gives less to one that starts
    to diverge; DF = min(T softmax_j(-tau T amax_j / sum |amax|)[now], 1) over the T slopes since warm-up, with
    amax the largest task slope, moves the weight from RCS (DF = 1) to ACS when the worst task turns upwards.
    w = DF RCS + (1 - DF) ACS, uniform during warm-up, and mixed with uniform (0.9 w + 0.1/K) when a weight falls
    below 0.1/K. Warm-up and history are in optimizer steps, turned into validation points by the interval."""

    needs_validation = True
    _settings = ("task_names", "interval", "warmup_points", "history_points", "tau")

    def __init__(self, task_names: list[str], warmup_steps: int, history_length: int, tau: float, interval: int):
        super().__init__(np.full(len(task_names), 1.0 / len(task_names)))
        self.task_names, self.interval, self.tau = task_names, interval, tau
        self.warmup_points = max(1, math.ceil(warmup_steps / interval))
        self.history_points = max(2, history_length // interval)
        num_tasks = len(task_names)
        self.losses = np.zeros((0, num_tasks))  # one row per validation point (point p: after step p * interval)
        self.slopes = np.zeros((0, num_tasks))  # one row per point since warm-up
        self.initial = np.full(num_tasks, np.nan)  # each task's first measured validation loss

    def update(self, observation: Observation) -> None:
        if observation.step % self.interval:
            return
        losses = np.asarray(observation.sample_validation(), dtype=np.float64)
        self.initial = np.where(np.isnan(self.initial), losses, self.initial)
        self.losses = np.vstack([self.losses, losses])
        point = len(self.losses) - 1
        if point < self.warmup_points:
            return
        first = max(0, point - self.history_points + 1)
        x = np.arange(first, point + 1, dtype=np.float64)
        normalized = self.losses[first:] / self.initial
        alpha = np.array([window_slope(x, normalized[:, i]) for i in range(normalized.shape[1])])
        self.slopes = np.vstack([self.slopes, alpha])
        self._weights = self.mix(alpha)

    def mix(self, alpha: np.ndarray) -> np.ndarray:
        """The weights from the newest slopes `alpha` and the slope history (which already ends with them)."""
        num_tasks = len(alpha)
        rcs = _softmax(_ratio(num_tasks * alpha, np.abs(alpha).sum()))
        recent = self.slopes[-self.history_points:]
        acs = _softmax(_ratio(-len(recent) * alpha, np.abs(recent).sum(axis=0)))
        amax = self.slopes.max(axis=1)
        steps = len(amax)
        divergence = min(steps * _softmax(_ratio(-self.tau * steps * amax, np.abs(amax).sum()))[-1], 1.0)
        weights = divergence * rcs + (1.0 - divergence) * acs
        floor = 0.1 / num_tasks
        return 0.9 * weights + floor if weights.min() < floor else weights


class DynamicWeightAverage(_Dynamic):
    """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019), on training losses: every `window` steps,
    w_i = softmax_i(r_i / T) with r_i = L_i(now) / L_i(before), L_i the task's mean training loss over a window
    of steps. A task whose loss falls slowly relative to the others gets more weight. Uniform for two windows."""

    _settings = ("task_names", "window", "temperature")

    def __init__(self, task_names: list[str], window: int, temperature: float):
        super().__init__(np.full(len(task_names), 1.0 / len(task_names)))
        self.task_names, self.window, self.temperature = task_names, window, temperature
        self.sums = np.zeros(len(task_names))
        self.counts = np.zeros(len(task_names))
        self.previous = np.full(len(task_names), np.nan)  # the last window's mean loss per task

    def update(self, observation: Observation) -> None:
        if observation.step == 0:
            return
        seen = np.isfinite(observation.train_losses)
        self.sums[seen] += observation.train_losses[seen]
        self.counts[seen] += 1
        if observation.step % self.window:
            return
        current = np.divide(self.sums, self.counts, out=np.full_like(self.sums, np.nan), where=self.counts > 0)
        ratio = current / self.previous
        if np.isfinite(ratio).all():
            self._weights = _softmax(ratio / self.temperature)
        self.previous = np.where(np.isfinite(current), current, self.previous)
        self.sums[:] = 0.0
        self.counts[:] = 0.0


BALANCERS = {
    "coba": lambda config, names, weights: CoBa(names, config.coba_warmup_steps, config.coba_history_length,
                                               config.coba_tau, config.coba_update_interval),
    "dwa": lambda config, names, weights: DynamicWeightAverage(names, config.dwa_window, config.dwa_temperature),
}


def make_balancer(config, task_names: list[str], task_weights: np.ndarray) -> Balancer:
    """The balancer `weighted_loss_mode` names: a dynamic one from BALANCERS, else the fixed task_weights."""
    build = BALANCERS.get(config.weighted_loss_mode)
    return build(config, task_names, task_weights) if build else StaticWeights(task_weights, config.weighted_loss_mode)
