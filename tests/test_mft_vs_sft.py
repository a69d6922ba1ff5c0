"""Opt-in (`pytest -m slow`): `bench/mft_vs_sft.py --quick` on SmolLM2-135M-Instruct end to end (about 10 minutes
on 2 cores), and every completions file it keeps re-scores to the pass@1 it reported. Needs the model on disk
(`scripts/get_smollm2.py`, or MFTCODER_SMOLLM2)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mftcoder.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("MFTCODER_SMOLLM2", ROOT / "models" / "SmolLM2-135M-Instruct"))
TASKS = ("code_generation", "code_docstring", "code_completion")
ARMS = ("base model", "single-task (one model per task)", "mixed (case1)", "MFT case3", "MFT coba")


@pytest.mark.slow
def test_quick_benchmark_runs_every_arm_and_its_completions_rescore(tmp_path):
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no model at {MODEL}: run scripts/get_smollm2.py first (or set MFTCODER_SMOLLM2)")
    work, doc = tmp_path / "work", tmp_path / "report" / "mft.md"
    doc.parent.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "mft_vs_sft.py"), "--quick", "--work", str(work),
                           "--doc", str(doc)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    numbers = json.loads(doc.with_suffix(".json").read_text())
    assert list(numbers["rows"]) == list(ARMS)
    for arm, row in numbers["rows"].items():
        for column in (*TASKS, "worst", "mean"):
            assert all(0 < v < 20 for v in row[column]), (arm, column)
        per_seed = [dict(zip(TASKS, values)) for values in zip(*(row[t] for t in TASKS))]
        assert row["worst"] == [max(p.values()) for p in per_seed]
    base = numbers["rows"]["base model"]
    assert base["worst"] == [max(base[t][0] for t in TASKS)]
    # Each kept completions file: 8 problems, and scoring it again gives the pass@1 the report holds.
    kept = sorted((doc.parent / "mft").glob("*.jsonl.gz"))
    assert [p.name for p in kept] == sorted(f"{n}.jsonl.gz" for n in (
        "base", "case1-seed1", "case3-seed1", "coba-seed1", "single-code_generation-seed1"))
    for path in kept:
        rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
        assert len(rows) == 8 and all({"task_id", "completion", "passed"} <= set(r) for r in rows)
        plain = tmp_path / path.name.removesuffix(".gz")
        plain.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n"
                                 for r in rows))
        assert main(["eval", "--completions", str(plain), "--output",
                     str(tmp_path / f"{path.stem}.rescored.jsonl"), "--workers", "1"]) == 0
        rescored = json.loads((tmp_path / f"{path.stem}.rescored.jsonl").with_suffix(".summary.json").read_text())
        summary = json.loads((path.parent / path.name.replace(".jsonl.gz", ".summary.json")).read_text())
        assert rescored["metrics"]["pass@1"] == summary["metrics"]["pass@1"], path.name
