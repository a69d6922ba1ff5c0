#!/usr/bin/env python
"""The three code tasks of the MFT-vs-SFT benchmark, built from real code: the documented module-level functions of
installed Python packages (read with `ast` by bench/build_bench_data.py; never imported).

* `code_completion` (large, easy): the function's head and the first half of its body (no docstring) -> the rest of
  the body, in a ```python block;
* `code_generation` (medium): HumanEval's own prompt (the signature and docstring, in `mftcoder eval`'s chat
  wording) -> the whole function without its docstring, in a ```python block. The task closest to HumanEval;
* `code_docstring` (small, hard: prose, the highest loss of the three): the function without its docstring -> the
  docstring.

Training functions come from TRAIN_PACKAGES, validation functions from VALID_PACKAGES only, so no function (and no
package) is seen in both. Each function goes to one task. Each task file holds its training records, then its
validation records, sized so that `data_split: "3,1,0"` with `shuffle_before_split: false` cuts exactly between
them (the validation part is one quarter of every task).

    python bench/mft_data.py                 # -> bench/data/mft (the sizes of bench/mft_vs_sft.py)
    python bench/mft_data.py --out DIR --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a script run from anywhere finds the checkout's mftcoder and bench helpers
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import build_bench_data as functions  # noqa: E402  (bench/build_bench_data.py: ast reading of packages)
from mftcoder.codeeval.problems import INSTRUCTION  # noqa: E402

TRAIN_PACKAGES = ("networkx", "numpy", "sympy", "pandas", "setuptools", "pip", "huggingface_hub", "fontTools", "rich",
                  "click", "jinja2", "requests", "tensorboard", "absl", "matplotlib")
VALID_PACKAGES = ("mpmath", "werkzeug", "PIL", "packaging")
MAX_BODY_LINES = 24
MIN_BODY_LINES = 4
DEFAULT_OUT = REPO / "bench" / "data" / "mft"
TOKENIZER = REPO / "models" / "SmolLM2-135M-Instruct"


def split_function(fn) -> tuple[str, str, str]:
    """(head, docstring lines, body) of a function's source: the lines before its docstring (decorators and
    signature), the docstring as written, and the lines after it; each ends with a newline."""
    with_doc, without = fn.code.rstrip("\n").split("\n"), fn.code_without_doc.rstrip("\n").split("\n")
    head = 0
    while head < len(without) and with_doc[head] == without[head]:
        head += 1
    cut = head + len(with_doc) - len(without)
    return tuple("\n".join(lines) + "\n" for lines in (with_doc[:head], with_doc[head:cut], with_doc[cut:]))


def chat(human: str, bot: str) -> dict:
    return {"chat_rounds": [{"role": "human", "content": human}, {"role": "bot", "content": bot}]}


def completion_record(fn) -> dict:
    head, _, body = split_function(fn)
    lines = body.rstrip("\n").split("\n")
    half = len(lines) // 2
    shown, rest = "\n".join(lines[:half]), "\n".join(lines[half:])
    human = ("Complete this Python function: reply with the rest of its body (the lines after the ones shown) in one "
             f"```python code block.\n\n```python\n{head}{shown}\n```")
    return chat(human, f"```python\n{rest}\n```")


def docstring_record(fn) -> dict:
    human = f"Write the docstring of this Python function.\n\n```python\n{fn.code_without_doc}```"
    return chat(human, fn.docstring)


def generation_record(fn) -> dict:
    head, doc, _ = split_function(fn)
    return chat(INSTRUCTION.format(prompt=head + doc), f"```python\n{fn.code_without_doc}```")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[object], dict]
    train: int
    description: str

    @property
    def valid(self) -> int:
        return self.train // 3  # data_split "3,1,0": a quarter of the task


def task_specs(scale: float = 1.0) -> list[TaskSpec]:
    """Small task first (it picks its functions first, so the large one cannot starve it)."""
    sizes = {"code_docstring": 24, "code_generation": 48, "code_completion": 144}
    size = {name: max(3, round(n * scale / 3) * 3) for name, n in sizes.items()}  # multiples of 3: exact split
    return [
        TaskSpec("code_docstring", docstring_record, size["code_docstring"],
                 "the function without its docstring -> the docstring (prose): small, hard"),
        TaskSpec("code_generation", generation_record, size["code_generation"],
                 "HumanEval's prompt (signature + docstring) -> the whole function: medium"),
        TaskSpec("code_completion", completion_record, size["code_completion"],
                 "signature and the first half of the body -> the rest of the body: large, easy"),
    ]


def pool(packages: tuple[str, ...], seed: int) -> list:
    """The usable functions of the packages (module-level, not tests, a body of MIN..MAX lines), in a seeded order."""
    found = []
    for package in packages:
        for fn in functions.collect(package):
            body_lines = split_function(fn)[2].count("\n")
            is_test = fn.name.startswith("test") or any(part in ("tests", "testing") for part in fn.module.split("."))
            if fn.class_name is None and not is_test and MIN_BODY_LINES <= body_lines <= MAX_BODY_LINES:
                found.append(fn)
    random.Random(f"mft-{seed}-{'-'.join(packages)}").shuffle(found)
    return found


def token_count(tokenizer, record: dict) -> int:
    """Tokens of the record under the model's own chat template (what training sees)."""
    turns = [{"role": {"human": "user", "bot": "assistant"}[t["role"]], "content": t["content"]}
             for t in record["chat_rounds"]]
    return len(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"])


def take(specs: list[TaskSpec], functions_in_order: list, count: Callable[[TaskSpec], int], tokenizer,
         max_tokens: int) -> dict[str, list[tuple[dict, int]]]:
    """count(spec) records per task that fit in max_tokens, each function used by one task only."""
    taken: dict[str, list[tuple[dict, int]]] = {}
    position = 0
    for spec in specs:
        records: list[tuple[dict, int]] = []
        while len(records) < count(spec):
            if position == len(functions_in_order):
                raise SystemExit(f"not enough functions for {spec.name}: {len(records)} of {count(spec)}")
            record = spec.build(functions_in_order[position])
            position += 1
            n = token_count(tokenizer, record)
            if n <= max_tokens:
                records.append((record, n))
        taken[spec.name] = records
    return taken


def build(out: Path, scale: float = 1.0, seed: int = 0, max_tokens: int = 320, tokenizer_dir: Path = TOKENIZER) -> dict:
    """Write out/<task>/train.jsonl (training records, then validation records) and out/profile.json."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    specs = task_specs(scale)
    train = take(specs, pool(TRAIN_PACKAGES, seed), lambda s: s.train, tokenizer, max_tokens)
    valid = take(specs, pool(VALID_PACKAGES, seed), lambda s: s.valid, tokenizer, max_tokens)
    profile = {}
    for spec in specs:
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        rows = train[spec.name] + valid[spec.name]
        (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in rows),
                                            encoding="utf-8")
        profile[spec.name] = {"train": spec.train, "valid": spec.valid, "description": spec.description,
                              "train_tokens": sum(n for _, n in train[spec.name]),
                              "valid_tokens": sum(n for _, n in valid[spec.name])}
    meta = {"train_packages": {p: functions._version(p) for p in TRAIN_PACKAGES},
            "valid_packages": {p: functions._version(p) for p in VALID_PACKAGES},
            "seed": seed, "scale": scale, "max_tokens": max_tokens, "tasks": profile,
            "seconds": round(time.perf_counter() - started, 1)}
    (out / "profile.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every task's size (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=320, help="longest record, in tokens (default 320)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="the model's folder (its chat template)")
    args = parser.parse_args(argv)
    meta = build(args.out, args.scale, args.seed, args.max_tokens, args.tokenizer)
    for name, task in meta["tasks"].items():
        print(f"{name}: {task['train']} train ({task['train_tokens']} tokens) + {task['valid']} valid "
              f"({task['valid_tokens']} tokens)")
    print(f"built {args.out} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
