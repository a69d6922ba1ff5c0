"""Malformed inputs: each gives `file:line: reason` (no traceback) under both policies, and is counted."""

from __future__ import annotations

import json

import pytest
from conftest import chat, write_task

from mftcoder.cli import main
from mftcoder.data.records import MAX_RECORD_BYTES

GOOD = chat(("human", "Add one."), ("bot", "x + 1"))
ROUND = {"role": "human", "content": "hi"}

# (line written to the file, expected reason fragment)
MALFORMED = [
    ('{"chat_rounds": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"id": 7}', "missing 'chat_rounds'"),
    ('{"chat_rounds": "hi"}', "'chat_rounds' must be a non-empty list"),
    ('{"chat_rounds": []}', "'chat_rounds' must be a non-empty list"),
    ('{"chat_rounds": ["hi"]}', "chat_rounds[0]: expected an object"),
    ('{"chat_rounds": [{"content": "hi"}]}', "chat_rounds[0]: missing 'role'"),
    ('{"chat_rounds": [{"role": "human"}]}', "chat_rounds[0]: missing 'content'"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bott", "content": "x"}]}), "unknown role 'bott'"),
    (json.dumps({"chat_rounds": [{"role": 3, "content": "x"}]}), "chat_rounds[0].role: expected a string, got int"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": 42}]}), "chat_rounds[1].content: expected a string, got int"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": None}]}), "expected a string, got NoneType"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": ""}]}), "chat_rounds[1].content is empty"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": "  \n"}]}), "chat_rounds[1].content is empty"),
    (json.dumps({"chat_rounds": [ROUND]}), "no bot turn"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": "a"}, {"role": "system", "content": "s"}]}),
     "'system' is only allowed as the first turn"),
    (json.dumps({"chat_rounds": [ROUND, ROUND, {"role": "bot", "content": "a"}]}), "expected a bot turn, got human"),
    (json.dumps({"chat_rounds": [{"role": "bot", "content": "a"}]}), "expected a human turn, got bot"),
    (json.dumps({"chat_rounds": [ROUND, {"role": "bot", "content": "a"}, ROUND]}), "last turn is a human turn"),
    (json.dumps({"prompt": "q"}), "missing 'answer'"),
    (json.dumps({"prompt": ["q"], "answer": "a"}), "'prompt': expected a string, got list"),
    (json.dumps({"prompt": "q", "answer": ""}), "'answer' is empty"),
    ("", "empty line"),
    (b'{"chat_rounds": "\xff\xfe"}', "not valid UTF-8"),
    ('{"prompt": "a\\ud800b", "answer": "x"}', "prompt: lone surrogate \\ud800 at character 1"),
    ('{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "\\udfff"}]}',
     "chat_rounds[1].content: lone surrogate \\udfff at character 0"),
    ('{"prompt": "unterminated', "invalid JSON: Unterminated string starting at column 12"),
    # found by bench/fuzz_data.py: a traceback (int() refuses over 4300 digits), reasons over several lines or huge
    ('{"prompt": "q", "answer": ' + "9" * 5000 + "}", "invalid JSON: Exceeds the limit (4300 digits) for integer"),
    (json.dumps({"chat_rounds": [{"role": "hu\nman", "content": "x"}]}), "unknown role 'hu\\nman' (expected"),
    (json.dumps({"chat_rounds": [{"role": "\x1b[31mbot", "content": "x"}]}), "unknown role '\\x1b[31mbot'"),
    (json.dumps({"chat_rounds": [{"role": "r" * 5000, "content": "x"}]}),
     "unknown role '" + "r" * 40 + "'... (5,000 characters) (expected system"),
    ('{"a\\nb\\ud800": 1, "prompt": "q", "answer": "a"}', "['a\\nb\\ud800'] (key): lone surrogate \\ud800 at character 3"),
    (json.dumps({**GOOD, "prompt": "q", "answer": "a"}),
     "both 'chat_rounds' and 'prompt', 'answer': a record is one or the other form; keep one"),
    (json.dumps({**GOOD, "answer": "a"}), "both 'chat_rounds' and 'answer': a record is one or the other form; keep one"),
]


