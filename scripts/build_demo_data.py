#!/usr/bin/env python
"""Build small multi-task, chat-format demo data from the Python standard library.

The script walks the source tree of the running interpreter's standard library,
collects documented functions and methods with ``ast`` and turns them into three
small fine-tuning tasks:

* ``code_generation`` -- write a function from its docstring summary and signature;
* ``code_docstring``  -- write the docstring for a function shown without it;
* ``code_multiturn``  -- write a function, then explain it (explanation derived
  mechanically from the AST).

Every task is written to ``<out>/<task>/train.jsonl`` (one JSON object per line)
and a ``<out>/README.md`` describes the result.  The output depends only on the
standard library source, ``--per-task`` and ``--seed``: running the script twice
with the same Python version produces byte-identical files.

Usage::

    python scripts/build_demo_data.py --out mftcoder/assets/demo_data --per-task 300 --seed 1234
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import platform
import random
import re
import sys
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]

TASKS: tuple[str, ...] = ("code_generation", "code_docstring", "code_multiturn")

# Directory names (anywhere in the tree) that are never read.
SKIP_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}
)
# Platform-specific parts of the tree; skipped so the output is the same everywhere.
SKIP_PREFIXES: tuple[str, ...] = ("config-", "_sysconfigdata_")

MIN_LINES = 3
MAX_LINES = 40
MAX_CHARS = 1200
MAX_DOC_CHARS = 1000
MAX_SUMMARY_CHARS = 300
MIN_SUMMARY_WORDS = 3
MAX_LISTED_CALLS = 12
MAX_EXPR_CHARS = 40

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful coding assistant.",
    "You are an expert Python programmer. Answer with clear, idiomatic code.",
    "You are a helpful assistant that writes correct and readable Python code.",
)
SYSTEM_PROMPT_RATE = 1 / 3

GENERATION_TEMPLATES: tuple[str, ...] = (
    "Write a Python {kind} {sig} that does the following:\n{summary}",
    "Implement the Python {kind} {sig}.\nIt should do this: {summary}",
    "Please write {kind} {sig} in Python.\nDescription: {summary}",
)
DOCSTRING_TEMPLATES: tuple[str, ...] = (
    "Write a docstring for this {kind}:\n```python\n{code}\n```",
    "Add a suitable docstring to the following Python {kind}. Reply with the docstring text only.\n"
    "```python\n{code}\n```",
    "What would be a good docstring for this {kind}?\n```python\n{code}\n```",
)
# Follow-up questions of the multi-turn task, each with the answer sections it gets.
FOLLOW_UPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Explain what it does and which names it uses.", ("origin", "summary", "params", "calls")),
    ("Which arguments does it take and what does it return?", ("params", "returns", "raises")),
    (
        "Give me a short overview: where it comes from, its parameters, what it returns, "
        "what it may raise and which functions it calls.",
        ("origin", "summary", "params", "returns", "raises", "calls"),
    ),
)


@dataclass(frozen=True)
class Candidate:
    """A documented function or method taken from the standard library."""

    module: str  # dotted module name, e.g. "json.decoder"
    source: str  # "<path relative to stdlib>:<first line of the snippet>"
    name: str
    class_name: str | None
    code: str  # dedented source, docstring included
    code_without_doc: str  # dedented source with the docstring lines removed
    docstring: str  # cleaned with inspect.cleandoc
    summary: str  # first docstring paragraph on one line
    node: FunctionNode  # parsed from ``code``


# --------------------------------------------------------------------------- walking


def iter_stdlib_files(root: Path) -> Iterator[Path]:
    """Yield the ``.py`` files below ``root`` in sorted order, minus skipped parts."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_PREFIXES)
        )
        for filename in sorted(filenames):
            if filename.endswith(".py") and not filename.startswith(SKIP_PREFIXES):
                yield Path(dirpath, filename)


def module_name(rel_path: str) -> str:
    """Turn ``json/__init__.py`` into ``json`` and ``json/decoder.py`` into ``json.decoder``."""
    parts = rel_path[: -len(".py")].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def read_module(path: Path) -> tuple[str, ast.Module] | None:
    """Return the text (newlines normalised) and AST of a file, or None if unusable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    tree = parse_quietly(text, filename=str(path))
    return None if tree is None else (text, tree)


def iter_functions(tree: ast.Module) -> Iterator[tuple[FunctionNode, str | None]]:
    """Yield module-level functions and methods of module-level classes, in source order."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, functions):
                    yield item, node.name


