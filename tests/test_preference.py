"""Preference objectives (DPO and its variants, ORPO): records, tokens, pairs kept together, losses against a plain
computation with the HF model's logits, accumulation, and a run end to end (step-0 loss ln 2, resume, evaluation)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_task
from test_distributed import final_weights, run_two_ranks, train_losses

from mftcoder.config import build_config
from mftcoder.data.batching import Sample, arrange_rows, collate, micro_batches, plan_lengths
from mftcoder.data.records import BadRecord, parse_json_object
from mftcoder.data.template import ModelTemplate
from mftcoder.data.tokenize import ChunkEncoder
from mftcoder.loss import SupervisedLM, TaskTotals
from mftcoder.model import load_base_model
from mftcoder.objectives import StepLoss, make_objective
from mftcoder.objectives.pairs import PreferencePairs, pair_turns, sequence_sums
from mftcoder.train.distributed import DistEnv, Parallelism
from mftcoder.train.loop import Trainer, accumulate_gradients, train
from mftcoder.train.run_folder import RANDOM_BASE

PROMPT = [{"role": "user", "content": "Add two numbers."}]


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("record,reason", [
    ({"chosen": "a", "prompt": "p"}, "missing 'rejected'"),
    ({"chosen": [*PROMPT, answer("a")], "rejected": "b"}, "both be strings (answers) or both lists"),
    ({"chosen": [*PROMPT, answer("a")], "rejected": [{"role": "user", "content": "other"}, answer("b")]},
     "differ at turn 0"),
    ({"chosen": [answer("a")], "rejected": [answer("b")]}, "chosen: chosen[0]: expected a human turn"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
    ({"chat_rounds": [*PROMPT, answer("x")], "chosen": "a", "rejected": "b"}, "must end with a human turn"),
])
def test_bad_preference_records_say_why(record, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)):
        pair_turns(record)


def test_both_record_forms_give_the_same_pair():
    as_lists = pair_turns({"chosen": [*PROMPT, answer("a")], "rejected": [*PROMPT, answer("b")]})
    as_answers = pair_turns({"prompt": "Add two numbers.", "chosen": "a", "rejected": "b", "extra": 1})
    assert as_lists == as_answers
    assert [t.role for t in as_lists[0]] == ["human"] and as_lists[1:] == ("a", "b")


DEFAULT_SYSTEM = ("{%- if messages[0]['role'] != 'system' -%}<|im_start|>system\nYou are helpful.<|im_end|>\n"
                  "{%- endif -%}{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}")


@pytest.mark.parametrize("own_template", [False, True])
def test_pair_ids_are_the_chat_template_of_each_conversation_and_only_the_answer_is_supervised(
        tokenizer, template, own_template):
    if own_template:  # a model template that inserts a default system prompt: once per conversation, not twice
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        template = ModelTemplate(tokenizer, DEFAULT_SYSTEM)
    record = {"chat_rounds": [{"role": "user", "content": "Say hi"}, answer("hi"), PROMPT[0]],
              "chosen": "def add(a, b):\n    return a + b", "rejected": "print('no')"}
    chunk = ChunkEncoder(tokenizer, template, None, PreferencePairs())(("pairs.jsonl", [(1, json.dumps(record))]))
    assert chunk.errors == [] and list(chunk.lines) == [1, 1] and len(chunk.lengths) == 2
    ends = np.cumsum(chunk.lengths)
    for k, key in enumerate(("chosen", "rejected")):
        ids, mask = chunk.ids[ends[k] - chunk.lengths[k]:ends[k]], chunk.mask[ends[k] - chunk.lengths[k]:ends[k]]
        messages = [*record["chat_rounds"], answer(record[key])]
        expected = tokenizer.apply_chat_template(messages, chat_template=template.jinja(), tokenize=True,
                                                 return_dict=False)
        assert ids.tolist() == list(expected)
        supervised = tokenizer.decode(ids[mask == 1])
        end = "<|im_end|>" if own_template else tokenizer.eos_token
        assert supervised == record[key] + end  # the earlier bot turn ("hi") is not supervised
        assert tokenizer.decode(ids).count("You are helpful.") == (1 if own_template else 0)


@pytest.fixture(scope="module")
def model(tokenizer, template):
    config, _ = build_config({"model_config": "tiny-test", "seed": 3})
    return load_base_model(config, tokenizer, template)


def random_pairs(count: int, seed: int = 0):
    """`count` pairs of random token ids (prompt 5-9 tokens, answers 3-12), tasks 0 and 1, and random reference
    log-probs; as (chosen, rejected) Samples."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(count):
        prompt = rng.integers(3, 500, rng.integers(5, 10))
        sides = []
        for part in (0, 1):
            reply = rng.integers(3, 500, rng.integers(3, 13))
            ids = np.concatenate([prompt, reply]).astype(np.int32)
            mask = np.r_[np.zeros(len(prompt)), np.ones(len(reply))].astype(np.uint8)
            sides.append(Sample(ids, mask, k % 2, k, part, float(rng.uniform(-80, -20))))
        pairs.append(sides)
    return pairs