def run_check(tmp_path, capsys, folders, policy="error", extra=()):
    args = ["data", "check", "/dev/null", f"data_paths={json.dumps([str(f) for f in folders])}",
            f"data_cache_dir={tmp_path / 'cache'}", f"on_bad_record={policy}", "seq_length=64", *extra]
    code = main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_each_malformed_line_is_reported_with_file_and_line(tmp_path, capsys, policy):
    assert len(MALFORMED) >= 20
    lines = [GOOD]
    for line, _ in MALFORMED:
        lines += [line, GOOD]
    folder = write_task(tmp_path, "t", lines)
    code, out, _ = run_check(tmp_path, capsys, [folder], policy)
    path = folder / "data.jsonl"
    for k, (_, reason) in enumerate(MALFORMED):
        line_number = 2 + 2 * k
        matching = [row for row in out.splitlines() if row.startswith(f"{path}:{line_number}: ")]
        assert len(matching) == 1 and reason in matching[0], (line_number, reason, matching)
    assert code == (1 if policy == "error" else 0)
    assert f"{len(MALFORMED)} bad record(s)" in out
    table = next(row for row in out.splitlines() if row.startswith("t "))
    assert table.split()[1:4] == [str(len(lines)), str(len(MALFORMED)), str(len(MALFORMED) + 1)]  # lines, bad, kept


def test_lone_surrogate_deep_inside_a_value_is_found_without_recursion():
    """Python 3.13's JSON parser accepts deeper nesting than Python's recursion limit; the check must not recurse."""
    from mftcoder.data.records import BadRecord, _check_unicode

    value: object = "ok\ud800"
    for _ in range(5000):
        value = [value]
    with pytest.raises(BadRecord) as caught:
        _check_unicode({"prompt": "q", "x": value})
    assert str(caught.value).startswith("x[0][0][0]") and len(str(caught.value)) < 200
    assert str(caught.value).endswith(": lone surrogate \\ud800 at character 2 (half of a UTF-16 pair; not valid Unicode text)")


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_empty_file_and_huge_line(tmp_path, capsys, policy):
    empty = write_task(tmp_path, "empty", [])
    huge = write_task(tmp_path, "huge", [GOOD, '{"chat_rounds": "' + "x" * (MAX_RECORD_BYTES + 10) + '"}', GOOD])
    code, out, _ = run_check(tmp_path, capsys, [empty, huge], policy)
    assert f"{empty / 'data.jsonl'}:1: file is empty" in out
    assert f"{huge / 'data.jsonl'}:2: line is {MAX_RECORD_BYTES + 29:,} bytes, over the limit" in out
    assert code == (1 if policy == "error" else 0)


def test_training_data_refuses_bad_records_under_error_policy(tmp_path, tokenizer, template):
    from mftcoder.config import build_config
    from mftcoder.data.prepare import prepare_data
    from mftcoder.data.records import DataError

    folder = write_task(tmp_path, "t", [GOOD, "{oops", GOOD])
    values = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "c")}
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON"):
        prepare_data(build_config(values)[0], tokenizer, template)
    prepared = prepare_data(build_config({**values, "on_bad_record": "skip"})[0], tokenizer, template)
    assert len(prepared.per_task[0].data) == 2 and len(prepared.errors) == 1


def test_folder_problems_are_all_reported(tmp_path, capsys):
    good = write_task(tmp_path, "a", [GOOD])
    (tmp_path / "nojsonl").mkdir()
    (tmp_path / "nojsonl" / "notes.txt").write_text("hi")
    other = write_task(tmp_path / "elsewhere", "a", [GOOD])
    for policy in ("error", "skip"):
        code, _, err = run_check(tmp_path, capsys, [good, tmp_path / "nojsonl", other, tmp_path / "missing"], policy)
        assert code == 2
        assert f"{tmp_path / 'nojsonl'}: no .jsonl files under this folder" in err
        assert f"{other}: duplicate task name 'a'" in err
        assert f"{tmp_path / 'missing'}: task folder does not exist" in err


