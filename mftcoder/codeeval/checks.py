"""Check a problem set before it scores a model: every test compiles and defines the `check` it is called through, and
every canonical solution given passes in the sandbox. A broken problem is named, not counted as the model's failure."""

from __future__ import annotations

import ast

from mftcoder.codeeval.problems import Problem
from mftcoder.codeeval.sandbox import Sandbox, run_all


def static_fault(problem: Problem) -> str | None:
    """Why the problem's test cannot judge any completion (it does not compile, or lacks `check`), else None."""
    try:
        tree = ast.parse(problem.test)
    except SyntaxError as exc:
        return f"its test does not compile: {exc.msg} (line {exc.lineno})"
    if problem.entry_point:
        names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        names |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                  if isinstance(target, ast.Name)}
        if "check" not in names:
            return f"its test defines no check function to call with entry_point {problem.entry_point!r}"
    return None


def broken_problems(problems: list[Problem], sandbox: Sandbox | None, workers: int | None = None,
                    progress: bool = True) -> dict[Problem, str]:
    """{problem: reason} of the problems that cannot score a model; canonical solutions run in `sandbox` (None: not run)."""
    broken = {p: fault for p in problems if (fault := static_fault(p))}
    runnable = [p for p in problems if p.canonical is not None and p not in broken]
    if sandbox is not None and runnable:
        verdicts = run_all(sandbox, [p.program(p.canonical) for p in runnable], workers, progress,
                           desc="check problems")
        for problem, verdict in zip(runnable, verdicts):
            if not verdict.passed:
                broken[problem] = f"its canonical solution fails: {verdict.error or verdict.status}"
    return broken
