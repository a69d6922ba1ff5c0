"""Loss modes against hand-computed values; step-level normalization; supervised-only logits = plain logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from mftcoder.data.batching import Batch
from mftcoder.loss import StepCounts, SupervisedLM, TaskTotals, token_coefficients


def make_batch(samples: list[tuple[int, list[float]]]) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch of (task, token losses) samples; positions 0 and the pad are unsupervised."""
    width = max(len(losses) for _, losses in samples) + 2
    size = len(samples)
    loss_mask = torch.zeros(size, width, dtype=torch.bool)
    token_task = torch.zeros(size, width, dtype=torch.long)
    values = torch.zeros(size, width)
    for row, (task, losses) in enumerate(samples):
        loss_mask[row, 1:1 + len(losses)] = True
        token_task[row] = task
        values[row, 1:1 + len(losses)] = torch.tensor(losses)
    ids = torch.zeros(size, width, dtype=torch.long)
    token_sample = torch.arange(size).unsqueeze(1).expand(size, width).contiguous()
    batch = Batch(ids, torch.ones_like(ids), ids, loss_mask, token_task, token_sample)
    return batch, values[loss_mask]


# Task 0: sample A = [1, 2, 3], sample B = [4]; task 1 (a single sample): C = [10, 20].
A, B, C = (0, [1.0, 2.0, 3.0]), (0, [4.0]), (1, [10.0, 20.0])
HAND = {
    # mode: (no weights, task_weights [1, 3])
    "case1": (40 / 6, 40 / 6),                      # all tokens: 40 / 6
    "case2": ((2 + 4 + 15) / 3, (2 + 4 + 15) / 3),  # sample means 2, 4, 15
    "case3": ((2.5 + 15) / 2, (1 * 2.5 + 3 * 15) / 4),  # task token means 10/4 and 30/2
    "case4": ((3 + 15) / 2, (1 * 3 + 3 * 15) / 4),      # task means of sample means (2+4)/2 and 15
}


def step_loss(batches_and_losses, mode, weights, num_tasks):
    counts = StepCounts.of([b for b, _ in batches_and_losses], num_tasks)
    return sum(float((l.double() * token_coefficients(b, mode, counts, weights)).sum()) for b, l in batches_and_losses)


@pytest.mark.parametrize("mode", list(HAND))
@pytest.mark.parametrize("weighted", [False, True])
def test_each_mode_matches_the_hand_computed_value(mode, weighted):
    weights = torch.tensor([1.0, 3.0]) if weighted else torch.ones(2)
    expected = HAND[mode][weighted]
    one_batch = [make_batch([A, B, C])]
    assert step_loss(one_batch, mode, weights, 2) == pytest.approx(expected, abs=1e-12)
    # The same samples split over two micro-batches of one step give the same loss.
    split = [make_batch([A, C]), make_batch([B])]
    assert step_loss(split, mode, weights, 2) == pytest.approx(expected, abs=1e-12)
    # The objective computed from accumulated totals (used for validation) agrees.
    totals = TaskTotals.zeros(2)
    for batch, losses in split:
        totals.add(batch, losses)
    assert totals.objective(mode, weights) == pytest.approx(expected, abs=1e-12)
    assert totals.per_task_loss().tolist() == pytest.approx([2.5, 15.0])


@pytest.mark.parametrize("mode", ["case3", "case4"])
def test_absent_tasks_do_not_dilute_the_weighted_mean(mode):
    weights = torch.tensor([1.0, 3.0, 100.0])  # task 2 has no sample in this step
    assert step_loss([make_batch([A, B, C])], mode, weights, 3) == pytest.approx(HAND[mode][True], abs=1e-12)


def test_only_zero_weight_tasks_in_a_step_give_zero_loss():
    assert step_loss([make_batch([A, B])], "case3", torch.tensor([0.0, 1.0]), 2) == 0.0


