#!/usr/bin/env python
"""Build deterministic, long-tailed multi-task chat data for the throughput benchmark.

Real code, real length spread: every documented function or method of an installed library (default
`transformers`, found with importlib, never imported) is read with `ast`, files walked in sorted order.
Each function becomes a record of one of three tasks, one folder each, in mftcoder's JSONL format:

* `code_generation` -- human: signature + the docstring's summary; bot: the implementation (docstring removed);
* `code_docstring`  -- human: the implementation without its docstring; bot: the docstring;
* `code_multiturn`  -- system prompt, then one to three rounds (drawn from the seed): what does it do (bot:
  summary, where it is defined, parameters, what it calls); a unit test (bot: a pytest test pinning its
  signature and docstring); its full source (bot: the whole function).

Each task takes its own seeded shuffle of the same pool of functions (identical sources are kept once)
and keeps the first `--per-task` records that fit in `--max-tokens` tokens. Nothing depends on the clock
or on the file system's order, so the same library version, seed and sizes give byte-identical files
(the package's version is recorded in `<out>/profile.json`).
Code functions are long-tailed by nature (most are short, a few are very long), so the samples are too;
the script prints the length profile measured with mftcoder's own renderer and the shipped tokenizer.

    python bench/build_bench_data.py                  # bench/data, 3 x 200 records
    python bench/build_bench_data.py --out /tmp/d --per-task 2700
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import random
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASKS = ("code_generation", "code_docstring", "code_multiturn")
FORMAT = 1  # bump when the records change, so throughput.py rebuilds old data
SYSTEM = "You are a coding assistant who knows the {package} code base well."
MIN_DOC_WORDS = 4
MAX_FILE_BYTES = 2_000_000


@dataclass(frozen=True)
class Function:
    module: str  # dotted module name
    qualname: str  # Class.method or function
    name: str
    class_name: str | None
    signature: str  # "def f(x, y=1) -> int:" (one line, from the AST)
    code: str  # dedented source from the first decorator, docstring included
    code_without_doc: str
    docstring: str
    params: tuple[str, ...]  # rendered parameters, self/cls excluded
    param_names: tuple[str, ...]  # every parameter name in signature order (self/cls included)
    calls: tuple[str, ...]  # names it calls, first occurrence order


# --------------------------------------------------------------------------- reading the library


def package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed (or is not a package)")
    return Path(sorted(spec.submodule_search_locations)[0])


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def functions_of(tree: ast.Module):
    """Module-level functions and methods of module-level classes, in source order."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, kinds):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, kinds):
                    yield item, node.name


def owns_lines(lines: list[str], node: ast.AST, first: int) -> bool:
    """True when the snippet's lines hold nothing but this node (no code before or after on them)."""
    head, tail = lines[first - 1], lines[node.end_lineno - 1]
    return not head[: len(head) - len(head.lstrip())].strip() and not tail[node.end_col_offset:].strip()


def render_arg(arg: ast.arg, default: ast.expr | None, prefix: str = "") -> str:
    text = prefix + arg.arg
    if arg.annotation is not None:
        text += f": {ast.unparse(arg.annotation)}"
    if default is not None:
        text += f" = {ast.unparse(default)}" if arg.annotation is not None else f"={ast.unparse(default)}"
    return text


def parameters(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], list[str]]:
    a = func.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    rendered, names = [], []
    for arg, default in zip(positional, defaults):
        rendered.append(render_arg(arg, default))
        names.append(arg.arg)
    if a.vararg:
        rendered.append(render_arg(a.vararg, None, "*"))
        names.append(a.vararg.arg)
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        rendered.append(render_arg(arg, default))
        names.append(arg.arg)
    if a.kwarg:
        rendered.append(render_arg(a.kwarg, None, "**"))
        names.append(a.kwarg.arg)
    return rendered, names


def called_names(func: ast.AST) -> list[str]:
    seen: dict[str, None] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            target = node.func
            if isinstance(target, ast.Name):
                seen.setdefault(target.id)
            elif isinstance(target, ast.Attribute):
                seen.setdefault(target.attr)
    return list(seen)