# --------------------------------------------------------------------------- extraction


def docstring_node(func: FunctionNode) -> ast.Expr | None:
    """Return the statement holding the function's docstring, if it has one."""
    first = func.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first
    return None


def is_whole_lines(lines: Sequence[str], node: ast.AST) -> bool:
    """True if ``node`` starts its line (after indentation) and ends its last line."""
    first = lines[node.lineno - 1]
    last = lines[node.end_lineno - 1]
    return not first[: node.col_offset].strip() and not last[node.end_col_offset :].strip()


def summarize(docstring: str) -> str:
    """First paragraph of a cleaned docstring, collapsed to a single line."""
    return re.sub(r"\s+", " ", docstring.split("\n\n", 1)[0]).strip()


def is_trivial(body: Sequence[ast.stmt]) -> bool:
    """True for bodies like ``pass``, ``...`` or ``raise NotImplementedError``."""
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def cut_code(
    lines: Sequence[str], func: FunctionNode, doc: ast.Expr
) -> tuple[int, str, str] | None:
    """Cut a function out of its module's lines, with and without its docstring.

    Returns (first line number, code, code without docstring), both dedented, or
    None if the snippet is too long, not plain ASCII or shares lines with other
    code. The code starts at the first decorator. The docstring is removed by
    dropping its lines and the blank lines around it, so the original formatting
    and comments are kept.
    """
    start = min([func.lineno] + [d.lineno for d in func.decorator_list])
    end = func.end_lineno
    if not MIN_LINES <= end - start + 1 <= MAX_LINES:
        return None
    snippet = lines[start - 1 : end]
    if not all(line.isascii() and "\t" not in line and "\f" not in line for line in snippet):
        return None  # ASCII only, so ast's byte offsets equal character offsets
    if not is_whole_lines(lines, func) or not is_whole_lines(lines, doc):
        return None
    if any(not lines[d.lineno - 1].lstrip().startswith("@") for d in func.decorator_list):
        return None
    code = textwrap.dedent("\n".join(snippet))
    if len(code) > MAX_CHARS or code[:1].isspace():
        return None

    head = lines[start - 1 : doc.lineno - 1]
    while not head[-1].strip():
        head = head[:-1]  # blank lines between the signature and the docstring
    after = doc.end_lineno
    while after < end and not lines[after].strip():
        after += 1  # blank lines after the docstring
    code_without_doc = textwrap.dedent("\n".join(head + lines[after:end]))
    return start, code, code_without_doc


def usable_summary(summary: str, docstring: str, name: str) -> bool:
    """True if the docstring is short enough and its summary reads like a description."""
    return (
        bool(summary)
        and len(docstring) <= MAX_DOC_CHARS
        and len(summary) <= MAX_SUMMARY_CHARS
        and len(re.findall(r"[A-Za-z]{2,}", summary)) >= MIN_SUMMARY_WORDS
        and ">>>" not in summary
        and not summary.startswith(name + "(")
    )


