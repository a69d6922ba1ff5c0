"""pass@1 during training: a tiny model memorizes three answers, and metric_for_best_model: pass@1 keeps the checkpoint
that writes the most correct code; under torchrun the problems are split across ranks and the counts summed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mftcoder.cli import main
from mftcoder.config import ConfigError, build_config
from mftcoder.train.loop import train
from test_distributed import run_two_ranks

FUNCTIONS = {  # prompt, the memorized answer's code, the test
    "triple": ("Write triple(x) that returns three times x.", "def triple(x):\n    return 3 * x", "assert triple(4) == 12"),
    "shout": ("Write shout(s) that returns s in upper case.", "def shout(s):\n    return s.upper()",
              "assert shout('hi') == 'HI'"),
    "first": ("Write first(xs) that returns the first item.", "def first(xs):\n    return xs[0]",
              "assert first([7, 8]) == 7"),
}


@pytest.fixture(scope="module")
def memo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memo")
    (root / "memo").mkdir()
    (root / "memo" / "data.jsonl").write_text("".join(
        json.dumps({"prompt": p, "answer": f"```python\n{code}\n```"}) + "\n" for p, code, _ in FUNCTIONS.values()))
    (root / "problems.jsonl").write_text("".join(
        json.dumps({"task_id": name, "prompt": p, "test": test}) + "\n" for name, (p, _, test) in FUNCTIONS.items()))
    return root


def values(root: Path, output_dir: Path, **overrides) -> dict:
    return {"data_paths": [str(root / "memo")], "model_config": "tiny-test", "output_dir": str(output_dir),
            "seq_length": 96, "per_device_train_batch_size": 3, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
            "num_warmup_steps": 0, "max_steps": 40, "num_train_epochs": 100, "log_interval": 5, "evaluation_steps": 5,
            "checkpointing_steps": 5, "data_split": "100,0,0", "plot_curves": False, "save_total_limit": 2,
            "generation_eval": [str(root / "problems.jsonl")], "generation_eval_max_new_tokens": 40,
            "metric_for_best_model": "pass@1", "evaluate_before_training": False, **overrides}


@pytest.fixture(scope="module")
def memorized(memo, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    return train(build_config(values(memo, output_dir))[0]), output_dir


def test_pass_at_1_keeps_the_checkpoint_that_writes_the_most_correct_code(memorized):
    result, output_dir = memorized
    scores = {e["step"]: e["pass@1"] for e in result.evaluations}
    assert sorted(scores) == list(range(5, 45, 5))
    assert all(scores[step] == e["pass@1/problems"] for step, e in zip(scores, result.evaluations))
    assert set(scores.values()) <= {0.0, 1 / 3, 2 / 3, 1.0} and max(scores.values()) == 1.0  # it learned all three
    best_step = min(step for step, score in scores.items() if score == 1.0)  # the first to reach the top
    assert result.state.best_checkpoint == f"checkpoint-{best_step}" and result.state.best_metric == 1.0
    kept = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best_step}", "checkpoint-40"})  # save_total_limit 2: the best and the newest
    assert best_step < 40


def test_pass_at_1_is_logged_with_every_completion(memorized):
    result, output_dir = memorized
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r["split"] == "eval"]
    assert [(r["step"], r["pass@1"]) for r in evals] == [(e["step"], e["pass@1"]) for e in result.evaluations]
    events = EventAccumulator(str(output_dir / "runs")).Reload()
    assert [round(e.value, 6) for e in events.Scalars("eval/pass@1")] == [round(e["pass@1"], 6)
                                                                         for e in result.evaluations]
    last = [json.loads(line) for line in (output_dir / "generation_eval" / "step-40.jsonl").read_text().splitlines()]
    assert sorted(r["task_id"] for r in last) == sorted(FUNCTIONS)
    assert all(r["passed"] and r["completion"] == FUNCTIONS[r["task_id"]][1] + "\n" for r in last)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_split_the_problems_and_sum_the_counts(memo, memorized, tmp_path, strategy):
    result, output_dir = memorized
    trained = output_dir / "checkpoint-40"  # writes all three answers correctly
    done = run_two_ranks(values(memo, tmp_path / "two", pretrained_model_path=str(trained), model_config=None,
                                max_steps=1, evaluate_before_training=True, save_total_limit=None,
                                distributed_strategy=strategy))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "generation_eval" / "step-0.jsonl").read_text().splitlines()]
    assert sorted(r["task_id"] for r in rows) == sorted(FUNCTIONS) and all(r["passed"] for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pass@1"] for r in logged if r["split"] == "eval" and r["step"] == 0] == [1.0]


@pytest.mark.parametrize("overrides, message", [
    ({"metric_for_best_model": "pass@1"}, "is measured by generation_eval"),
    ({"metric_for_best_model": "pass@1", "generation_eval": ["humaneval"], "greater_is_better": False},
     "greater_is_better: false would keep the checkpoints with the lowest pass@1"),
    ({"metric_for_best_model": "accuracy"}, "expected 'loss', 'loss/<task>', 'pass@1' or 'pass@1/<benchmark>'"),
])
def test_pass_at_1_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_config": "tiny-test", "data_paths": ["x"], **overrides})


def test_greater_is_better_follows_the_metric_unless_given():
    assert build_config({"metric_for_best_model": "loss"})[0].greater_is_better is False
    assert build_config({"metric_for_best_model": "pass@1", "generation_eval": ["humaneval"]})[0].greater_is_better
    assert build_config({"metric_for_best_model": "loss", "greater_is_better": True})[0].greater_is_better


def test_an_unknown_benchmark_metric_names_the_choices(memo, tmp_path):
    config = build_config(values(memo, tmp_path / "out", metric_for_best_model="pass@1/humaneval", max_steps=1))[0]
    with pytest.raises(ConfigError, match="choose from loss, loss/memo, pass@1, pass@1/problems"):
        train(config)


def test_the_eval_command_scores_a_trained_checkpoint(memo, memorized, tmp_path, capsys):
    _, output_dir = memorized
    output = tmp_path / "results.jsonl"
    assert main(["eval", "--model", str(output_dir / "checkpoint-40"), "--benchmark", str(memo / "problems.jsonl"),
                 "--n", "3", "--k", "1,2", "--temperature", "0.1", "--max_new_tokens", "40",
                 "--output", str(output)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("pass@1 1.0000, pass@2 1.0000: 3 of 3 problem(s), 9 completion(s) (generation ")
    rows = [json.loads(text) for text in output.read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [(name, i) for name in FUNCTIONS for i in range(3)]
    assert all(r["passed"] and r["answer"].startswith("```python\n") for r in rows)


@pytest.mark.parametrize("arguments, message", [
    (["--completions", "x.jsonl", "--model", "m"], "give --model DIR"),
    ([], "give --model DIR"),
    (["--model", "m", "--k", "1,10"], "--k 10 needs at least that many samples per problem: --n 10"),
    (["--model", "m", "--greedy", "--n", "4"], "--greedy: greedy decoding gives one completion per problem"),
    (["--model", "m", "--k", "0"], "--k: expected positive integers"),
    (["--completions", "x.jsonl", "--limit", "3"], "--limit chooses the problems to generate for"),
])
def test_eval_arguments_are_checked(arguments, message, capsys):
    assert main(["eval", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_generating_during_training_leaves_the_training_run_unchanged(memo, tmp_path):
    common = dict(max_steps=4, evaluation_steps=2, checkpointing_steps=4, save_total_limit=None, lora_dropout=0.1,
                  peft_type="lora", metric_for_best_model="loss")  # dropout: the random stream matters
    plain = train(build_config(values(memo, tmp_path / "plain", generation_eval=[], **common))[0])
    measured = train(build_config(values(memo, tmp_path / "measured", **common))[0])
    assert [e["step"] for e in measured.evaluations] == [2, 4]
    assert measured.step_losses == plain.step_losses  # bitwise
