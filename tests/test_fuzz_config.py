"""Config/CLI fuzzer: random YAML (aliases, alias bombs, deep nesting, wrong types, duplicate keys, non-UTF-8
bytes, huge numbers, nan/inf), random key=value overrides and task names that are paths, through the entry the
CLI uses (cli.main, in-process) plus a few real subprocess runs. Every case ends within a time bound, with exit
0 or 2, and a failure is one `error: ...` line: never a traceback. Seeded: a failing case is reproducible."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest

from mftcoder.cli import main
from mftcoder.config import ALIASES, fields

SECONDS_PER_CASE = 5
KEYS = [*fields(), *ALIASES, "lerning_rate", "seq_lenght", "x", "", "-", "--seed", "a b", "\u200bseed", "k" * 300]
SCALARS = ["0", "-1", "1", "2", "1e-4", "1e400", "-1e400", ".nan", ".inf", "-.inf", "nan", "inf", "9" * 5000,
           "1" + "0" * 30, "0x1F", "0o17", "1_000", "true", "false", "yes", "no", "null", "~", "''", '""', "steps",
           "lora", "pack", "[a,b]", "'[a,b'", "2001-13-45", "2024-01-01", "!!binary aGk=", "!!python/object:os.system",
           "'a\\x00b'", '"a\\0b"', "'" + "s" * 10_000 + "'", "95,5,0", "nan,1,1", "100,0,0", "1,inf", "'/tmp/x'",
           "'../../x'", "|\n  block\n  text", ">-\n  folded", "&anchor 3", "*undefined", "@reserved", "%TAG"]
GOOD_LINES = ["seq_length: 512", "learning_rate: 1e-4", "data_split: '90,10,0'", "evaluation_strategy: 'no'",
              "tasks: {code_gen: /tmp/a, unit-tests.v2: /tmp/b}", "task_weights: [1, 2]", "padding_mode: pack",
              "atorch_strategy: [parallel_mode]", "peft_type: lora", "seed: 7", "data_paths: '[/tmp/a,/tmp/b]'"]
TASK_NAMES = ["/tmp/x", "../../x", "..", ".", ".hidden", "a/b", "a b", "ok_name", "t" * 300, "\x00", "代码", "a:b"]


def _value(rng: random.Random, depth: int = 0) -> str:
    """A random YAML value in flow style."""
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(SCALARS[:-12] if depth else SCALARS)
    if roll < 0.7:
        return "[" + ", ".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 4))) + "]"
    if roll < 0.85:
        items = [f"{rng.choice(TASK_NAMES + KEYS[:5])!r}: {_value(rng, depth + 1)}" for _ in range(rng.randint(0, 3))]
        return "{" + ", ".join(items) + "}"
    if roll < 0.93:
        n = rng.choice([10, 500, 5000])
        return "[" * n + "1" + "]" * n
    return _bomb(rng)


def _bomb(rng: random.Random) -> str:
    """Nested aliases (a billion laughs), sometimes recursive."""
    if rng.random() < 0.2:
        return "&r [1, *r]"
    width, levels = rng.randint(2, 10), rng.randint(2, 9)
    parts = [f"&l0 [{', '.join(['1'] * width)}]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def random_config(rng: random.Random) -> bytes:
    """A random config file: keys (valid, aliased, misspelt, duplicated), values, and byte-level damage."""
    if rng.random() < 0.3:  # a valid config, sometimes with damage below
        return "\n".join(rng.sample(GOOD_LINES, rng.randint(1, 4))).encode() + rng.choice([b"", b"", b"\n\xff"])
    keys = [rng.choice(KEYS) for _ in range(rng.randint(0, 6))]
    if keys and rng.random() < 0.2:
        keys.append(rng.choice(keys))  # a duplicate key
    lines = [f"{key}: {_value(rng)}" for key in keys]
    if rng.random() < 0.3:
        names = rng.sample(TASK_NAMES, 2)
        lines.append("tasks: {" + ", ".join(f"{n!r}: /tmp/d" for n in names) + "}")
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    damage = rng.random()
    if damage < 0.1 and data:
        at = rng.randrange(len(data))
        data = data[:at] + bytes([rng.choice([0xff, 0xe9, 0xc3, 0x80, 0x00, 0x09])]) + data[at:]
    elif damage < 0.15:
        data = b"\xef\xbb\xbf" + data
    elif damage < 0.2 and data:
        data = data[:rng.randrange(len(data))]
    return data


def random_overrides(rng: random.Random) -> list[str]:
    """key=value overrides: random keys and values, task maps whose names are paths, stray forms."""
    out = []
    for _ in range(rng.randint(0, 3)):
        roll = rng.random()
        if roll < 0.2:
            out.append("tasks={" + f"{rng.choice(TASK_NAMES)!r}: /tmp/d" + "}")
        elif roll < 0.25:
            out.append(rng.choice(["seed", "=", "==", "a=b=c", "seed=", "=1"]))
        else:
            out.append(f"{rng.choice(KEYS)}={_value(rng)}")
    return out


def run_bounded(argv: list[str], capsys) -> tuple[int | None, str, str, str]:
    """cli.main(argv) in a thread: (exit code or None when past the time bound, out, err, escaped traceback)."""
    result: dict = {}

    def target() -> None:
        try:
            result["code"] = main(argv)
        except SystemExit as exc:  # argparse refusing the command line: its usage and one error line
            result["code"], result["usage"] = exc.code, True
        except BaseException:  # noqa: BLE001 - nothing else may escape
            result["escaped"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(SECONDS_PER_CASE)
    out = capsys.readouterr()
    err = out.err
    if result.get("usage"):  # argparse's own form: 'usage: ...' lines, then 'mftcoder ...: error: reason'
        *_, last = err.splitlines() or [""]
        err = f"error: {last.split(': error: ', 1)[1]}\n" if ": error: " in last else err
    return (None if thread.is_alive() else result.get("code")), out.out, err, result.get("escaped", "")


def check_outcome(code: int | None, out: str, err: str, escaped: str, what: str) -> None:
    assert code is not None or escaped, f"{what}: still running after {SECONDS_PER_CASE} s"
    assert not escaped, f"{what}: exception escaped:\n{escaped[-3000:]}"
    assert "Traceback" not in out + err, f"{what}: {err[-3000:]}"
    assert code in (0, 2), f"{what}: exit {code}: {err[-500:]}"
    problems = [line for line in err.splitlines() if not line.startswith("note: ")]
    if code == 2:
        assert len(problems) == 1 and problems[0].startswith("error: ") and len(problems[0]) < 1000, f"{what}: {err[:2000]}"
    else:
        assert problems == [], f"{what}: {err[:2000]}"


@pytest.mark.parametrize("seed", [1, 2])
def test_random_configs_and_overrides_never_crash_or_hang(tmp_path, capsys, seed):
    rng = random.Random(seed)
    outcomes = {0: 0, 2: 0}
    for case in range(100):
        path = tmp_path / f"c{case}{rng.choice(['.yaml', '.yaml', '.json'])}"
        if path.suffix == ".json":
            path.write_bytes(rng.choice([b"{", b'{"seed": 1, "seed": 2}', b'{"seed": ' + b"[" * 50_000 + b"]" * 50_000
                                         + b"}", b'{"seq_length": 1e999}', b'{"tasks": {"../x": "d"}}', b"[]",
                                         b'{"data_split": "nan,1,1"}', b"\xff\xfe{}", b'{"seed": 1}']))
        else:
            path.write_bytes(random_config(rng))
        argv = ["config", "show", str(path), *(random_overrides(rng) if rng.random() < 0.6 else [])]
        code, out, err, escaped = run_bounded(argv, capsys)
        check_outcome(code, out, err, escaped, f"seed {seed} case {case}: {argv} with {path.read_bytes()[:300]!r}")
        outcomes[code] += 1
    assert outcomes[0] > 5 and outcomes[2] > 50  # both paths are exercised


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "..", "a/b"])
def test_task_names_that_are_paths_stop_data_check(tmp_path, capsys, name):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "d.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    argv = ["data", "check", "/dev/null", "tasks={" + f"{name!r}: {str(folder)!r}" + "}",
            f"data_cache_dir={tmp_path / 'cache'}"]
    code, out, err, escaped = run_bounded(argv, capsys)
    check_outcome(code, out, err, escaped, name)
    assert code == 2 and err.startswith(f"error: tasks: task name {name!r} ") and not (tmp_path / "cache").exists()


def test_real_cli_runs(tmp_path):
    """The installed entry in its own process: an alias bomb, a non-UTF-8 file and a duplicate key, each one line."""
    bomb = "task_weights: [&a [1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]\n"
    files = {"bomb.yaml": bomb.encode(), "latin1.yaml": b"seed: 1\n# \xe9\n", "dup.yaml": b"seed: 1\nseed: 2\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        done = subprocess.run([sys.executable, "-m", "mftcoder", "config", "show", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 2 and done.stdout == "", (name, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {tmp_path / name}:"), done.stderr