def extract(path: Path, root: Path, package: str) -> list[Function]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        text = path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    module = module_of(root, path, package)
    out = []
    for func, class_name in functions_of(tree):
        doc_node = func.body[0]
        if not (isinstance(doc_node, ast.Expr) and isinstance(doc_node.value, ast.Constant)
                and isinstance(doc_node.value.value, str)) or len(func.body) < 2:
            continue  # no docstring, or nothing but a docstring
        docstring = ast.get_docstring(func, clean=True) or ""
        if len(docstring.split()) < MIN_DOC_WORDS:
            continue
        first = min([func.lineno] + [d.lineno for d in func.decorator_list])
        if not owns_lines(lines, func, first):
            continue
        doc_head = lines[doc_node.lineno - 1]
        if doc_head[:doc_node.col_offset].strip() or lines[doc_node.end_lineno - 1][doc_node.end_col_offset:].strip():
            continue  # the docstring shares a line with code: cannot cut it out cleanly
        snippet = lines[first - 1:func.end_lineno]
        cut = (doc_node.lineno - first, doc_node.end_lineno - first + 1)
        code = textwrap.dedent("\n".join(snippet)).rstrip() + "\n"
        code_without_doc = textwrap.dedent("\n".join(snippet[:cut[0]] + snippet[cut[1]:])).rstrip() + "\n"
        rendered, names = parameters(func)
        shown = [r for r, n in zip(rendered, names) if not (class_name and n in ("self", "cls") and r == n)]
        returns = f" -> {ast.unparse(func.returns)}" if func.returns is not None else ""
        keyword = "async def" if isinstance(func, ast.AsyncFunctionDef) else "def"
        signature = f"{keyword} {func.name}({', '.join(rendered)}){returns}:"
        qualname = f"{class_name}.{func.name}" if class_name else func.name
        out.append(Function(module, qualname, func.name, class_name, signature, code, code_without_doc, docstring,
                            tuple(shown), tuple(names), tuple(called_names(func))))
    return out