def plain_answer_logps(model, sample) -> tuple[float, int]:
    """An answer's summed log-prob from the HF model's own logits, and its token count."""
    ids = torch.from_numpy(sample.ids.astype(np.int64))[None]
    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    supervised = torch.from_numpy(sample.mask[1:].astype(bool))
    return float(logps[supervised].sum()), int(supervised.sum())


def expected_pair_loss(config, chosen, rejected, ref_c, ref_r) -> float:
    (pc, nc), (pr, nr) = chosen, rejected
    if config.objective == "orpo":
        a, b = pc / nc, pr / nr
        ratio = (a - math.log(-math.expm1(a))) - (b - math.log(-math.expm1(b)))
        return -a - config.beta * math.log(1 / (1 + math.exp(-ratio)))
    h = (pc - ref_c) - (pr - ref_r)
    loss = {"sigmoid": math.log1p(math.exp(-config.beta * h)), "ipo": (h - 1 / (2 * config.beta)) ** 2,
            "hinge": max(0.0, 1 - config.beta * h)}[config.dpo_loss]
    return loss + (config.rpo_alpha or 0) * (-pc / nc)


@pytest.mark.parametrize("settings", [
    {"objective": "dpo"}, {"objective": "dpo", "dpo_loss": "ipo", "beta": 0.5}, {"objective": "dpo", "dpo_loss": "hinge"},
    {"objective": "dpo", "rpo_alpha": 0.7, "weighted_loss_mode": "case1"}, {"objective": "orpo", "beta": 0.25}])
def test_pair_losses_and_rewards_equal_a_plain_computation_with_the_model_logits(tokenizer, model, settings):
    config = build_config({"weighted_loss_mode": "case3", **settings})[0]
    objective = make_objective(config)
    objective.reference = lambda runner, batch: batch.reference_logps[batch.loss_mask]  # as the cached reference
    pairs = random_pairs(5)
    batch = collate([[s] for pair in pairs for s in pair], tokenizer.pad_token_id)  # unpacked: a pair's two rows
    counts = objective.step_counts([batch], 2)
    assert counts.tokens.tolist() == [3.0, 2.0]  # pairs per task
    weights = torch.tensor([1.0, 3.0])
    loss, stats = objective.forward(SupervisedLM(model), batch, StepLoss(counts, config.weighted_loss_mode, weights))
    with torch.no_grad():
        expected = [expected_pair_loss(config, plain_answer_logps(model, c), plain_answer_logps(model, r),
                                       c.reference, r.reference) for c, r in pairs]
    assert stats.loss_sum.tolist() == pytest.approx(expected, rel=1e-5)
    tasks = np.array([c.task for c, _ in pairs])
    expected = np.array(expected)
    if config.weighted_loss_mode == "case1":
        objective_value = expected.mean()
    else:  # case3: the task means weighted by the task weights
        objective_value = (1 * expected[tasks == 0].mean() + 3 * expected[tasks == 1].mean()) / 4
    assert float(loss.detach()) == pytest.approx(objective_value, rel=1e-5)
    c0, r0 = pairs[0]
    with torch.no_grad():
        (pc, nc), (pr, nr) = plain_answer_logps(model, c0), plain_answer_logps(model, r0)
    if config.objective == "dpo":
        chosen_reward, rejected_reward = config.beta * (pc - c0.reference), config.beta * (pr - r0.reference)
    else:
        chosen_reward, rejected_reward = config.beta * pc / nc, config.beta * pr / nr
    assert float(stats.extras["rewards/chosen"][0]) == pytest.approx(chosen_reward, rel=1e-5)
    assert float(stats.extras["rewards/margins"][0]) == pytest.approx(chosen_reward - rejected_reward, rel=1e-4)
    assert float(stats.extras["rewards/accuracies"][0]) == float(chosen_reward > rejected_reward)


