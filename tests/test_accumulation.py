"""Gradient accumulation: G=4 micro-batches of 2 give the gradient of one batch of 8, for every loss mode."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mftcoder.config import build_config
from mftcoder.data.batching import collate
from mftcoder.data.records import parse_record
from mftcoder.data.tokenize import encode_conversations
from mftcoder.loss import LOSS_MODES, StepCounts, SupervisedLM, TaskTotals
from mftcoder.model import DEMO_DATA, load_base_model
from mftcoder.train.distributed import DistEnv, Parallelism
from mftcoder.train.loop import accumulate_gradients


@pytest.fixture(scope="module")
def samples(tokenizer, template):
    """8 samples: 4 of task 0, 3 of task 1, 1 of task 2 (a task with a single sample), unequal lengths."""
    picked = []
    for task, count in ((0, 4), (1, 3), (2, 1)):
        path = sorted(p for p in DEMO_DATA.iterdir() if p.is_dir())[task] / "train.jsonl"
        lines = sorted(path.read_text().splitlines(), key=len)[5:5 + count]
        for (ids, mask) in encode_conversations(tokenizer, template, [parse_record(x) for x in lines]):
            picked.append((ids[:80], mask[:80], task))
    order = [0, 4, 7, 1, 5, 2, 6, 3]  # mix tasks across micro-batches
    return [picked[i] for i in order]


def step_gradients(model, batches, mode, weights):
    model.zero_grad(set_to_none=True)
    counts = StepCounts.of(batches, 3)
    loss = accumulate_gradients(SupervisedLM(model), batches, counts, mode, weights, Parallelism(DistEnv()),
                                TaskTotals.zeros(3),
                                contextlib.nullcontext())
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_accumulation_equals_one_big_batch(samples, tokenizer, template, mode):
    config, _ = build_config({"model_config": "tiny-test", "seed": 3})
    model = load_base_model(config, tokenizer, template)
    weights = torch.tensor([1.0, 2.0, 0.5])
    big_loss, big = step_gradients(model, [collate([[s] for s in samples], tokenizer.pad_token_id)], mode, weights)
    small = [collate([[s] for s in samples[i:i + 2]], tokenizer.pad_token_id) for i in range(0, 8, 2)]
    small_loss, accumulated = step_gradients(model, small, mode, weights)
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name in big:
        assert torch.allclose(accumulated[name], big[name], rtol=1e-4, atol=1e-7), name
    assert max(float(g.abs().max()) for g in big.values()) > 1e-3  # the gradients are not trivially zero
