"""Shared fixtures: the shipped tokenizer with the default template, and JSONL task folders on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftcoder.config import build_config
from mftcoder.data.template import build_template
from mftcoder.model import load_tokenizer


@pytest.fixture(scope="session")
def template():
    return build_template("mftcoder")


@pytest.fixture(scope="session")
def tokenizer(template):
    config, _ = build_config({})
    return load_tokenizer(config, template)


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
