"""Task balancers: CoBa against an independent NumPy transcription of the paper, dynamic weight average by hand,
weights fixed within an optimizer step, exact resume, and 1 rank = 2 ranks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from coba_reference import EXAMPLE_EXPECTED, EXAMPLE_PARAMS, EXAMPLE_VAL_LOSS, coba_reference
from test_distributed import run_two_ranks, settings
from test_train import make_config, weights_of

from mftcoder import balance
from mftcoder.balance import CoBa, DynamicWeightAverage, Observation, window_slope
from mftcoder.config import ConfigError, build_config
from mftcoder.objectives import sft
from mftcoder.train import loop
from mftcoder.train.loop import Trainer, train

NAMES = ["a", "b", "c"]


def feed(balancer, rows, interval: int = 1) -> list[np.ndarray]:
    """Give the balancer one validation sample per point (at steps 0, interval, 2 interval, ...); the weights
    after each step, and check it samples only at update steps."""
    pending, after = list(rows), []
    for step in range(0, interval * (len(rows) - 1) + 1):
        balancer.update(Observation(step, np.full(len(NAMES), np.nan), lambda: pending.pop(0)))
        after.append(balancer.weights().numpy())
    assert not pending
    return after


def test_coba_weights_match_the_worked_example_and_the_transcription():
    coba = CoBa(NAMES, warmup_steps=3, history_length=4, tau=5.0, interval=1)
    weights = feed(coba, EXAMPLE_VAL_LOSS)
    reference = coba_reference(EXAMPLE_VAL_LOSS, **EXAMPLE_PARAMS)
    for t in range(3):
        np.testing.assert_array_equal(weights[t], np.full(3, 1 / 3))  # warm-up
    for t, expected in EXAMPLE_EXPECTED["weights"].items():
        np.testing.assert_allclose(weights[t], expected, atol=1e-6)  # worked by hand (coba_reference.py)
        np.testing.assert_allclose(weights[t], reference.weights[t], rtol=1e-12)
    np.testing.assert_allclose(coba.slopes, reference.slope[3:], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coba_follows_the_transcription_on_random_histories_and_applies_the_floor(seed):
    rng = np.random.default_rng(seed)
    names = ["t0", "t1", "t2", "t3"]
    losses = 3.0 * np.exp(-rng.uniform(0.0, 0.3, size=(1, 4)) * np.arange(40)[:, None]) + rng.normal(0, 0.05, (40, 4))
    coba = CoBa(names, warmup_steps=5, history_length=8, tau=5.0, interval=1)
    rows = list(losses)
    weights = []
    for step, row in enumerate(rows):
        coba.update(Observation(step, np.full(4, np.nan), lambda row=row: row))
        weights.append(coba.weights().numpy())
    expected = coba_reference(losses, warmup_steps=5, history_length=8, tau=5.0).weights
    floored = np.where(expected.min(axis=1, keepdims=True) < 0.1 / 4, 0.9 * expected + 0.1 / 4, expected)
    np.testing.assert_allclose(np.array(weights), floored, rtol=1e-12, atol=1e-15)
    assert np.array(weights).min() >= 0.1 / 4 * 0.9 and np.allclose(np.array(weights).sum(axis=1), 1.0)


def test_the_floor_mixes_in_uniform_weights_when_a_task_would_starve():
    coba = CoBa(NAMES, warmup_steps=1, history_length=2, tau=5.0, interval=1)
    feed(coba, [[1.0, 1.0, 1.0], [0.01, 0.999, 0.999]])  # task a's loss collapses: RCS starves it
    alpha = np.array([-0.99, -0.001, -0.001])
    rcs = np.exp(3 * alpha / 0.992) / np.exp(3 * alpha / 0.992).sum()  # DF = 1 with one slope in the history
    assert rcs[0] < 0.1 / 3
    np.testing.assert_allclose(coba.weights().numpy(), 0.9 * rcs + 0.1 / 3, rtol=1e-12)


def test_coba_counts_warmup_and_history_in_steps_whatever_the_interval():
    """Interval 2: points at steps 0, 2, 4, ...; warm-up 6 steps = 3 points, history 8 steps = 4 points: the
    weights at step 2t are the example's at point t, and they hold between updates."""
    coba = CoBa(NAMES, warmup_steps=6, history_length=8, tau=5.0, interval=2)
    weights = feed(coba, EXAMPLE_VAL_LOSS, interval=2)
    for t, expected in EXAMPLE_EXPECTED["weights"].items():
        np.testing.assert_allclose(weights[2 * t], expected, atol=1e-6)
        if 2 * t + 1 < len(weights):
            np.testing.assert_array_equal(weights[2 * t + 1], weights[2 * t])


def test_a_missing_loss_keeps_the_other_points_at_their_own_steps():
    x, y = np.arange(5.0), np.array([1.0, np.nan, 0.8, 0.75, 0.6])
    assert window_slope(x, y) == pytest.approx(np.polyfit([0, 2, 3, 4], [1.0, 0.8, 0.75, 0.6], 1)[0], rel=1e-12)
    assert window_slope(x[:2], np.array([1.0, np.nan])) == 0.0  # one point: no slope, no preference


