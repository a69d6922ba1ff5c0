"""Packing: rows respect capacity and cover every sample once; packed logits equal separate runs; per-task
losses from packed batches equal unpacked ones for every loss mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mftcoder.data.batching import arrange_rows, collate, micro_batches, pack_first_fit_decreasing
from mftcoder.loss import LOSS_MODES, StepCounts, SupervisedLM, TaskTotals, model_layout, token_coefficients


def test_first_fit_decreasing_respects_capacity_and_places_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    bins = pack_first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(lengths[b].sum() for b in bins) <= 128
    assert lengths.sum() / (128 * len(bins)) > 0.95  # FFD packs these tightly
    assert pack_first_fit_decreasing(np.array([5, 3, 4, 2]), 7) == [[0, 3], [2, 1]]


@pytest.mark.parametrize("mode", ["pack", "dynamic", "padding"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_covers_every_sample_exactly_once_across_ranks(mode, world_size):
    rng = np.random.default_rng(1)
    plan = np.stack([rng.integers(0, 3, 203), np.arange(203)], axis=1)
    lengths = rng.integers(5, 60, size=203)
    rows = arrange_rows(plan, lengths, mode, 64, group=4 * world_size, rng=np.random.default_rng(2), window=50)
    seen = []
    for rank in range(world_size):
        for batch in micro_batches(rows, 4, rank, world_size):
            assert len(batch) <= 4
            for row in batch:
                assert lengths[row[:, 1]].sum() <= 64 or len(row) == 1
                seen += row[:, 1].tolist()
    assert sorted(seen) == list(range(203))
    if mode == "padding":
        assert [r[0, 1] for r in rows] == plan[:, 1].tolist()  # plan order kept
    if mode == "dynamic":  # length-grouped: each global batch spans a small range of lengths
        spans = [np.ptp(lengths[np.concatenate(rows[i:i + 4 * world_size])[:, 1]]) for i in range(0, 200, 4 * world_size)]
        assert np.median(spans) < np.ptp(lengths) / 4


def tiny_model(kind: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128, rotary_pct=0.25)
        return GPTNeoXForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def random_samples(seed: int, count: int = 5) -> list:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        n = int(rng.integers(6, 30))
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 2:] = 1
        samples.append((rng.integers(3, 512, n).astype(np.int32), mask, i % 3))
    return samples


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_packed_rows_give_the_logits_of_each_sample_alone(kind):
    model = tiny_model(kind)
    samples = random_samples(3)
    packed = collate([samples[:3], samples[3:]], pad_id=0, pad_to=80, packed=True)  # 2 rows + trailing padding
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                       use_cache=False).logits
        for row, members in enumerate([samples[:3], samples[3:]]):
            start = 0
            for ids, _, _ in members:
                alone = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0]
                got = logits[row, start:start + len(ids)]
                assert (got - alone).abs().max() < 1e-5
                start += len(ids)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_per_task_losses_of_a_packed_batch_equal_unpacked(mode):
    model = tiny_model("gpt_neox")
    runner = SupervisedLM(model)
    samples = random_samples(4, count=7)
    weights = torch.tensor([1.0, 2.0, 0.5])
    packed = collate([samples[:4], samples[4:]], pad_id=0, packed=True)  # tasks mixed inside rows
    unpacked = collate([[s] for s in samples], pad_id=0)
    results = []
    for batch in (packed, unpacked):
        with torch.no_grad():
            _, losses = runner(batch)
        totals = TaskTotals.zeros(3)
        totals.add(batch, losses)
        objective = float((losses.double() * token_coefficients(batch, mode, StepCounts.of([batch], 3), weights)).sum())
        results.append((totals, objective))
    (packed_totals, packed_objective), (plain_totals, plain_objective) = results
    assert packed_objective == pytest.approx(plain_objective, rel=1e-6)
    assert torch.allclose(packed_totals.per_task_loss(), plain_totals.per_task_loss(), rtol=1e-6)
    assert torch.equal(packed_totals.tokens, plain_totals.tokens) and torch.equal(packed_totals.samples,
                                                                                   plain_totals.samples)
    assert packed_totals.objective(mode, weights) == pytest.approx(plain_objective, rel=1e-6)


def test_collate_shifts_labels_within_each_sample():
    a = (np.array([10, 11, 12]), np.array([0, 1, 1], dtype=np.uint8), 0)
    b = (np.array([20, 21]), np.array([0, 1], dtype=np.uint8), 1)
    batch = collate([[a, b]], pad_id=0, pad_to=7, packed=True)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 0, 0]]
    assert batch.targets.tolist() == [[11, 12, 0, 21, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[True, True, False, True, False, False, False]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch.token_task.tolist() == [[0, 0, 0, 1, 1, 0, 0]]
    assert batch.token_sample.tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    assert batch.num_tokens == 5 and batch.fill == pytest.approx(5 / 7)


def test_a_flattened_packed_batch_carries_its_sample_boundaries():
    """Rows one after another in one row (what flash-attention gets): same token order, positions restarting at each
    sample and at each row's trailing padding, and the cumulative lengths flash-attention's varlen kernel takes."""
    a, b, c = ([(np.arange(n) + 3).astype(np.int32), np.ones(n, dtype=np.uint8), 0] for n in (3, 2, 4))
    batch = collate([[a, b], [c]], pad_id=0, packed=True)  # width 5: the second row has 1 token of padding
    flat = batch.flattened()
    assert flat.input_ids.shape == (1, 10) and torch.equal(flat.input_ids[0], batch.input_ids.reshape(-1))
    assert torch.equal(flat.targets[flat.loss_mask], batch.targets[batch.loss_mask])  # loss_mask order unchanged
    assert flat.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]
    layout = model_layout(flat, boundaries=True)
    assert layout["attention_mask"] is None and layout["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert layout["max_length_q"] == 4 and layout["cu_seq_lens_k"] is layout["cu_seq_lens_q"]
    assert set(model_layout(flat)) == {"position_ids", "attention_mask"}  # sdpa, eager, flex: positions alone
    assert batch.stand_in().num_tokens == 0 and batch.stand_in().flattened().input_ids.shape == (1, 1)