def parse_quietly(source: str, filename: str = "<unknown>") -> ast.Module | None:
    """Parse source without printing SyntaxWarnings; None if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):
        return None


def extract(
    lines: Sequence[str], func: FunctionNode, class_name: str | None, rel_path: str
) -> Candidate | None:
    """Build a Candidate from one function node, or return None if it does not qualify."""
    doc = docstring_node(func)
    if doc is None or len(func.body) < 2 or is_trivial(func.body[1:]):
        return None
    cut = cut_code(lines, func, doc)
    if cut is None:
        return None
    start, code, code_without_doc = cut
    docstring = inspect.cleandoc(doc.value.value)
    summary = summarize(docstring)
    if not usable_summary(summary, docstring, func.name):
        return None
    tree = parse_quietly(code)
    if tree is None or parse_quietly(code_without_doc) is None:
        return None
    node = tree.body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    return Candidate(
        module=module_name(rel_path),
        source=f"{rel_path}:{start}",
        name=func.name,
        class_name=class_name,
        code=code,
        code_without_doc=code_without_doc,
        docstring=docstring,
        summary=summary,
        node=node,
    )


def collect_candidates(root: Path) -> list[Candidate]:
    """All qualifying functions of the standard library, in sorted traversal order."""
    candidates: list[Candidate] = []
    for path in iter_stdlib_files(root):
        parsed = read_module(path)
        if parsed is None:
            continue
        text, tree = parsed
        lines = text.split("\n")
        rel_path = path.relative_to(root).as_posix()
        for func, class_name in iter_functions(tree):
            candidate = extract(lines, func, class_name, rel_path)
            if candidate is not None:
                candidates.append(candidate)
    return candidates


# --------------------------------------------------------------------------- AST facts


def short(node: ast.AST) -> str:
    """Unparse a (small) expression for use in prose; long ones are abbreviated."""
    text = ast.unparse(node)
    return text if len(text) <= MAX_EXPR_CHARS else text[: MAX_EXPR_CHARS - 3] + "..."


def signature(cand: Candidate) -> str:
    """``name(args)`` as written in the source, annotations and defaults included."""
    return f"{cand.name}({ast.unparse(cand.node.args)})"


def decorator_names(func: FunctionNode) -> list[str]:
    """Dotted names of the decorators (call arguments left out)."""
    names = []
    for dec in func.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        names.append(short(target))
    return names


def own_nodes(func: FunctionNode) -> list[ast.AST]:
    """Nodes of the function body in source order, not entering nested defs, classes or lambdas."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(func.body[1:])  # body[0] is the docstring
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    located = [n for n in found if hasattr(n, "lineno")]
    # Ties (``f(x).g()`` starts where ``f(x)`` starts) put the inner, shorter node first.
    return sorted(located, key=lambda n: (n.lineno, n.col_offset, n.end_lineno, n.end_col_offset))


def dedupe(items: Sequence[str]) -> list[str]:
    """Remove duplicates, keeping the first occurrence of each item."""
    return list(dict.fromkeys(items))


def callee_name(func: ast.expr) -> str | None:
    """Readable name of a called expression: ``f``, ``os.path.join``, ``Bdb().set_trace``.

    Call arguments and subscripts are abbreviated to ``(...)`` and ``[...]``; None is
    returned for callees that are not built from a name or a short constant.
    """
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Constant):
        text = ast.unparse(func)
        return text if len(text) <= 10 else None
    if isinstance(func, ast.Attribute):
        base = callee_name(func.value)
        return None if base is None else f"{base}.{func.attr}"
    if isinstance(func, ast.Call):
        base = callee_name(func.func)
        if base is None:
            return None
        return base + ("(...)" if func.args or func.keywords else "()")
    if isinstance(func, ast.Subscript):
        base = callee_name(func.value)
        return None if base is None else base + "[...]"
    return None


def called_names(nodes: Sequence[ast.AST]) -> list[str]:
    """Names of the called functions, in source order.

    Exception constructors in ``raise`` statements are left out (they are reported
    as raised exceptions instead).
    """
    raised = {id(n.exc) for n in nodes if isinstance(n, ast.Raise) and n.exc is not None}
    names = []
    for node in nodes:
        if isinstance(node, ast.Call) and id(node) not in raised:
            name = callee_name(node.func)
            if name is not None:
                names.append(name)
    return dedupe(names)


def raised_names(nodes: Sequence[ast.AST]) -> tuple[list[str], bool]:
    """Exceptions raised explicitly, and whether there is a bare ``raise``."""
    names: list[str] = []
    reraises = False
    for node in nodes:
        if isinstance(node, ast.Raise):
            if node.exc is None:
                reraises = True
            else:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                names.append(short(exc))
    return dedupe(names), reraises


def code_list(items: Sequence[str], limit: int | None = None, conjunction: str = "and") -> str:
    """Format names as "`a`, `b` and `c`" (with "N more" past ``limit``)."""
    shown = [f"`{item}`" for item in items[:limit]]
    rest = len(items) - len(shown)
    if rest:
        shown.append(f"{rest} more")
    return join_words(shown, conjunction)


def is_bound_method(cand: Candidate) -> bool:
    """True for methods whose first parameter is ``self``/``cls`` (not static methods)."""
    return cand.class_name is not None and "staticmethod" not in decorator_names(cand.node)


