"""`mftcoder eval --pairs`: preference pairs (DPO format) from answers whose tests passed and failed, built from given
verdicts (no model); the conversation of a pair is the one eval prompted with, token for token; the refusals before any
model loads; the shipped practice problems load, their reference solutions pass in the sandbox and wrong ones fail;
and (opt-in, -m slow) the whole command on a tiny model that learned a right and a wrong answer to each prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mftcoder.cli import main
from mftcoder.codeeval.pairs import PairsFile, build_pairs
from mftcoder.codeeval.problems import user_problems
from mftcoder.codeeval.score import Completion, execute
from mftcoder.config import build_config
from mftcoder.data.template import saved_template
from mftcoder.data.tokenize import ChunkEncoder
from mftcoder.infer import prompt_ids
from mftcoder.model import load_tokenizer
from mftcoder.objectives.pairs import PreferencePairs, pair_turns

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ROOT / "mftcoder" / "assets" / "problems"
sys.path.insert(0, str(ROOT / "scripts"))
import build_practice_problems as practice  # noqa: E402  (the problems' source, with their wrong solutions)

SYSTEM = "Answer with code only."
ADD = "Write add(a, b) that returns a + b, in one ```python code block."


def fenced(code: str, after: str = "") -> str:
    return f"```python\n{code}\n```{after}"


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "toy.jsonl"
    records = [{"task_id": "add", "prompt": ADD, "test": "assert add(2, 3) == 5"},
               {"task_id": "neg", "chat_rounds": [{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": "Write neg(x)."}],
                "test": "def check(f):\n    assert f(2) == -2", "entry_point": "neg"},
               {"task_id": "one", "prompt": "Write one() that returns 1.", "test": "assert one() == 1"},
               {"task_id": "cut", "prompt": "Write two() that returns 2.", "test": "assert two() == 2"},
               {"task_id": "same", "prompt": "Write three() that returns 3.", "test": "assert three() == 3"},
               {"task_id": "many", "prompt": "Write sq(x) that returns x * x.", "test": "assert sq(3) == 9"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return user_problems(path)


def rows_for(problems, answers: dict[str, list[tuple[str, str]]], cut: set = frozenset()) -> list[dict]:
    """Result rows as `execute` writes them: each answer with a given status (passed, failed, timed out, ...)."""
    by_id = {p.task_id: p for p in problems}
    rows = []
    for task_id, items in answers.items():
        for sample, (answer, status) in enumerate(items):
            problem = by_id[task_id]
            rows.append({"task_id": task_id, "benchmark": problem.benchmark, "sample": sample,
                         "completion": problem.completion(answer), "passed": status == "passed", "status": status,
                         "error": "", "seconds": 0.01, "answer": answer,
                         "max_new_tokens_reached": (task_id, sample) in cut})
    return rows


ADD_RIGHT = fenced("def add(a, b):\n    return a + b")
ADD_RIGHT_TOO = fenced("def add(x, y):\n    return y + x")
ADD_WRONG = fenced("def add(a, b):\n    return a - b")
ADD_LOOP = fenced("def add(a, b):\n    while True:\n        pass")
ADD_NONE = fenced("def add(a, b):\n    pass")


def test_pairs_from_given_verdicts(problems):
    answers = {
        # add: 2 distinct passing texts (one twice), 3 distinct failing ones (one twice, one blank): 3 pairs,
        # each passing answer in turn against each failing one, the timed-out one last.
        "add": [(ADD_RIGHT, "passed"), (ADD_WRONG, "failed"), (ADD_LOOP, "timed out"), (ADD_RIGHT, "passed"),
                (ADD_NONE, "failed"), (ADD_RIGHT_TOO, "passed"), (ADD_WRONG, "failed"), ("  \n", "failed")],
        "neg": [(fenced("def neg(x):\n    return -x"), "passed"), (fenced("def neg(x):\n    return x"), "failed")],
        "one": [(fenced("def one():\n    return 1"), "passed")] * 3,  # all passed
        # cut: the only passing answer stopped at max_new_tokens: nothing to choose
        "cut": [("```python\ndef two():\n    return 2\n\nprint(two())\nprint(two", "passed"),
                (fenced("def two():\n    return 3"), "failed")],
        # same: the failing answer runs the very code that passed (it differs in prose only), and a text that both
        # passed and failed (a flaky verdict) takes no part
        "same": [(fenced("def three():\n    return 3"), "passed"),
                 (fenced("def three():\n    return 3", "\nThis returns 3."), "timed out"),
                 (fenced("def three():\n    return 3 + 0"), "passed"),
                 (fenced("def three():\n    return 3 + 0"), "failed")],
        # many: one passing answer, six failing ones: the cap (4) takes the first four, plain failures before the
        # one a limit stopped (out of memory, sample 0)
        "many": [(fenced(f"def sq(x):\n    return {k}"), "failed" if k else "out of memory") for k in range(6)] +
                [(fenced("def sq(x):\n    return x ** 2"), "passed")],
    }
    rows = rows_for(problems, answers, cut={("cut", 0)})
    pairs, stats = build_pairs(problems, rows)

    def prompt(task_id):
        if task_id == "neg":
            return [{"role": "system", "content": SYSTEM}, {"role": "human", "content": "Write neg(x)."}]
        return [{"role": "human", "content": next(p for p in problems if p.task_id == task_id).turns[0].content}]

    def pair(task_id, chosen, rejected, samples, status="failed"):
        return {"chosen": prompt(task_id) + [{"role": "bot", "content": chosen}],
                "rejected": prompt(task_id) + [{"role": "bot", "content": rejected}],
                "task_id": task_id, "benchmark": "toy", "chosen_sample": samples[0], "rejected_sample": samples[1],
                "rejected_status": status}

    sq = [fenced(f"def sq(x):\n    return {k}") for k in range(6)]
    assert pairs == [
        pair("add", ADD_RIGHT, ADD_WRONG, (0, 1)),
        pair("add", ADD_RIGHT_TOO, ADD_NONE, (5, 4)),
        pair("add", ADD_RIGHT, ADD_LOOP, (0, 2), "timed out"),
        pair("neg", fenced("def neg(x):\n    return -x"), fenced("def neg(x):\n    return x"), (0, 1)),
        *[pair("many", fenced("def sq(x):\n    return x ** 2"), sq[k], (6, k)) for k in range(1, 5)],
    ]
    assert (stats.problems_with_pairs, stats.pairs, stats.all_passed, stats.all_failed, stats.without_pair) == \
        (3, 8, 1, 0, 2)
    assert stats.line(Path("p.jsonl")) == ("pairs: 8 pair(s) from 3 problem(s) written to p.jsonl; 1 problem(s) all "
                                           "passed, 0 all failed, 2 with both but no usable pair")
    # The cap, and an all-failed problem; a record is a training record's chat_rounds twice, identical but the answer.
    capped, stats = build_pairs(problems, rows_for(problems, {"add": answers["add"], "cut": answers["cut"][1:]}), 1)
    assert capped == pairs[:1] and (stats.pairs, stats.all_failed, stats.without_pair) == (1, 1, 0)
    for record in pairs:  # as the DPO objective reads a record: the problem's turns, then the two answers
        assert pair_turns(record) == (next(p for p in problems if p.task_id == record["task_id"]).turns,
                                      record["chosen"][-1]["content"], record["rejected"][-1]["content"])
    # From a results file, as eval writes it (the same rows, through JSON): the same pairs.
    assert build_pairs(problems, json.loads(json.dumps(rows)))[0] == pairs


def test_pairs_from_verdicts_of_the_sandbox(problems):
    """The same policy on verdicts the sandbox gives (a wrong answer, an endless loop, a right one)."""
    add = problems[0]
    answers = [ADD_WRONG, ADD_RIGHT, ADD_LOOP]
    from mftcoder.codeeval.sandbox import Limits, Sandbox

    rows = execute([Completion(add, i, add.completion(a), a) for i, a in enumerate(answers)],
                   Sandbox(Limits(timeout=1)), progress=False)
    assert [(r["status"], r["max_new_tokens_reached"]) for r in rows] == \
        [("failed", False), ("passed", False), ("timed out", False)]
    pairs, _ = build_pairs(problems, rows)
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"], p["rejected_status"]) for p in pairs] == \
        [(ADD_RIGHT, ADD_WRONG, "failed"), (ADD_RIGHT, ADD_LOOP, "timed out")]


# A template in SmolLM2's shape (ChatML with a default system prompt), written for this test.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou help with code.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("style", ["mftcoder", "chatml"])
def test_a_pair_is_the_conversation_eval_prompted_with(problems, tmp_path, style):
    """Read and tokenized by the DPO objective's own encoder, a pair is two sequences, each eval's prompt token for
    token, then the answer (the only loss span) and the end of the turn: for the default template and for a
    checkpoint's own (ChatML with a default system prompt)."""
    from transformers import AutoTokenizer

    from mftcoder.model import SHIPPED_TOKENIZER

    folder = tmp_path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    if style == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    # training: the config's template; eval: the template the checkpoint's tokenizer carries
    trained, template = load_tokenizer(build_config({"tokenizer_path": str(folder),
                                                     "chat_template": "model" if style == "chatml" else "mftcoder"})[0])
    if style == "mftcoder":
        tokenizer.chat_template = template.jinja()  # as a checkpoint saves it (and `mftcoder eval` sets it)
    answers = {"add": [(ADD_RIGHT, "passed"), (ADD_WRONG, "failed")],
               "neg": [(fenced("def neg(x):\n    return -x"), "passed"), ("def neg(x): return x", "failed")]}
    pairs, _ = build_pairs(problems, rows_for(problems, answers))
    chunk = ChunkEncoder(trained, template, None, PreferencePairs())(
        ("pairs.jsonl", [(i + 1, json.dumps(record)) for i, record in enumerate(pairs)]))
    assert chunk.errors == [] and chunk.lines.tolist() == [1, 1, 2, 2]  # two sequences a pair: chosen, rejected
    starts = np.cumsum([0, *chunk.lengths])
    end = "<|im_end|>" if style == "chatml" else trained.eos_token
    for i, (record, side) in enumerate((record, side) for record in pairs for side in ("chosen", "rejected")):
        problem = next(p for p in problems if p.task_id == record["task_id"])
        prompt = prompt_ids(tokenizer, problem.turns, saved_template(tokenizer))  # as generate_completions renders
        ids, mask = chunk.ids[starts[i]:starts[i + 1]].tolist(), chunk.mask[starts[i]:starts[i + 1]].tolist()
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        assert trained.decode([t for t, m in zip(ids, mask) if m]) == record[side][-1]["content"] + end


