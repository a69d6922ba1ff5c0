"""Shared fixtures: the shipped tokenizer with the default template, and JSONL task folders on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftcoder.config import build_config
from mftcoder.model import DEMO_DATA, DEMO_PAIRS, load_tokenizer


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """mftcoder's cache (tokenized data by default, measured CPU rates) in a folder of this session, for every test
    and the processes they start: rates measured while the suite loads the machine must not reach later plans."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MFTCODER_CACHE", str(tmp_path_factory.mktemp("mftcoder-cache")))
        yield


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



@pytest.fixture(scope="session")
def pair_tasks(tmp_path_factory):
    """The shipped preference-pair demo tasks (one in each record form), 16 short pairs each, and a shared cache."""
    root = tmp_path_factory.mktemp("pairs")
    for task_dir in sorted(p for p in DEMO_PAIRS.iterdir() if p.is_dir()):
        lines = sorted((task_dir / "train.jsonl").read_text().splitlines(), key=len)[:16]
        (root / task_dir.name).mkdir()
        (root / task_dir.name / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"data_paths": [str(p) for p in sorted(root.iterdir())], "data_cache_dir": str(root / ".cache"),
            "objective": "dpo"}