def test_balancer_state_survives_json_exactly():
    first = CoBa(NAMES, warmup_steps=3, history_length=4, tau=5.0, interval=1)
    feed(first, EXAMPLE_VAL_LOSS[:5])
    second = CoBa(NAMES, warmup_steps=3, history_length=4, tau=5.0, interval=1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for balancer in (first, second):
        for step, row in enumerate(EXAMPLE_VAL_LOSS[5:], start=5):
            balancer.update(Observation(step, np.full(3, np.nan), lambda row=row: row))
    assert torch.equal(first.weights(), second.weights()) and np.array_equal(first.slopes, second.slopes)


def test_dynamic_weight_average_by_hand():
    dwa = DynamicWeightAverage(NAMES, window=2, temperature=2.0)
    train_losses = [[4.0, 2.0, 1.0], [3.0, 2.0, np.nan], [2.0, 1.8, 1.0], [1.0, 1.8, 0.9]]
    for step, losses in enumerate(train_losses, start=1):
        dwa.update(Observation(step, np.array(losses), lambda: pytest.fail("dwa needs no validation")))
        if step < 4:
            np.testing.assert_array_equal(dwa.weights().numpy(), np.full(3, 1 / 3))
    ratio = np.array([1.5 / 3.5, 1.8 / 2.0, 0.95 / 1.0])  # this window's mean over the last (task c: one step)
    np.testing.assert_allclose(dwa.weights().numpy(), np.exp(ratio / 2) / np.exp(ratio / 2).sum(), rtol=1e-12)
    assert dwa.metrics()["weight/b"] == pytest.approx(float(dwa.weights()[1]))


COBA = dict(weighted_loss_mode="coba", coba_warmup_steps=1, coba_history_length=4, coba_sample_valid_num=2,
            evaluate_before_training=False)


def test_weights_are_fixed_within_an_optimizer_step(small_tasks, tmp_path, monkeypatch):
    seen = []
    original = sft.token_coefficients

    def recording(batch, mode, counts, task_weights):
        seen.append((mode, task_weights.clone()))
        return original(batch, mode, counts, task_weights)

    monkeypatch.setattr(sft, "token_coefficients", recording)
    train(make_config(small_tasks, tmp_path, gradient_accumulation_steps=4, per_device_train_batch_size=1,
                      max_steps=4, plot_curves=True, **COBA))
    assert len(seen) == 16 and all(mode == "case3" for mode, _ in seen)
    steps = [[w for _, w in seen[4 * k:4 * k + 4]] for k in range(4)]
    for step in steps:
        assert all(torch.equal(step[0], w) for w in step)  # every micro-batch of a step
    assert torch.equal(steps[0][0], torch.full((3,), 1 / 3, dtype=torch.float64))  # warm-up
    assert not torch.equal(steps[2][0], steps[3][0])  # and they do move between steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [[r[f"weight/{n}"] for n in ("code_docstring", "code_generation", "code_multiturn")]
              for r in rows if r["split"] == "train"]
    np.testing.assert_allclose(logged, [s[0].numpy() for s in steps], rtol=1e-12)  # the weights each step used
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_hold_each_task_and_panel(tmp_path):
    from mftcoder.train.plots import series

    rows = [{"split": "train", "step": 1, "loss/a": 2.0, "weight/a": 0.4, "weight/b": 0.6},
            {"split": "eval", "step": 1, "loss/a": 2.5, "loss/b": None},
            {"split": "train", "step": 2, "loss/a": 1.5, "loss/b": 1.9, "weight/a": 0.5, "weight/b": 0.5}]
    assert series(rows, "train", "loss/") == {"a": ([1, 2], [2.0, 1.5]), "b": ([2], [1.9])}
    assert series(rows, "eval", "loss/") == {"a": ([1], [2.5])}
    assert series(rows, "train", "weight/")["b"] == ([1, 2], [0.6, 0.5])


def test_resume_with_coba_is_exact(small_tasks, tmp_path):
    values = dict(COBA, checkpointing_steps=3, evaluation_steps=3)
    full = train(make_config(small_tasks, tmp_path / "full", **values))
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(make_config(small_tasks, tmp_path / "resumed", resume_from_checkpoint="auto", **values))
    assert resumed.step_losses == full.step_losses[3:]
    final, expected = weights_of(resumed.final_checkpoint), weights_of(full.final_checkpoint)
    assert all(torch.equal(final[k], expected[k]) for k in expected)

    def balancer_state(folder):
        return json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["balancer"]

    assert balancer_state(tmp_path / "resumed") == balancer_state(tmp_path / "full")
    assert len(balancer_state(tmp_path / "full")["losses"]) == 7  # points at steps 0..6


def test_two_ranks_give_the_weights_of_one(small_tasks, tmp_path):
    common = dict(COBA, adam_epsilon=1e-5, learning_rate=1e-3, max_steps=4, coba_sample_valid_num=1)
    train(build_config(settings(small_tasks, tmp_path / "one", per_device_train_batch_size=8,
                                per_device_valid_batch_size=10, **common))[0])
    done = run_two_ranks(settings(small_tasks, tmp_path / "two", total_train_batch_size=8,
                                  per_device_valid_batch_size=5, **common))
    assert done.returncode == 0, done.stderr[-4000:]

    def weights(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [[v for k, v in r.items() if k.startswith("weight/")] for r in rows if r["split"] == "train"]

    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert len(one) == 4 and one[-1] != one[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_coba_needs_a_validation_split(small_tasks, tmp_path):
    with pytest.raises(ConfigError, match=r"weighted_loss_mode: coba weighs tasks by their validation loss, and "
                                          r"task\(s\) code_docstring, code_generation, code_multiturn have no "
                                          r"validation samples \(data_split '100,0,0'\)"):
        Trainer(make_config(small_tasks, tmp_path, data_split="100,0,0", **COBA), loop.DistEnv())
    with pytest.raises(ConfigError, match="task_weights: fixed weights do not combine with weighted_loss_mode: dwa"):
        build_config({"weighted_loss_mode": "dwa", "task_weights": [1, 2]})
    assert set(balance.BALANCERS) == {"coba", "dwa"}