def test_files_are_read_recursively_in_sorted_order(tmp_path, tokenizer, template):
    from mftcoder.config import build_config
    from mftcoder.data.prepare import prepare_data

    folder = write_task(tmp_path, "t", [GOOD], filename="b.jsonl")
    write_task(tmp_path, "t", [GOOD, GOOD], filename="a.jsonl")
    write_task(tmp_path / "t", "sub", [GOOD], filename="c.jsonl")
    config, _ = build_config({"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "c")})
    data = prepare_data(config, tokenizer, template).per_task[0].data
    assert [data.where(i) for i in range(len(data))] == [
        f"{folder / 'a.jsonl'}:1", f"{folder / 'a.jsonl'}:2", f"{folder / 'b.jsonl'}:1", f"{folder / 'sub' / 'c.jsonl'}:1"]


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_fifos_and_symlinks_under_a_task_folder_are_reported(tmp_path, capsys, policy):
    import os

    folder = write_task(tmp_path, "t", [GOOD])
    other = write_task(tmp_path, "other", [GOOD, GOOD])
    os.mkfifo(folder / "fifo.jsonl")  # opening it would block: it must never be opened
    os.symlink(tmp_path / "gone.jsonl", folder / "broken.jsonl")
    os.symlink("data.jsonl", folder / "alias.jsonl")  # a symlink to a regular file is followed
    os.symlink(other, folder / "linked")  # and so is a symlinked folder
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "loop")  # a loop: the folder is read once
    os.symlink("self.jsonl", folder / "self.jsonl")
    code, out, _ = run_check(tmp_path, capsys, [folder], policy)
    assert out.splitlines()[:4] == [
        f"{folder}/broken.jsonl: broken symlink (to '{tmp_path}/gone.jsonl'); skipped",
        f"{folder}/fifo.jsonl: not a regular file (a FIFO); not read, skipped",
        f"{folder}/self.jsonl: a symlink loop; skipped",
        f"{folder}/sub/loop: the same folder as {folder} (a symlink loop or a second link to it); read once, skipped here"]
    policy_text = "stopping" if policy == "error" else "skipped and counted"
    assert f"4 entry(ies) under the task folders not read as data ({policy_text}: on_bad_record={policy})" in out
    table = next(row for row in out.splitlines() if row.startswith("t "))
    assert table.split()[1:4] == ["4", "0", "4"]  # data.jsonl, alias.jsonl, linked/data.jsonl (2 lines)
    assert code == (1 if policy == "error" else 0)


def test_a_fifo_is_never_opened_even_when_it_appears_after_discovery(tmp_path):
    import os

    from mftcoder.data.records import read_lines

    os.mkfifo(tmp_path / "late.jsonl")
    assert [(n, str(r)) for n, r in read_lines(tmp_path / "late.jsonl")] == [
        (1, "not a regular file (a FIFO, socket or device); not read")]


def test_training_stops_on_skipped_entries_under_error_policy(tmp_path, tokenizer, template):
    import os

    from mftcoder.config import build_config
    from mftcoder.data.prepare import prepare_data
    from mftcoder.data.records import DataError

    folder = write_task(tmp_path, "t", [GOOD, GOOD])
    os.mkfifo(folder / "fifo.jsonl")
    values = {"data_paths": [str(folder)], "data_cache_dir": str(tmp_path / "c")}
    with pytest.raises(DataError) as caught:
        prepare_data(build_config(values)[0], tokenizer, template)
    assert str(caught.value) == (f"{folder}/fifo.jsonl: not a regular file (a FIFO); not read, skipped\n1 entry(ies) "
                                 "under the task folders cannot be read as data; remove them or set on_bad_record: skip "
                                 "to skip and count them")
    assert len(prepare_data(build_config({**values, "on_bad_record": "skip"})[0], tokenizer, template).skipped_entries) == 1


def test_task_names_never_leave_the_cache_folder(tmp_path, capsys):
    folder = write_task(tmp_path, "t", [GOOD])
    hidden = write_task(tmp_path, ".hidden", [GOOD])
    for tasks in ({"/tmp/x": str(folder)}, {"../../x": str(folder)}):
        code = main(["data", "check", "/dev/null", f"tasks={json.dumps(tasks)}", f"data_cache_dir={tmp_path / 'c'}"])
        assert code == 2 and "is not a name: use letters, digits" in capsys.readouterr().err
    code, _, err = run_check(tmp_path, capsys, [hidden])
    assert code == 2 and err == (f"error: {hidden}: task name '.hidden' (the folder's name) starts with '.'; a task "
                                 "name may not (it would be a hidden or relative path); rename it with tasks: "
                                 "{name: folder}\n")
    assert not (tmp_path / "c").exists() and not (tmp_path / "cache").exists()