def test_pairs_file_refusals_come_before_the_model(tmp_path, capsys):
    problems = tmp_path / "one.jsonl"
    problems.write_text(json.dumps({"prompt": "p", "test": "assert True"}) + "\n")
    output = tmp_path / "out.jsonl"
    base = ["eval", "--model", str(tmp_path / "no-model"), "--benchmark", str(problems), "--output", str(output),
            "--skip_problem_check", "--n", "4"]
    (tmp_path / "file").write_text("x")
    for extra, why in [
        (["--pairs", str(tmp_path)], f"--pairs {tmp_path}: is a folder; give the path of a JSONL file to write"),
        (["--pairs", ""], "--pairs .: is a folder; give the path of a JSONL file to write"),
        (["--pairs", str(output)], f"--pairs {output}: is the --output file; give the pairs a file of their own"),
        (["--pairs", str(output.with_suffix(".summary.json"))], f"--pairs {output.with_suffix('.summary.json')}: is "
         "the summary file of --output; give the pairs a file of their own"),
        (["--pairs", str(problems)], f"--pairs {problems}: is a --benchmark file; give the pairs a file of their own"),
        (["--pairs", str(tmp_path / "file" / "p.jsonl")],
         f"--pairs {tmp_path / 'file' / 'p.jsonl'}: cannot write there ({tmp_path / 'file'} is a file, not a folder)"),
        (["--pairs", "p.jsonl", "--n", "1"], "--pairs: needs at least 2 sampled answers per problem to find passing "
         "and failing ones: --n 2 or more"),
        (["--pairs", "p.jsonl", "--greedy", "--n", "1"], "--pairs: needs at least 2 sampled answers per problem to "
         "find passing and failing ones: --n 2 or more, without --greedy"),
        (["--max_pairs_per_problem", "2"], "--max_pairs_per_problem: applies to the pairs of --pairs FILE; give "
         "--pairs too"),
    ]:
        assert main(base + extra) == 2, extra
        assert capsys.readouterr().err == f"error: {why}\n"
        assert not output.exists()
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"task_id": "one/1", "completion": "pass"}) + "\n")
    assert main(["eval", "--completions", str(completions), "--benchmark", str(problems), "--pairs", "p.jsonl"]) == 2
    assert capsys.readouterr().err.startswith("error: --pairs: needs --model; pairs are made of the model's own "
                                              "replies")