def collect(package: str) -> list[Function]:
    """Every usable documented function of the package, in sorted-file order; identical sources kept once."""
    root = package_root(package)
    seen: set[str] = set()
    pool = []
    for path in python_files(root):
        for fn in extract(path, root, package):
            key = hashlib.sha256(fn.code.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                pool.append(fn)
    return pool


# --------------------------------------------------------------------------- records


def summary_of(docstring: str) -> str:
    return re.sub(r"\s+", " ", docstring.split("\n\n", 1)[0]).strip()


def where(fn: Function) -> str:
    return f"method of `{fn.class_name}` in `{fn.module}`" if fn.class_name else f"function in `{fn.module}`"


def generation_record(fn: Function, package: str, rng: random.Random) -> dict:
    human = f"Implement the {where(fn)}:\n\n```python\n{fn.signature}\n```\n\n{summary_of(fn.docstring)}"
    bot = f"```python\n{fn.code_without_doc}```"
    return {"chat_rounds": [{"role": "human", "content": human}, {"role": "bot", "content": bot}]}


def docstring_record(fn: Function, package: str, rng: random.Random) -> dict:
    human = f"Write the docstring of this {where(fn)}:\n\n```python\n{fn.code_without_doc}```"
    return {"chat_rounds": [{"role": "human", "content": human}, {"role": "bot", "content": fn.docstring}]}


def unit_test(fn: Function) -> str:
    owner = fn.class_name or fn.name
    target = f"{fn.class_name}.{fn.name}" if fn.class_name else fn.name
    words = summary_of(fn.docstring).split()[:6]
    return (f"```python\nimport inspect\n\nfrom {fn.module} import {owner}\n\n\n"
            f"def test_{fn.name.strip('_') or 'function'}_signature_and_doc():\n"
            f"    params = list(inspect.signature({target}).parameters)\n"
            f"    assert params == {list(fn.param_names)!r}\n"
            f"    doc = inspect.getdoc({target})\n"
            f"    assert doc is not None and doc.split()[:{len(words)}] == {words!r}\n```")


def multiturn_record(fn: Function, package: str, rng: random.Random) -> dict:
    """One, two or three rounds (drawn from rng): what it does, a unit test, then the whole source."""
    params = "\n".join(f"- `{p}`" for p in fn.params) or "- none"
    calls = ", ".join(f"`{c}`" for c in fn.calls[:12]) or "nothing"
    explain = (f"{summary_of(fn.docstring)}\n\nIt is a {where(fn)}. Parameters:\n{params}\n\n"
               f"It calls {calls}.")
    rounds = [(f"What does `{fn.qualname}` in `{fn.module}` do?", explain),
              ("Write a unit test that pins down its signature and documentation.", unit_test(fn)),
              ("Show me its full source.", f"```python\n{fn.code}```")]
    turns = [{"role": "system", "content": SYSTEM.format(package=package)}]
    for human, bot in rounds[:rng.randint(1, 3)]:
        turns += [{"role": "human", "content": human}, {"role": "bot", "content": bot}]
    return {"chat_rounds": turns}


BUILDERS = {"code_generation": generation_record, "code_docstring": docstring_record,
            "code_multiturn": multiturn_record}


# --------------------------------------------------------------------------- measuring


def renderer():
    """mftcoder's tokenizer and template (the ones training uses), for exact token counts."""
    from mftcoder.config import build_config
    from mftcoder.model import load_tokenizer

    tokenizer, template = load_tokenizer(build_config({})[0])
    tokenizer.model_max_length = 10**9  # we only count tokens; silence the "longer than 2048" warning
    return tokenizer, template


def measure(records: list[dict], tokenizer, template) -> list[tuple[int, int]]:
    """(tokens, supervised tokens) per record, as mftcoder renders and masks them (untruncated)."""
    from mftcoder.data.records import parse_record
    from mftcoder.data.tokenize import encode_conversations

    out = []
    for start in range(0, len(records), 256):
        chunk = [parse_record(json.dumps(r)) for r in records[start:start + 256]]
        out.extend((len(ids), int(mask.sum())) for ids, mask in encode_conversations(tokenizer, template, chunk))
    return out


def profile(lengths: list[tuple[int, int]]) -> dict:
    tokens = np.array([t for t, _ in lengths])
    supervised = np.array([s for _, s in lengths])
    if len(tokens) == 0:
        return {"count": 0}
    return {"count": int(len(tokens)), "median": float(np.median(tokens)), "p90": float(np.percentile(tokens, 90)),
            "max": int(tokens.max()), "mean": float(tokens.mean()), "tokens": int(tokens.sum()),
            "supervised_fraction": float(supervised.sum() / tokens.sum())}


def profile_table(profiles: dict[str, dict]) -> str:
    lines = ["| task | records | median tokens | p90 | max | mean | total tokens | supervised fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in profiles.items():
        lines.append(f"| {name} | {p['count']} | {p['median']:.0f} | {p['p90']:.0f} | {p['max']} | {p['mean']:.0f} | "
                     f"{p['tokens']} | {p['supervised_fraction']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build(out: Path, per_task: int, seed: int, max_tokens: int, package: str, quiet: bool = False) -> dict:
    """Write the task folders and out/profile.json; return the profile."""
    started = time.perf_counter()
    pool = collect(package)
    tokenizer, template = renderer()
    out.mkdir(parents=True, exist_ok=True)
    profiles: dict[str, dict] = {}
    everything: list[tuple[int, int]] = []
    for index, task in enumerate(TASKS):
        order = list(range(len(pool)))
        random.Random(f"{seed}-{task}").shuffle(order)
        rng = random.Random(f"{seed}-{task}-records")
        kept: list[dict] = []
        kept_lengths: list[tuple[int, int]] = []
        position = 0
        while len(kept) < per_task and position < len(order):  # measure in chunks, keep those that fit
            want = per_task - len(kept)
            batch = [BUILDERS[task](pool[i], package, rng) for i in order[position:position + want + 32]]
            position += len(batch)
            for record, (n, s) in zip(batch, measure(batch, tokenizer, template)):
                if n <= max_tokens and len(kept) < per_task:
                    kept.append(record)
                    kept_lengths.append((n, s))
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        profiles[task] = profile(kept_lengths)
        everything += kept_lengths
    profiles["all"] = profile(everything)
    meta = {"format": FORMAT, "package": package, "package_version": _version(package), "per_task": per_task, "seed": seed,
            "max_tokens": max_tokens, "pool": len(pool), "profile": profiles}
    (out / "profile.json").write_text(json.dumps(meta, indent=1) + "\n")
    if not quiet:
        print(f"built {out} from {len(pool)} documented functions of {package} {meta['package_version']} "
              f"in {time.perf_counter() - started:.1f}s")
        print(profile_table(profiles))
    return meta


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "data", help="output folder (default bench/data)")
    parser.add_argument("--per-task", type=int, default=200, help="records per task (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=5000, help="skip records longer than this (default 5000)")
    parser.add_argument("--package", default="transformers", help="installed package to read (default transformers)")
    args = parser.parse_args(argv)
    build(args.out, args.per_task, args.seed, args.max_tokens, args.package)
    return 0


if __name__ == "__main__":
    sys.exit(main())
