"""Shared fixtures: the shipped tokenizer with the default template, and JSONL task folders on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftcoder.config import build_config
from mftcoder.model import DEMO_DATA, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_and_template():
    """The shipped GPT-NeoX tokenizer with the default (mftcoder) template."""
    return load_tokenizer(build_config({})[0])


@pytest.fixture(scope="session")
def tokenizer(tokenizer_and_template):
    return tokenizer_and_template[0]


@pytest.fixture(scope="session")
def template(tokenizer_and_template):
    return tokenizer_and_template[1]


def write_task(root: Path, name: str, lines: list, filename: str = "data.jsonl") -> Path:
    """A task folder holding one JSONL file; dict items are JSON-encoded, str/bytes written as they are."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / filename, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    return folder


def chat(*pairs: tuple[str, str], system: str | None = None) -> dict:
    rounds = [{"role": "system", "content": system}] if system else []
    rounds += [{"role": role, "content": content} for role, content in pairs]
    return {"chat_rounds": rounds}


@pytest.fixture(scope="session")
def small_tasks(tmp_path_factory):
    """Three tasks of 20 short demo records each, and a shared tokenized-data cache."""
    root = tmp_path_factory.mktemp("tasks")
    for task_dir in sorted(p for p in DEMO_DATA.iterdir() if p.is_dir()):
        lines = (task_dir / "train.jsonl").read_text().splitlines()
        shortest = sorted(lines, key=len)[:20]
        (root / task_dir.name).mkdir()
        (root / task_dir.name / "train.jsonl").write_text("\n".join(shortest) + "\n")
    return {"data_paths": [str(p) for p in sorted(root.iterdir())], "data_cache_dir": str(root / ".cache")}


def preference_pairs(records: list[dict], as_lists: bool) -> list[dict]:
    """Pairs from chat records: the prompt and last answer of each, with the next record's answer rejected; as whole
    conversations ({"chosen": [...], "rejected": [...]}) or as answers to a prompt ({"chat_rounds", ...})."""
    pairs = []
    for record, other in zip(records, records[1:] + records[:1]):
        prompt, chosen, rejected = record["chat_rounds"][:-1], record["chat_rounds"][-1], other["chat_rounds"][-1]
        if chosen["content"] == rejected["content"]:
            continue
        if as_lists:
            pairs.append({"chosen": [*prompt, chosen], "rejected": [*prompt, {**rejected}]})
        else:
            pairs.append({"chat_rounds": prompt, "chosen": chosen["content"], "rejected": rejected["content"]})
    return pairs


@pytest.fixture(scope="session")
def pair_tasks(tmp_path_factory):
    """Two preference tasks of 16 short pairs each (one in each record form), and a shared cache."""
    root = tmp_path_factory.mktemp("pairs")
    for as_lists, name in ((True, "code_docstring"), (False, "code_generation")):
        lines = (DEMO_DATA / name / "train.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in sorted(lines, key=len)[:16]]
        write_task(root, f"{name}_pairs", preference_pairs(records, as_lists))
    return {"data_paths": [str(p) for p in sorted(root.iterdir())], "data_cache_dir": str(root / ".cache"),
            "objective": "dpo"}
