"""Checks of the committed demo data built by ``scripts/build_demo_data.py``."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_REL = Path("mftcoder", "assets", "demo_data")
DATA = REPO / DATA_REL
BUILDER = REPO / "scripts" / "build_demo_data.py"
TASKS = ("code_generation", "code_docstring", "code_multiturn")


def load(task: str) -> list[dict]:
    """Parse every line of a task's train.jsonl (each must be valid JSON)."""
    lines = (DATA / task / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def check_rounds(rounds: list) -> None:
    """Optional system turn first, then human/bot pairs sharing ids 1, 2, ..."""
    assert isinstance(rounds, list) and rounds
    for item in rounds:
        assert isinstance(item["content"], str) and item["content"].strip()
    if rounds[0]["role"] == "system":
        assert rounds[0]["chat_round_id"] == 0
        rounds = rounds[1:]
    assert rounds and len(rounds) % 2 == 0, "must alternate human/bot and end with bot"
    for index, item in enumerate(rounds):
        assert item["role"] == ("human" if index % 2 == 0 else "bot")
        assert item["chat_round_id"] == index // 2 + 1


@pytest.mark.parametrize("task", TASKS)
def test_task_file(task: str) -> None:
    assert (DATA / task / "train.jsonl").is_file()
    records = load(task)
    assert 200 <= len(records) <= 1000
    ids = [record["id"] for record in records]
    assert len(set(ids)) == len(ids)
    for record in records:
        assert record["data_name"] == task
        assert record["id"].startswith(task + "-")
        assert re.fullmatch(r"[\w./-]+\.py:\d+", record["source"])
        check_rounds(record["chat_rounds"])
        if task == "code_multiturn":
            bots = [item for item in record["chat_rounds"] if item["role"] == "bot"]
            assert len(bots) == 2


def test_tasks_use_disjoint_functions() -> None:
    sources = [{record["source"] for record in load(task)} for task in TASKS]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])


def test_builder_reproduces_committed_files(tmp_path: Path) -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Python version: (\S+) \((\w+)\)", readme)
    assert match, "README.md must record the Python version"
    current = (platform.python_version(), platform.python_implementation())
    if current != match.groups():
        pytest.skip(
            f"demo data was built from the {match[2]} {match[1]} standard library; "
            f"running {current[1]} {current[0]}, whose standard library may differ"
        )
    # Run from tmp_path with the same relative --out, so the README's command matches.
    subprocess.run(
        [sys.executable, str(BUILDER), "--out", DATA_REL.as_posix()],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    built = tmp_path / DATA_REL
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file())
    assert names == committed
    for name in names:
        assert (built / name).read_bytes() == (DATA / name).read_bytes(), name