def describe_params(cand: Candidate) -> str:
    """A sentence listing the parameters with their kinds and defaults."""
    args = cand.node.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += args.defaults
    parts: list[str] = []
    skip_first = is_bound_method(cand) and bool(positional)
    for index, (arg, default) in enumerate(zip(positional, defaults)):
        if index == 0 and skip_first:
            continue
        parts.append(describe_arg(arg, default, positional_only=index < len(args.posonlyargs)))
    if args.vararg:
        parts.append(f"`*{args.vararg.arg}` (any extra positional arguments)")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(describe_arg(arg, default, keyword_only=True))
    if args.kwarg:
        parts.append(f"`**{args.kwarg.arg}` (any extra keyword arguments)")
    prefix = f"Apart from `{positional[0].arg}`, it" if skip_first else "It"
    if not parts:
        return f"{prefix} takes no arguments."
    noun = "parameter" if len(parts) == 1 else "parameters"
    return f"{prefix} takes {len(parts)} {noun}: " + join_words(parts) + "."


def describe_arg(
    arg: ast.arg,
    default: ast.expr | None,
    positional_only: bool = False,
    keyword_only: bool = False,
) -> str:
    """Describe one parameter, e.g. "`sep` (keyword-only, annotated as `str`, default `None`)"."""
    notes = []
    if positional_only:
        notes.append("positional-only")
    if keyword_only:
        notes.append("keyword-only")
    if arg.annotation is not None:
        notes.append(f"annotated as `{short(arg.annotation)}`")
    if default is not None:
        notes.append(f"default `{short(default)}`")
    elif keyword_only:
        notes.append("required")
    return f"`{arg.arg}`" + (f" ({', '.join(notes)})" if notes else "")