@pytest.mark.parametrize("packed,max_forward_tokens", [(False, 20), (True, 60)])
def test_dpo_gradient_accumulation_4_x_2_equals_one_batch_of_8(tokenizer, model, packed, max_forward_tokens):
    config = build_config({"objective": "dpo", "weighted_loss_mode": "case3"})[0]
    objective = make_objective(config)
    objective.reference = lambda runner, batch: batch.reference_logps[batch.loss_mask]
    pairs = random_pairs(8, seed=1)
    weights = torch.tensor([1.0, 2.0])

    def gradients(groups):
        batches = [collate([list(p) for p in group] if packed else [[s] for p in group for s in p],
                           tokenizer.pad_token_id, packed=packed) for group in groups]
        model.zero_grad(set_to_none=True)
        totals = TaskTotals.zeros(2, objective.metric_names)
        loss = accumulate_gradients(SupervisedLM(model), batches, objective, objective.step_counts(batches, 2),
                                    "case3", weights, Parallelism(DistEnv()), totals, contextlib.nullcontext(),
                                    max_forward_tokens)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, totals

    big_loss, big, big_totals = gradients([pairs])
    small_loss, small, small_totals = gradients([pairs[i:i + 2] for i in range(0, 8, 2)])
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    assert torch.equal(small_totals.samples, big_totals.samples) and big_totals.samples.tolist() == [4.0, 4.0]
    assert small_totals.loss_sum.numpy() == pytest.approx(big_totals.loss_sum.numpy(), rel=1e-6)
    for name in big:
        assert torch.allclose(small[name], big[name], rtol=1e-4, atol=1e-7), name
    assert max(float(g.abs().max()) for g in big.values()) > 1e-3


@pytest.mark.parametrize("mode", ["pack", "dynamic", "padding"])
def test_pairs_stay_whole_in_every_pass_on_every_rank(pair_tasks, tmp_path, mode):
    """Every pass of an epoch, for 1-3 ranks and passes down to one row, holds whole pairs, each pair once."""
    config = build_config({**pair_tasks, "model_config": "tiny-test", "output_dir": str(tmp_path), "seq_length": 64,
                           "data_split": "100,0,0", "padding_mode": mode})[0]
    from mftcoder.data.batching import SampleReader
    from mftcoder.data.prepare import prepare_data
    from mftcoder.model import load_tokenizer

    tokenizer, template = load_tokenizer(config)
    data = prepare_data(config, tokenizer, template, records=PreferencePairs())
    truncated = sum(t.truncated for t in data.per_task)
    assert truncated > 0  # seq_length 64 cuts some answers: each side of a pair on its own
    reader = SampleReader(data.per_task, tokenizer.pad_token_id, 64 if mode == "padding" else None,
                          packed=mode == "pack")
    plan = np.concatenate([np.stack([np.full(len(t.train), t.task.id), t.train], axis=1) for t in data.per_task])
    rows = arrange_rows(plan, plan_lengths(data.per_task, plan), mode, 128, 6, np.random.default_rng(0))
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            for rows_of_batch in micro_batches(rows, 3, rank, world):
                batch = reader[rows_of_batch]
                for max_tokens in (0, 1, 70):
                    pieces = batch.split_rows(max_tokens)
                    pairs = [sequence_sums(piece, torch.ones(int(piece.loss_mask.sum())))[0] for piece in pieces]
                    assert sum(len(p) for p in pairs) == sum(len(r) for r in rows_of_batch)
                    if max_tokens == 1 and mode != "pack":
                        assert all(piece.input_ids.shape[0] == 2 for piece in pieces)  # one pair: its two rows
                seen += [tuple(e) for row in rows_of_batch for e in row]
        assert sorted(seen) == sorted(map(tuple, plan))