def test_a_pairs_file_is_never_half_written(tmp_path, capsys):
    problems = tmp_path / "one.jsonl"
    problems.write_text(json.dumps({"prompt": "p", "test": "assert True"}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("earlier\n")
    # the run fails after the pairs file was checked (no model there): the earlier file stays, nothing else is left
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--benchmark", str(problems), "--n", "2",
                 "--skip_problem_check", "--pairs", str(pairs), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "no-model does not exist" in capsys.readouterr().err
    assert pairs.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["one.jsonl", "out.jsonl", "pairs.jsonl"]
    # writing fails part-way (a record that is not JSON): the same
    writer = PairsFile(pairs)
    with pytest.raises(TypeError):
        writer.commit([{"chosen": []}, {"chosen": object()}])
    assert pairs.read_text() == "earlier\n" and len(list(tmp_path.iterdir())) == 3
    PairsFile(pairs).commit([{"chosen": [], "rejected": []}])
    assert pairs.read_text() == '{"chosen": [], "rejected": []}\n' and len(list(tmp_path.iterdir())) == 3


def test_the_practice_problems_load_and_each_has_tests():
    sets = {name: user_problems(PROBLEMS / f"{name}.jsonl") for name in ("practice", "practice_heldout")}
    assert {name: len(found) for name, found in sets.items()} == {"practice": 45, "practice_heldout": 15}
    every = [p for found in sets.values() for p in found]
    assert len({p.task_id for p in every}) == 60
    for problem in every:
        assert problem.entry_point == problem.task_id and problem.canonical and len(problem.turns) == 1
        assert problem.test.startswith("def check(candidate):\n") and problem.test.count("assert candidate(") >= 3
        assert problem.turns[0].content.endswith("Reply with the complete function in one ```python code block.")
    # the files are what the script writes
    practice_set, heldout = practice.split(practice.PROBLEMS)
    for name, written in (("practice", practice_set), ("practice_heldout", heldout)):
        assert (PROBLEMS / f"{name}.jsonl").read_text() == "".join(json.dumps(x.record()) + "\n" for x in written)


def test_the_practice_solutions_pass_in_the_sandbox_and_wrong_ones_fail(tmp_path, capsys):
    """Through `mftcoder eval`: its problem check runs every reference solution (none is broken), then the wrong
    solutions, one per problem, are scored: all fail."""
    completions = tmp_path / "wrong.jsonl"
    completions.write_text("".join(json.dumps({"task_id": x.name, "completion": x.wrong}) + "\n"
                                   for x in practice.PROBLEMS))
    assert main(["eval", "--completions", str(completions), "--benchmark", str(PROBLEMS / "practice.jsonl"),
                 "--benchmark", str(PROBLEMS / "practice_heldout.jsonl"), "--timeout", "5"]) == 0
    out, err = capsys.readouterr()
    assert "broken" not in err and out.startswith("pass@1 0.0000, pass@1/practice 0.0000, pass@1/practice_heldout "
                                                  "0.0000: 60 of 60 problem(s), 60 completion(s)")
    rows = [json.loads(line) for line in (tmp_path / "wrong_results.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and not any(r["passed"] for r in rows)


TWO_WAYS = {  # a prompt, the answer that passes and the one that fails: the tiny model learns both, equally often
    "triple": ("Write triple(x) that returns three times x.", "def triple(x):\n    return 3 * x",
               "def triple(x):\n    return 3 + x", "assert triple(4) == 12"),
    "shout": ("Write shout(s) that returns s in upper case.", "def shout(s):\n    return s.upper()",
              "def shout(s):\n    return s.lower()", "assert shout('hi') == 'HI'"),
}


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    """A tiny model that learned a right and a wrong answer to each prompt, and the problems."""
    from mftcoder.train.loop import train

    root = tmp_path_factory.mktemp("two_ways")
    (root / "two_ways").mkdir()
    (root / "two_ways" / "data.jsonl").write_text("".join(
        json.dumps({"prompt": prompt, "answer": fenced(code)}) + "\n"
        for prompt, right, wrong, _ in TWO_WAYS.values() for code in (right, wrong)))
    (root / "problems.jsonl").write_text("".join(json.dumps({"task_id": name, "prompt": prompt, "test": test}) + "\n"
                                                for name, (prompt, _, _, test) in TWO_WAYS.items()))
    config = build_config({"data_paths": [str(root / "two_ways")], "model_config": "tiny-test",
                           "output_dir": str(root / "out"), "seq_length": 64, "per_device_train_batch_size": 4,
                           "learning_rate": 5e-3, "lr_scheduler_type": "constant", "num_warmup_steps": 0,
                           "max_steps": 40, "num_train_epochs": 100, "log_interval": 40, "evaluation_steps": 40,
                           "checkpointing_steps": 40, "data_split": "100,0,0", "plot_curves": False})[0]
    train(config)
    return root / "out" / "checkpoint-40", root / "problems.jsonl"


@pytest.mark.slow
def test_eval_writes_the_pairs_of_its_own_answers(two_ways, tmp_path, capsys):
    """The whole command: a model sampled 8 times per problem, its answers run, and pairs of its own replies written
    (as build_pairs makes them from the results file), each a passing and a failing reply to the same prompt. Opt-in
    (-m slow): 20 to 40 s here, most of it training the tiny model."""
    checkpoint, problems = two_ways
    output, pairs = tmp_path / "results.jsonl", tmp_path / "pairs" / "pairs.jsonl"
    assert main(["eval", "--model", str(checkpoint), "--benchmark", str(problems), "--n", "8", "--temperature", "1",
                 "--top_p", "1", "--max_new_tokens", "40", "--output", str(output), "--pairs", str(pairs),
                 "--max_pairs_per_problem", "3", "--skip_problem_check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    written = [json.loads(line) for line in pairs.read_text().splitlines()]
    expected, stats = build_pairs(user_problems(problems), rows, 3)
    assert written == expected and lines[1] == stats.line(pairs)
    assert stats.problems_with_pairs == 2 and stats.pairs >= 2  # both answers were sampled for both problems
    answers = {(r["task_id"], r["answer"]): r["passed"] for r in rows}
    assert all(not r["max_new_tokens_reached"] for r in rows)
    for record in written:
        prompt = [{"role": "human", "content": TWO_WAYS[record["task_id"]][0]}]
        assert record["chosen"][:-1] == record["rejected"][:-1] == prompt
        assert answers[(record["task_id"], record["chosen"][-1]["content"])] is True
        assert answers[(record["task_id"], record["rejected"][-1]["content"])] is False
    assert sorted(p.name for p in pairs.parent.iterdir()) == ["pairs.jsonl"]
    # DPO's data check reads every pair as a good record, with the checkpoint's template
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"objective": "dpo", "data_paths": [str(pairs.parent)],
                                  "pretrained_model_path": str(checkpoint), "chat_template": "model",
                                  "seq_length": 128, "data_split": "100,0,0", "output_dir": str(tmp_path / "dpo"),
                                  "data_cache_dir": str(tmp_path / "cache")}))
    assert main(["data", "check", str(config)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:4] == ["pairs", str(len(written)), "0", str(len(written))]  # lines, bad, kept
