#!/usr/bin/env python
"""Build the shipped preference-pair demo data from the shipped chat demo data.

For two tasks of ``mftcoder/assets/demo_data`` every record's last answer is the chosen one, and the last answer of
another record of the same task (a seeded pick) is rejected: an answer to a different question. ``code_generation``
is written as answers to a prompt (``{"chat_rounds": [...], "chosen": str, "rejected": str}``), ``code_docstring``
as whole conversations (``{"chosen": [turns], "rejected": [turns]}``), so both record forms ship. Deterministic.

Usage::

    python scripts/build_demo_pairs.py --out mftcoder/assets/demo_pairs --per-task 100 --seed 7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEMO_DATA = Path(__file__).resolve().parents[1] / "mftcoder" / "assets" / "demo_data"
TASKS = {"code_generation": "answers", "code_docstring": "conversations"}


def pairs_of(records: list[dict], form: str, rng: np.random.Generator) -> list[dict]:
    turns = [[{"role": t["role"], "content": t["content"]} for t in r["chat_rounds"]] for r in records]
    others = rng.permutation(len(turns))
    pairs = []
    for conversation, k in zip(turns, others):
        prompt, chosen, rejected = conversation[:-1], conversation[-1], turns[k][-1]
        if chosen["content"] == rejected["content"]:
            continue
        if form == "answers":
            pairs.append({"chat_rounds": prompt, "chosen": chosen["content"], "rejected": rejected["content"]})
        else:
            pairs.append({"chosen": [*prompt, chosen], "rejected": [*prompt, rejected]})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for task, form in TASKS.items():
        lines = (DEMO_DATA / task / "train.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines[:args.per_task]]
        folder = args.out / f"{task}_pairs"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs_of(records, form, rng))


if __name__ == "__main__":
    main()
