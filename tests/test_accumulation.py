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
from mftcoder.objectives.sft import SupervisedFineTuning
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


def step_gradients(model, batches, mode, weights, max_forward_tokens=0):
    model.zero_grad(set_to_none=True)
    counts = StepCounts.of(batches, 3)
    totals = TaskTotals.zeros(3)
    loss = accumulate_gradients(SupervisedLM(model), batches, SupervisedFineTuning(), counts, mode, weights, Parallelism(DistEnv()),
                                totals, contextlib.nullcontext(), max_forward_tokens)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, totals


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_accumulation_equals_one_big_batch(samples, tokenizer, template, mode):
    config, _ = build_config({"model_config": "tiny-test", "seed": 3})
    model = load_base_model(config, tokenizer, template)
    weights = torch.tensor([1.0, 2.0, 0.5])
    big_loss, big, _ = step_gradients(model, [collate([[s] for s in samples], tokenizer.pad_token_id)], mode, weights)
    small = [collate([[s] for s in samples[i:i + 2]], tokenizer.pad_token_id) for i in range(0, 8, 2)]
    small_loss, accumulated, _ = step_gradients(model, small, mode, weights)
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name in big:
        assert torch.allclose(accumulated[name], big[name], rtol=1e-4, atol=1e-7), name
    assert max(float(g.abs().max()) for g in big.values()) > 1e-3  # the gradients are not trivially zero


@pytest.mark.parametrize("packed", [False, True])
def test_forward_passes_of_few_tokens_give_the_whole_batch_gradient(samples, tokenizer, template, packed):
    """max_forward_tokens splits a micro-batch into passes of whole rows: same loss, gradients, task totals."""
    config, _ = build_config({"model_config": "tiny-test", "seed": 3})
    model = load_base_model(config, tokenizer, template)
    weights = torch.tensor([1.0, 2.0, 0.5])
    rows = [samples[i:i + 2] for i in range(0, 8, 2)] if packed else [[s] for s in samples]
    batch = collate(rows, tokenizer.pad_token_id, packed=packed)
    width = batch.input_ids.shape[1]
    assert [len(p.input_ids) for p in batch.split_rows(3 * width)] == ([3, 1] if packed else [3, 3, 2])
    assert batch.split_rows(0) == [batch] and batch.split_rows(width - 1)[0].input_ids.shape[0] == 1
    whole_loss, whole, whole_totals = step_gradients(model, [batch], "case4", weights)
    split_loss, split, split_totals = step_gradients(model, [batch], "case4", weights, max_forward_tokens=width)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    assert torch.allclose(split_totals.as_tensor(), whole_totals.as_tensor(), rtol=1e-6)
    for name in whole:
        # atol: a row without padding takes transformers' unmasked attention kernel (float noise ~2e-7)
        assert torch.allclose(split[name], whole[name], rtol=1e-4, atol=1e-6), name
