"""The tokenized-data cache (read back, invalidated, parallel == serial) and deterministic per-task splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import chat, write_task

from mftcoder.cli import main
from mftcoder.config import ConfigError, build_config
from mftcoder.data import tokenize
from mftcoder.data.prepare import prepare_data
from mftcoder.data.records import DataError
from mftcoder.data.tasks import discover_tasks, per_task_values, split_indices
from mftcoder.model import DEMO_DATA


def demo_args(cache):
    paths = ",".join(str(p) for p in sorted(DEMO_DATA.iterdir()) if p.is_dir())
    return ["data", "check", "/dev/null", f"data_paths=[{paths}]", f"data_cache_dir={cache}", "seq_length=256"]


def test_second_data_check_reads_the_cache(tmp_path, capsys):
    assert main(demo_args(tmp_path)) == 0
    first = capsys.readouterr().out
    assert "0 of 3 task(s) read from the cache" in first
    assert main(demo_args(tmp_path)) == 0
    second = capsys.readouterr().out
    assert "3 of 3 task(s) read from the cache" in second
    assert first.splitlines()[:5] == second.splitlines()[:5]  # same table
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_cache_is_rebuilt_when_data_or_template_change(tmp_path, tokenizer, template):
    folder = write_task(tmp_path, "t", [chat(("human", "a"), ("bot", "b"))])
    base = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "cache"), "data_split": "1,0,0"}
    config = build_config(base)[0]
    assert not prepare_data(config, tokenizer, template).per_task[0].data.from_cache
    assert prepare_data(config, tokenizer, template).per_task[0].data.from_cache
    assert prepare_data(build_config({**base, "seq_length": 8})[0], tokenizer, template).per_task[0].data.from_cache
    write_task(tmp_path, "t", [chat(("human", "a"), ("bot", "b"))] * 2)
    os.utime(folder / "data.jsonl", ns=(1, 1))
    again = prepare_data(config, tokenizer, template).per_task[0].data
    assert not again.from_cache and len(again) == 2
    from mftcoder.data.template import build_template
    other = build_template("codefuse", {}, tokenizer)
    assert not prepare_data(config, tokenizer, other).per_task[0].data.from_cache


def test_parallel_tokenization_equals_serial(tmp_path, tokenizer, template, monkeypatch):
    records = [chat(("human", f"q{i} " * (i % 7 + 1)), ("bot", f"a{i}\n" * (i % 5 + 1))) for i in range(5000)]
    records[1234] = "{broken"
    task = discover_tasks([str(write_task(tmp_path, "t", records))])[0]
    serial = tokenize.load_tokenized(task, tokenizer, template, tmp_path / "serial", workers=1)
    monkeypatch.setattr(tokenize, "PARALLEL_MIN_BYTES", 0)
    parallel = tokenize.load_tokenized(task, tokenizer, template, tmp_path / "parallel", workers=2)
    assert len(serial) == len(parallel) == 4999 and serial.num_lines == 5000
    assert np.array_equal(serial.ids, parallel.ids) and np.array_equal(serial.mask, parallel.mask)
    assert np.array_equal(serial.starts, parallel.starts) and np.array_equal(serial.lines, parallel.lines)
    assert serial.errors == parallel.errors == [f"{task.files[0]}:1235: invalid JSON: Expecting property name "
                                                "enclosed in double quotes at column 2"]
    assert isinstance(serial.ids, np.memmap)


def _load_after_barrier(barrier, results, task, tokenizer, template, root):
    barrier.wait()
    data = tokenize.load_tokenized(task, tokenizer, template, root, workers=1)
    results.put((data.from_cache, int(np.asarray(data.ids).sum()), data.digest))


def test_concurrent_loaders_tokenize_once(tmp_path, tokenizer, template):
    """The ranks of a job start together on a first run: one tokenizes, the others wait and read its cache."""
    import multiprocessing

    records = [chat(("human", f"q{i} " * (i % 7 + 1)), ("bot", f"a{i}\n" * (i % 5 + 1))) for i in range(4000)]
    task = discover_tasks([str(write_task(tmp_path, "t", records))])[0]
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_load_after_barrier, args=(barrier, results, task, tokenizer, template,
                                                                 tmp_path / "cache")) for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [from_cache for from_cache, _, _ in outcomes] == [False, True, True]
    assert len({(total, digest) for _, total, digest in outcomes}) == 1  # all read the same tokens
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_split_is_deterministic_disjoint_and_sized():
    train, valid, test = split_indices(1000, (0.9, 0.05, 0.05), seed=7, task_name="a")
    assert (len(train), len(valid), len(test)) == (900, 50, 50)
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(1000))
    again = split_indices(1000, (0.9, 0.05, 0.05), seed=7, task_name="a")
    assert all(np.array_equal(x, y) for x, y in zip((train, valid, test), again))
    assert not np.array_equal(valid, split_indices(1000, (0.9, 0.05, 0.05), seed=8, task_name="a")[1])
    assert not np.array_equal(valid, split_indices(1000, (0.9, 0.05, 0.05), seed=7, task_name="b")[1])
    unshuffled = split_indices(10, (0.8, 0.2, 0.0), seed=7, task_name="a", shuffle=False)
    assert [x.tolist() for x in unshuffled] == [list(range(8)), [8, 9], []]


def test_split_survives_a_seq_length_change(tmp_path, tokenizer, template):
    records = [chat(("human", "q"), ("bot", "word " * (i % 30 + 1))) for i in range(200)]
    folder = write_task(tmp_path, "t", records)
    base = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "c"), "data_split": "80,20,0"}
    wide = prepare_data(build_config(base)[0], tokenizer, template).per_task[0]
    narrow = prepare_data(build_config({**base, "seq_length": 20, "over_length": "drop"})[0], tokenizer, template).per_task[0]
    assert len(wide.valid) == 40 and 0 < len(narrow.valid) < 40
    assert set(narrow.valid.tolist()) <= set(wide.valid.tolist())


def test_per_task_weights_by_list_or_name(tmp_path):
    tasks = discover_tasks([str(write_task(tmp_path, n, [chat(("human", "q"), ("bot", "a"))])) for n in ("x", "y")])
    assert per_task_values("w", [], tasks).tolist() == [1.0, 1.0]
    assert per_task_values("w", [2.0, 0.5], tasks).tolist() == [2.0, 0.5]
    assert per_task_values("w", {"y": 3.0}, tasks).tolist() == [1.0, 3.0]
    with pytest.raises(ConfigError, match="unknown task 'z'"):
        per_task_values("w", {"z": 1.0}, tasks)
    with pytest.raises(ConfigError, match="1 values for 2 tasks"):
        per_task_values("w", [1.0], tasks)


def test_explicit_task_map(tmp_path):
    folder = write_task(tmp_path, "folder_name", [chat(("human", "q"), ("bot", "a"))])
    tasks = discover_tasks([], {"renamed": str(folder)})
    assert [(t.id, t.name) for t in tasks] == [(0, "renamed")]


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "ids.bin").write_bytes((d / "ids.bin").read_bytes()[:-8]),
     "ids.bin holds 168 bytes and mask.bin 44; meta.json says 44 tokens"),
    (lambda d: (d / "ids.bin").write_bytes(b"\xff\xff\xff\x7f" + (d / "ids.bin").read_bytes()[4:]),
     "token ids outside the tokenizer's vocabulary of 50,279 (from token 0 on)"),
    (lambda d: (d / "mask.bin").write_bytes(b"\x07" + (d / "mask.bin").read_bytes()[1:]),
     "loss-mask values other than 0 and 1 (from token 0 on)"),
    (lambda d: (d / "meta.json").write_text("{oops"), "meta.json cannot be read (JSONDecodeError)"),
    (lambda d: (d / "index.npz").write_bytes(b"PK\x03\x04junk"), "its files cannot be read (BadZipFile)"),
])
def test_a_damaged_cache_is_reported_and_tokenized_again(tmp_path, capsys, tokenizer, template, damage, problem):
    folder = write_task(tmp_path, "t", [chat(("human", f"question {i}"), ("bot", f"answer {i}")) for i in range(4)])
    values = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "cache"), "data_split": "1,0,0"}
    first = prepare_data(build_config(values)[0], tokenizer, template).per_task[0].data
    reference = (np.asarray(first.ids).copy(), np.asarray(first.mask).copy(), first.starts.copy())
    (directory,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    damage(directory)
    again = prepare_data(build_config(values)[0], tokenizer, template).per_task[0].data
    assert capsys.readouterr().err == (f"note: the tokenized cache of task t ({directory}) is damaged: {problem}; "
                                       "tokenizing again\n")
    assert not again.from_cache
    assert all(np.array_equal(a, b) for a, b in zip(reference, (again.ids, again.mask, again.starts)))
    assert prepare_data(build_config(values)[0], tokenizer, template).per_task[0].data.from_cache


def test_a_huge_record_is_cut_before_tokenizing_with_the_same_result(tmp_path, tokenizer, template):
    """Content far beyond seq_length is not tokenized (memory), and what truncation keeps is unchanged."""
    from mftcoder.data.records import parse_record
    from mftcoder.data.tokenize import ChunkEncoder

    code = "def f(x):\n    return x * 2  # double it\n"
    spaces = chat(("human", "A rule."), ("bot", "-" * 3000))  # fits in 64 tokens though long in characters
    records = [chat(("human", "Write it."), ("bot", code * 500)), spaces, chat(("human", code * 500), ("bot", "ok"))]
    lines = [(n, json.dumps(r)) for n, r in enumerate(records, 1)]
    cut = ChunkEncoder(tokenizer, template, seq_length=64)(("x.jsonl", lines))
    whole = ChunkEncoder(tokenizer, template)(("x.jsonl", lines))
    assert cut.cut == 2 and whole.cut == 0 and cut.errors == whole.errors == []
    assert whole.lengths.tolist()[1] == cut.lengths.tolist()[1] < 64  # the one that fits: untouched
    assert cut.lengths.max() < 1000 < whole.lengths.min(initial=10**9, where=whole.lengths > 64)
    for k in range(3):
        a, b = (int(x.lengths[:k].sum()) for x in (cut, whole))
        assert np.array_equal(cut.ids[a:a + 64], whole.ids[b:b + 64]) and np.array_equal(cut.mask[a:a + 64], whole.mask[b:b + 64])
    assert parse_record(lines[0][1])  # the record itself is valid

    folder = write_task(tmp_path, "t", [records[0]] * 2 + [spaces])
    folder_file = folder / "data.jsonl"
    folder_file.write_text(folder_file.read_text() + json.dumps(chat(("human", "x" * 2_000_000), ("bot", "y"))) + "\n")
    base = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "c"), "data_split": "1,0,0", "seq_length": 64}
    short = prepare_data(build_config(base)[0], tokenizer, template).per_task[0]
    assert short.data.cut == 3 and len(short.data.ids) < 2000  # 2 MB of text never tokenized
    assert (short.truncated, short.dropped_no_target, int(short.kept.sum())) == (2, 1, 3)
    dropped = prepare_data(build_config({**base, "over_length": "drop"})[0], tokenizer, template).per_task[0]
    assert dropped.data.from_cache and dropped.dropped_over_length == 3
    longer = prepare_data(build_config({**base, "seq_length": 128})[0], tokenizer, template).per_task[0].data
    assert not longer.from_cache and longer.cut == 3  # cut for 64: tokenized again for 128


def _square_unless_13(x: int) -> int:
    if x == 13:
        raise DataError("13 is unlucky")
    return x * x


def _children() -> set[int]:
    return {int(pid) for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()}


def test_ordered_map_keeps_order_raises_the_jobs_error_and_never_leaves_a_worker():
    from mftcoder.data.workers import ordered_map

    before = _children()
    squares = ordered_map(_square_unless_13, range(12), 3)
    assert [next(squares) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert len(_children() - before) == 3
    squares.close()  # the caller stops early (an interruption closes it the same way)
    assert _children() == before
    with pytest.raises(DataError, match="13 is unlucky"):
        list(ordered_map(_square_unless_13, range(20), 2))
    assert _children() == before
