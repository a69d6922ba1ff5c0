"""The data fuzzer (bench/fuzz_data.py) in-process: a few hundred mutated lines, mixed with good ones, through
`mftcoder data check`; no exception escapes, every bad line is one `path:line: reason` line, counts add up."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import sys
import traceback
from pathlib import Path

import pytest
import transformers  # noqa: F401 - now, at collection: its log handler then keeps the session's stderr, not the
# stderr of the test that first logs (closed after that test; a later warning would print a logging traceback)

from mftcoder.cli import main


def _load_fuzz_engine():
    """bench/fuzz_data.py as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "fuzz_data.py"
    spec = importlib.util.spec_from_file_location("fuzz_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the classes are made
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_engine()


@pytest.fixture(scope="module")
def seeds():
    return fuzz.demo_records(limit_per_task=60) + fuzz.built_records()


def run_in_process(batch, capsys) -> tuple[int, str, str]:
    """`mftcoder data check` on the batch through cli.main; an exception escaping it fails the test."""
    try:
        code = main(batch.argv())
    except BaseException:  # noqa: BLE001 - SystemExit included: nothing may escape
        pytest.fail("exception escaped `mftcoder data check`:\n" + traceback.format_exc())
    out = capsys.readouterr()
    return code, out.out, out.err


# (seed, policy, preset, seq_length): 2 x 150 mutations; truncation and drops happen at 128
CASES = [(1, "error", "mftcoder", 8192), (2, "skip", "chatml", 128)]


@pytest.mark.parametrize(("seed", "policy", "preset", "seq_length"), CASES)
def test_mutated_lines_are_all_reported_and_nothing_escapes(tmp_path, capsys, seeds, seed, policy, preset, seq_length):
    rng = random.Random(seed)
    batch = fuzz.make_batch(rng, tmp_path / "data", seeds, 150, fuzz.kind_cycle(rng))
    batch = dataclasses.replace(batch, policy=policy, preset=preset, seq_length=seq_length)
    fuzz.add_unreadable_entries(rng, batch)
    kinds = {e.kind for f in batch.files for e in f.entries}
    assert batch.mutations == 150 and kinds == {*fuzz.KINDS, "good"}

    code, out, err = run_in_process(batch, capsys)
    outcome = fuzz.judge(batch, code, out, err)
    assert outcome.problems == [], "\n".join(outcome.problems[:20])

    refused = fuzz.REFUSED_IN_MESSAGES.get(preset, ())
    expected = {str(f.path): f.expected_bad_lines(refused) for f in batch.files}
    total_bad = sum(map(len, expected.values()))
    reported = [row for row in out.splitlines() if any(row.startswith(f"{path}:") for path in expected)]
    assert "Traceback" not in out + err
    assert code == (1 if policy == "error" else 0)
    assert 100 < total_bad < 150 + 10  # most mutations break the record; some stay valid; a few split in two
    assert outcome.bad_reported == len(reported) == total_bad
    assert f"{total_bad} bad record(s)" in out
    for row in reported:  # each names an existing line of its file
        path, number = row.split(": ", 1)[0].rsplit(":", 1)
        assert 1 <= int(number) <= len(next(f for f in batch.files if str(f.path) == path).lines)

    # The good (unmutated) lines are all kept, unless a message holds a marker this tokenizer cannot keep as text.
    good_refused = kept_good = 0
    for case in batch.files:
        for number, index in enumerate(case.origin, 1):
            if index >= 0 and case.entries[index].kind == "good":
                if number in expected[str(case.path)]:
                    assert any(marker.encode() in case.lines[number - 1] for marker in refused)
                    good_refused += 1
                else:
                    kept_good += 1
    assert kept_good >= 70  # at least half as many good lines as mutated ones
    for name, files in batch.tasks.items():
        row = outcome.table[name]
        lines, bad, kept, truncated, dropped = map(int, row[1:6])
        assert lines == sum(len(f.lines) for f in files)
        assert bad == sum(len(expected[str(f.path)]) for f in files)
        assert kept + dropped == lines - bad and truncated <= kept
    all_kept = sum(int(outcome.table[name][3]) + int(outcome.table[name][5]) for name in batch.tasks)
    assert all_kept >= kept_good  # kept or dropped for length: never reported bad
    if seq_length == 8192:
        assert sum(int(outcome.table[name][4]) for name in batch.tasks) <= sum(
            e.kind in ("long_string", "huge_record", "stacked") for f in batch.files for e in f.entries)


def test_the_judge_catches_crashes_unreported_lines_and_split_reasons(tmp_path, seeds):
    """The checks themselves: a traceback, a bad line left out and a reason over two lines are each caught."""
    rng = random.Random(3)
    batch = fuzz.make_batch(rng, tmp_path / "data", seeds, 30, fuzz.kind_cycle(rng))
    batch = dataclasses.replace(batch, policy="skip", preset="chatml")
    assert fuzz.judge(batch, 1, "", "Traceback (most recent call last):\nValueError: x").crashed
    assert fuzz.judge(batch, 2, "", "").crashed
    bad = [(str(f.path), n) for f in batch.files for n in sorted(f.expected_bad_lines())]
    rows = [f"{path}:{n}: some reason" for path, n in bad]
    table = ["task  lines  bad  kept  truncated  dropped  supervised  len p50/p90/p99/max  train  valid  test  ctl-as-text"]
    table += [f"{name} {sum(len(f.lines) for f in files)} 0 0 0 0 0 - 0 0 0 0" for name, files in batch.tasks.items()]
    tail = ["tokenized data: 0 of 1 task(s) read from the cache", f"{len(bad)} bad record(s) (skipped and counted: "
            "on_bad_record=skip)"]
    complete = fuzz.judge(batch, 0, "\n".join(rows + table + tail), "")
    assert not complete.crashed and complete.bad_reported == len(bad) > 10
    assert not any("reported" in p or "unexpected" in p for p in complete.problems)  # (the fake table's counts are off)
    missing = fuzz.judge(batch, 0, "\n".join(rows[1:] + table + tail), "")
    assert f"{bad[0][0]}:{bad[0][1]}: not reported, though bad" in missing.problems
    split = fuzz.judge(batch, 0, "\n".join([rows[0] + "\nman' (expected ...)"] + rows[1:] + table + tail), "")
    assert any(p.startswith("unexpected output line") for p in split.problems)
