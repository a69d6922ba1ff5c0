"""Opt-in (`pytest -m slow`): a short fault soak (bench/fault_soak.py). `mftcoder train` is SIGKILLed at random
moments, some of them in the middle of a checkpoint save, and resumed; every run must end with the weights,
optimizer state and metrics of an uninterrupted run. About 4 minutes on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "bench" / "fault_soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("fault_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_killed_and_resumed_runs_end_exactly_like_an_uninterrupted_one(tmp_path):
    soak = load_soak()
    summary = soak.run_soak(soak.parse_args(["--runs", "3", "--seed", "1", "--work", str(tmp_path)]))
    print(summary.line())
    assert len(summary.runs) == 3 and summary.kills > 0  # a soak without kills would prove nothing
    failures = {what: [soak.describe(r) for r in summary.runs if getattr(r, what)]
                for what in ("exits", "weights", "state", "metrics")}
    assert not failures["exits"], "\n".join(failures["exits"])
    assert not failures["weights"], "\n".join(failures["weights"])
    assert not failures["state"], "\n".join(failures["state"])
    assert not failures["metrics"], "\n".join(failures["metrics"])