@pytest.mark.parametrize("head_kind", ["fused", "adapter"])
def test_supervised_only_loss_equals_plain_logits_loss_and_gradients(head_kind):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(config)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(300) * 0.1)  # exercise the bias gradient too
    if head_kind == "adapter":  # a non-Linear output layer takes the recompute-in-backward path
        model.set_output_embeddings(torch.nn.Sequential(head))
        model.get_output_embeddings().weight = head.weight
    ids = torch.randint(0, 300, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    loss_mask = torch.rand(3, 12) > 0.4
    loss_mask[:, -1] = False
    loss_mask[2, 8:] = False
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    batch = Batch(ids, attention, targets, loss_mask, torch.zeros_like(ids),
                  torch.arange(3).unsqueeze(1).expand(3, 12).contiguous())
    coefficients = torch.rand(int(loss_mask.sum())) / 10
    weighted, ours = SupervisedLM(model, chunk_tokens=5)(batch, coefficients)  # several chunks
    weighted.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits
    plain = F.cross_entropy(logits[loss_mask], targets[loss_mask], reduction="none")
    (plain * coefficients).sum().backward()
    assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-5)
    assert float(weighted.detach()) == pytest.approx(float((plain * coefficients).sum()), rel=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), name
    bias_name = next(n for n, p in model.named_parameters() if p is head.bias)
    assert grads[bias_name].abs().sum() > 0


def test_frozen_output_layer_gets_no_gradient_but_the_body_does():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    model.get_output_embeddings().weight.requires_grad_(False)
    batch, _ = make_batch([A, C])
    batch.input_ids = torch.randint(0, 300, batch.input_ids.shape)
    batch.targets = torch.randint(0, 300, batch.input_ids.shape)
    weighted, _ = SupervisedLM(model)(batch, torch.ones(int(batch.loss_mask.sum())))
    weighted.backward()
    assert model.get_output_embeddings().weight.grad is None
    assert model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.grad.abs().sum() > 0


class ShapeLog(TorchDispatchMode):
    """Records (op, result dtype) for every op whose result has a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.seen.append((str(func.overloadpacket), out.dtype))
        return out


def tiny_neox(vocab: int = 300):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64))


def test_evaluation_forms_no_output_layer_gradient():
    model = tiny_neox()
    batch, _ = make_batch([A, B, C])
    batch.input_ids = torch.randint(0, 300, batch.input_ids.shape)
    batch.targets = torch.randint(0, 300, batch.input_ids.shape)
    weight = model.get_output_embeddings().weight
    with torch.no_grad(), ShapeLog(weight.shape) as log:
        _, losses = SupervisedLM(model, chunk_tokens=2)(batch)
    assert log.seen == []  # no [vocab, hidden] gradient buffer, no addmm into one
    with ShapeLog(weight.shape) as log:  # while training it is formed, once, and accumulated per chunk
        SupervisedLM(model, chunk_tokens=2)(batch, torch.ones(len(losses)))
    assert [op for op, _ in log.seen] == ["aten.zeros_like"] + ["aten.addmm_"] * 3


def test_the_output_layer_is_never_copied_to_float32_and_cast_once_per_forward_under_autocast():
    """A bf16 output layer stays bf16 (the old float32 copy, vocab x hidden x 4 bytes, fed a matmul that autocast ran in
    bf16 anyway); a float32 one under bf16 autocast is cast once per forward, not once per chunk."""
    batch, _ = make_batch([A, B, C])  # 6 supervised tokens: 3 chunks of 2
    batch.input_ids = torch.randint(0, 300, batch.input_ids.shape)
    batch.targets = torch.randint(0, 300, batch.input_ids.shape)
    for dtype, autocast, copies in ((torch.bfloat16, False, []), (torch.float32, True, [torch.bfloat16])):
        model = tiny_neox().to(dtype)
        with ShapeLog(model.get_output_embeddings().weight.shape) as log, torch.autocast("cpu", enabled=autocast):
            loss, _ = SupervisedLM(model, chunk_tokens=2)(batch, torch.ones(6))
        loss.backward()
        assert [d for op, d in log.seen if op == "aten._to_copy"] == copies
        assert model.get_output_embeddings().weight.grad.dtype == dtype