def join_words(parts: Sequence[str], conjunction: str = "and") -> str:
    """Join phrases as "a, b and c"."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + f" {conjunction} " + parts[-1]


def describe_value(node: ast.expr) -> str:
    """A returned expression in prose: the code if short, else a description of it."""
    text = ast.unparse(node)
    if len(text) <= MAX_EXPR_CHARS:
        return f"`{text}`"
    if isinstance(node, ast.Call) and callee_name(node.func) is not None:
        return f"the result of `{callee_name(node.func)}(...)`"
    return "the value of a longer expression"


def describe_returns(cand: Candidate, nodes: Sequence[ast.AST]) -> str:
    """Sentences on what the function returns or yields."""
    yields = [n for n in nodes if isinstance(n, (ast.Yield, ast.YieldFrom))]
    values = dedupe(
        [
            describe_value(n.value)
            for n in nodes
            if isinstance(n, ast.Return)
            and n.value is not None
            and not (isinstance(n.value, ast.Constant) and n.value.value is None)
        ]
    )
    is_async = isinstance(cand.node, ast.AsyncFunctionDef)
    sentences = []
    if is_async and not yields:
        sentences.append("It is a coroutine function (`async def`): calling it gives an awaitable.")
    if yields:
        kind = "an asynchronous generator" if is_async else "a generator"
        sentences.append(f"It is {kind}: it produces its results with `yield`.")
    if len(values) == 1:
        sentences.append(f"It returns {values[0]}.")
    elif values:
        extra = [f"{len(values) - 3} more"] if len(values) > 3 else []
        shown = join_words(values[:3] + extra, "or")
        sentences.append(f"Depending on the path taken, it returns {shown}.")
    elif (
        not yields
        and isinstance(cand.node.body[-1], ast.Raise)
        and not any(isinstance(n, ast.Return) for n in nodes)
    ):
        sentences.append("It never returns normally: it ends by raising an exception.")
    elif not yields:
        sentences.append("It has no `return` with a value, so it returns `None`.")
    if cand.node.returns is not None:
        sentences.append(f"The return type is annotated as `{short(cand.node.returns)}`.")
    return " ".join(sentences)


def describe_raises(nodes: Sequence[ast.AST]) -> str:
    """A sentence on the exceptions the function raises itself."""
    names, reraises = raised_names(nodes)
    if names and reraises:
        return f"It can raise {code_list(names)}, and it re-raises a caught exception in one place."
    if names:
        return f"It can raise {code_list(names)}."
    if reraises:
        return "It does not raise new exceptions itself, but it re-raises a caught exception."
    return "It does not raise any exception explicitly."


def describe_calls(nodes: Sequence[ast.AST]) -> str:
    """A sentence on the functions the body calls."""
    names = called_names(nodes)
    if not names:
        return "It does not call any other function."
    return f"It calls {code_list(names, limit=MAX_LISTED_CALLS)}."


def describe_origin(cand: Candidate) -> str:
    """Where the function comes from (module, class, decorators)."""
    where = f"the `{cand.module}` module of the Python standard library"
    if cand.class_name:
        text = f"`{cand.name}` is a method of the class `{cand.class_name}` in {where}."
    else:
        text = f"`{cand.name}` is a function from {where}."
    decorators = decorator_names(cand.node)
    if decorators:
        text += f" It is decorated with {code_list(['@' + d for d in decorators])}."
    return text


def sentence(text: str) -> str:
    """Add a full stop unless the text already ends with punctuation."""
    return text if text[-1] in ".!?:;" else text + "."


def explain(cand: Candidate, sections: Sequence[str]) -> str:
    """The mechanically derived answer to a follow-up question."""
    nodes = own_nodes(cand.node)
    builders = {
        "origin": lambda: describe_origin(cand),
        "summary": lambda: f"According to its docstring: {sentence(cand.summary)}",
        "params": lambda: describe_params(cand),
        "returns": lambda: describe_returns(cand, nodes),
        "raises": lambda: describe_raises(nodes),
        "calls": lambda: describe_calls(nodes),
    }
    return " ".join(builders[section]() for section in sections)


# --------------------------------------------------------------------------- records


def kind_and_sig(cand: Candidate) -> tuple[str, str]:
    """Noun for the instruction ("function"/"method") and the quoted signature."""
    if cand.class_name:
        return "method", f"`{signature(cand)}` of the class `{cand.class_name}`"
    return "function", f"`{signature(cand)}`"


def generation_request(cand: Candidate, rng: random.Random) -> str:
    """The human turn asking for the function."""
    kind, sig = kind_and_sig(cand)
    return rng.choice(GENERATION_TEMPLATES).format(kind=kind, sig=sig, summary=cand.summary)


def turn(role: str, content: str, round_id: int) -> dict[str, object]:
    """One chat turn."""
    return {"role": role, "content": content, "chat_round_id": round_id}


def maybe_system(rng: random.Random) -> list[dict[str, object]]:
    """A system turn for about a third of the records, nothing for the rest."""
    if rng.random() < SYSTEM_PROMPT_RATE:
        return [turn("system", rng.choice(SYSTEM_PROMPTS), 0)]
    return []


def make_generation(cand: Candidate, rng: random.Random) -> list[dict[str, object]]:
    """Chat rounds of the code_generation task (bot answers with the full source)."""
    return maybe_system(rng) + [
        turn("human", generation_request(cand, rng), 1),
        turn("bot", cand.code, 1),
    ]


def make_docstring(cand: Candidate, rng: random.Random) -> list[dict[str, object]]:
    """Chat rounds of the code_docstring task."""
    kind = "method" if cand.class_name else "function"
    template = rng.choice(DOCSTRING_TEMPLATES)
    return [
        turn("human", template.format(kind=kind, code=cand.code_without_doc), 1),
        turn("bot", cand.docstring, 1),
    ]


def make_multiturn(cand: Candidate, rng: random.Random) -> list[dict[str, object]]:
    """Chat rounds of the code_multiturn task: write it, then explain it."""
    rounds = maybe_system(rng) + [
        turn("human", generation_request(cand, rng), 1),
        turn("bot", cand.code, 1),
    ]
    question, sections = rng.choice(FOLLOW_UPS)
    rounds += [turn("human", question, 2), turn("bot", explain(cand, sections), 2)]
    return rounds


BUILDERS = {
    "code_generation": make_generation,
    "code_docstring": make_docstring,
    "code_multiturn": make_multiturn,
}


def build_records(
    candidates: Sequence[Candidate], per_task: int, seed: int
) -> dict[str, list[dict[str, object]]]:
    """Shuffle the candidates with ``seed`` and give each task its own disjoint slice."""
    rng = random.Random(seed)
    pool = list(candidates)
    rng.shuffle(pool)
    records: dict[str, list[dict[str, object]]] = {}
    for index, task in enumerate(TASKS):
        chosen = pool[index * per_task : (index + 1) * per_task]
        records[task] = [
            {
                "id": f"{task}-{n}",
                "data_name": task,
                "source": cand.source,
                "chat_rounds": BUILDERS[task](cand, rng),
            }
            for n, cand in enumerate(chosen)
        ]
    return records


# --------------------------------------------------------------------------- output


def write_jsonl(path: Path, records: Sequence[dict[str, object]]) -> None:
    """Write records as UTF-8 JSON lines with ``\\n`` line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def readme_text(command: str, pool_size: int, stats: Sequence[tuple[str, int, int]]) -> str:
    """The README describing the generated data."""
    rows = "\n".join(f"| `{task}` | {count} | {size} |" for task, count, size in stats)
    return f"""# Demo data: multi-task chat data from the Python standard library

Small, deterministic multi-task fine-tuning data in the chat format used by
mftcoder. It is meant for demos, smoke tests and unit tests, not for training a
useful model.

Each task folder holds a `train.jsonl` file with one JSON object per line:

```json
{{"id": "<task>-<n>", "data_name": "<task>", "source": "<module path>:<line>",
 "chat_rounds": [{{"role": "system", "content": "...", "chat_round_id": 0}},
                 {{"role": "human", "content": "...", "chat_round_id": 1}},
                 {{"role": "bot", "content": "...", "chat_round_id": 1}}]}}
```

The system turn is optional (about a third of the `code_generation` and
`code_multiturn` records have one); human and bot turns alternate and a human
turn shares its `chat_round_id` with the bot answer that follows it. `source` is
the file (relative to the standard library directory) and the line where the
function's code starts (its first decorator, if any).

## Tasks

- `code_generation`: write a function or method from its signature and the first
  paragraph of its docstring; the answer is the original source (docstring
  included).
- `code_docstring`: write the docstring of a function shown without it; the
  answer is the original docstring, cleaned with `inspect.cleandoc`.
- `code_multiturn`: two rounds; first write the function as above, then answer a
  follow-up question with an explanation derived mechanically from the AST
  (docstring summary, parameters and defaults, returns/yields, raised
  exceptions, called functions, module).

The three tasks use disjoint functions.

| task | records | bytes |
|------|---------|-------|
{rows}

## How it was built

```
{command}
```

- Python version: {platform.python_version()} ({platform.python_implementation()})
- Source: the `.py` files of that interpreter's standard library, walked in
  sorted order, skipping `test/`, `tests/`, `idlelib/`, `lib2to3/`,
  `site-packages/`, `turtledemo/`, `__pycache__/`, platform-specific
  `config-*`/`_sysconfigdata_*` files, files that are not UTF-8 and files that
  do not parse.
- Used: module-level functions and methods of module-level classes that have a
  docstring, {MIN_LINES}-{MAX_LINES} source lines, at most {MAX_CHARS} characters,
  ASCII-only source and a non-trivial body ({pool_size} functions qualified).
- Code is cut from the original text and dedented; docstrings are removed by
  deleting their lines, so formatting and comments are kept.
- The same Python version gives byte-identical output.

## License

The code and docstrings in this data are derived from the Python standard
library source, Copyright (c) Python Software Foundation; All Rights Reserved.
They are used under the Python Software Foundation License Version 2
(PSF-2.0), see https://docs.python.org/3/license.html.
"""


def build(out: str, per_task: int, seed: int) -> dict[str, list[dict[str, object]]]:
    """Collect, select and write everything below ``out``; return the records."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = collect_candidates(root)
    if len(candidates) < per_task * len(TASKS):
        raise SystemExit(
            f"only {len(candidates)} qualifying functions, need {per_task * len(TASKS)}"
        )
    records = build_records(candidates, per_task, seed)
    out_dir = Path(out)
    stats = []
    for task in TASKS:
        path = out_dir / task / "train.jsonl"
        write_jsonl(path, records[task])
        stats.append((task, len(records[task]), path.stat().st_size))
    out_posix = Path(out).as_posix()
    command = (
        f"python scripts/build_demo_data.py --out {out_posix} --per-task {per_task} --seed {seed}"
    )
    readme = readme_text(command, len(candidates), stats)
    (out_dir / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="mftcoder/assets/demo_data", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--per-task", type=int, default=300, help="records per task (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.per_task < 1:
        parser.error("--per-task must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    records = build(args.out, args.per_task, args.seed)
    for task in TASKS:
        print(f"{task}: {len(records[task])} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
