"""The shipped practice problems load, their reference solutions pass in the sandbox and wrong ones fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mftcoder.cli import main
from mftcoder.codeeval.problems import user_problems

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ROOT / "mftcoder" / "assets" / "problems"
sys.path.insert(0, str(ROOT / "scripts"))
import build_practice_problems as practice  # noqa: E402  (the problems' source, with their wrong solutions)


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