def run_settings(pair_tasks, output_dir, **overrides):
    return build_config(run_values(pair_tasks, output_dir, **overrides))[0]


def run_values(pair_tasks, output_dir, **overrides) -> dict:
    return {**pair_tasks, "model_config": "tiny-test", "output_dir": str(output_dir), "seq_length": 96,
              "per_device_train_batch_size": 2, "learning_rate": 5e-3, "max_steps": 4, "log_interval": 1,
              "evaluation_steps": 2, "checkpointing_steps": 2, "data_split": "75,25,0", "num_warmup_steps": 0,
              "evaluate_before_training": True, "per_device_valid_batch_size": 4, "plot_curves": False,
              "peft_type": "lora", "lora_dropout": 0.0, **overrides}


def test_lora_dpo_run_starts_at_ln2_resumes_bitwise_and_evaluates_like_the_plain_model(pair_tasks, tmp_path):
    full = train(run_settings(pair_tasks, tmp_path / "full"))
    assert full.evaluations[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy = reference
    assert full.step_losses[0] == pytest.approx(math.log(2), abs=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["split"] == "train")  # policy and reference through the same output layer
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert {"rewards/margins/code_docstring_pairs", "rewards/accuracies", "logps/chosen"} <= rows[-1].keys()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(run_settings(pair_tasks, tmp_path / "resumed", resume_from_checkpoint="auto"))
    assert resumed.step_losses == full.step_losses[2:]  # bitwise
    # The final evaluation, recomputed from the saved adapter and base with the plain HF model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / RANDOM_BASE).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "full" / RANDOM_BASE),
                                       full.final_checkpoint).eval()
    trainer = Trainer(run_settings(pair_tasks, tmp_path / "probe"), DistEnv())
    trainer.close()
    for task in trainer.data.per_task:
        losses = []
        for record in task.valid:
            (c_ids, c_mask), (r_ids, r_mask) = task.sequences(int(record))
            with torch.no_grad():
                logps = {name: [plain_answer_logps(m, Sample(ids, mask, 0))[0] for ids, mask in
                                ((c_ids, c_mask), (r_ids, r_mask))] for name, m in (("policy", policy), ("base", base))}
            h = (logps["policy"][0] - logps["base"][0]) - (logps["policy"][1] - logps["base"][1])
            losses.append(math.log1p(math.exp(-0.1 * h)))
        assert full.evaluations[-1][f"loss/{task.task.name}"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    # What DPO produces is a checkpoint like SFT's: merged, then generating from a pair's prompt.
    from mftcoder.cli import main

    assert main(["merge", "--base_model_or_path", str(tmp_path / "full" / RANDOM_BASE), "--adaptor_path",
                 str(full.final_checkpoint), "--merged_output_path", str(tmp_path / "merged")]) == 0
    prompt = {"chat_rounds": [{"role": "human", "content": "Write a function that adds two numbers."}]}
    (tmp_path / "prompts.jsonl").write_text(json.dumps(prompt) + "\n")
    assert main(["generate", "--model", str(tmp_path / "merged"), "--input", str(tmp_path / "prompts.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "4"]) == 0
    assert len(json.loads((tmp_path / "out.jsonl").read_text())["generations"]) == 1


def test_full_fine_tuning_reference_is_computed_once_and_kept_with_the_run(pair_tasks, tmp_path):
    run = train(run_settings(pair_tasks, tmp_path / "dpo", peft_type=None, max_steps=2, xxpo="dpo",
                             weighted_loss_mode="case1"))
    assert run.evaluations[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = np.load(tmp_path / "dpo" / "reference_logps.npz")
    assert saved["task0"].shape == (16, 2) and (saved["task0"] < 0).all()
    # Resuming reads them from the run (a model after its first update cannot give them again).
    (tmp_path / "dpo" / "reference_logps.npz").unlink()
    with pytest.raises(Exception, match="reference log-probs of this run are missing"):
        train(run_settings(pair_tasks, tmp_path / "dpo", peft_type=None, max_steps=2, objective="dpo",
                           weighted_loss_mode="case1", resume_from_checkpoint="auto"))


def test_a_bad_pair_is_reported_with_its_line(tmp_path, tokenizer, template):
    folder = write_task(tmp_path, "pairs", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                            {"prompt": "p", "chosen": "a", "rejected": "a"}])
    lines = [(i + 1, line) for i, line in enumerate((folder / "data.jsonl").read_text().splitlines())]
    chunk = ChunkEncoder(tokenizer, template, None, PreferencePairs())(("data.jsonl", lines))
    assert chunk.errors == ["data.jsonl:2: 'chosen' and 'rejected' are the same answer: nothing to prefer"]
    assert list(chunk.lines) == [1, 1]
    assert parse_json_object('{"prompt": "p"}') == {"prompt": "p"}


def test_two_ranks_under_fsdp_equal_one_rank_with_the_reference_computed_sharded(pair_tasks, tmp_path):
    """Full fine-tuning: the reference log-probs come from the sharded model; 2 ranks of 2 pairs = 1 rank of 4."""
    common = dict(peft_type=None, max_steps=2, evaluate_before_training=False, padding_mode="dynamic",
                  adam_epsilon=1e-5, learning_rate=1e-3, evaluation_steps=2, checkpointing_steps=2, num_warmup_steps=0)
    single = train(run_settings(pair_tasks, tmp_path / "one", per_device_train_batch_size=4, **common))
    done = run_two_ranks(run_values(pair_tasks, tmp_path / "two", total_train_batch_size=4,
                                    distributed_strategy="fsdp", **common))
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = np.load(tmp_path / "one" / "reference_logps.npz"), np.load(tmp_path / "two" / "reference_logps.npz")
    assert str(one["key"]) == str(two["key"])
    for task in ("task0", "task1"):
        np.testing.assert_allclose(two[task], one[task], rtol=1e-5)
    assert train_losses(tmp_path / "two") == pytest.approx(single.step_losses, rel=1e-5)
    a, b = final_weights(tmp_path / "one", 2), final_weights(tmp_path / "two", 2)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["rewards/margins"] == pytest.approx(single.evaluations[-1]["rewards/margins"], rel=1e-4)


def test_keys_of_another_objective_are_named_as_ignored():
    config, notices = build_config({"beta": 0.2, "rpo_alpha": 0.5})
    assert config.objective == "sft"
    assert [n for n in notices if "read only with objective" in n] == [
        "beta is read only with objective: dpo or orpo (this run has objective: sft); it is ignored",
        "rpo_alpha is read only with objective: dpo (this run has objective: sft); it is ignored"]
    assert build_config({"xxpo": "orpo", "beta": 0.2})[0].objective == "orpo"


def test_the_shipped_demo_pairs_are_what_their_builder_writes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mftcoder.model import DEMO_PAIRS

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_pairs.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True)
    for task in ("code_docstring_pairs", "code_generation_pairs"):
        assert (tmp_path / task / "train.jsonl").read_bytes() == (DEMO_PAIRS / task / "train.jsonl").read_bytes()
