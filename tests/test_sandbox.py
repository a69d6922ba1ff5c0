"""The sandbox contains hostile completions: each is reported as a failure, nothing it started outlives it, and the
evaluator goes on. Tests run as root here, where RLIMIT_NPROC does not hold: no unbounded fork bomb is run."""

import os
import time
import uuid
from pathlib import Path

import pytest

from mftcoder.codeeval.problems import Problem
from mftcoder.codeeval.sandbox import Limits, Sandbox, SandboxError, namespaces_available, run_all

ADD = Problem("add", "toy", (), "def check(candidate):\n    assert candidate(1, 2) == 3\n", "def add(a, b):\n",
              entry_point="add")


def isolations():
    found = []
    for isolation in ("namespaces", "process"):
        try:
            Sandbox(Limits(timeout=5), isolation)
            found.append(isolation)
        except SandboxError:
            pass
    return found


AVAILABLE = isolations()


@pytest.fixture(params=AVAILABLE or [pytest.param(None, marks=pytest.mark.skip("no sandbox works here"))])
def sandbox(request):
    return Sandbox(Limits(timeout=3), request.param)


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds the marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and \
                    "\nState:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def body(*lines: str) -> str:
    return "".join(f"    {line}\n" for line in lines)


def test_a_namespace_sandbox_is_available_where_the_tests_run_as_root():
    if os.geteuid() == 0:
        assert namespaces_available() and "namespaces" in AVAILABLE


def test_a_correct_completion_passes_and_a_wrong_one_fails(sandbox):
    good, wrong, broken = run_all(sandbox, [ADD.program(body("return a + b")), ADD.program(body("return a - b")),
                                            ADD.program(body("return (a +"))], progress=False)
    assert (good.passed, good.status, good.error) == (True, "passed", "")
    assert (wrong.passed, wrong.status, wrong.error) == (False, "failed", "AssertionError")
    assert not broken.passed and broken.error.startswith("SyntaxError")


def test_hostile_completions_are_contained_and_fail(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("MFTCODER_TEST_SECRET", "hunter2")
    outside = tmp_path / "outside.txt"
    marker = f"{time.time() % 1000:.6f}"  # the sleeping children's `sleep` argument, unique to this test
    hostile = {
        "infinite loop": body("while True:", "    pass"),
        "forks sleeping children": body("import os", "for _ in range(20):",
                                        f"    if os.fork() == 0: os.execv('/bin/sleep', ['sleep', '{marker}'])",
                                        "while True: pass"),
        "allocates 50 GB": body("block = bytearray(50 * 2**30)", "return a + b"),
        "writes outside its directory": body(f"open({str(outside)!r}, 'w').write('escaped')", "return a + b"),
        "kills its parent": body("import os, signal", "os.kill(os.getppid(), signal.SIGKILL)", "return a + b"),
        "reads the environment": body("import os", "return a + b + len(os.environ['MFTCODER_TEST_SECRET'])"),
    }
    started = time.perf_counter()
    verdicts = dict(zip(hostile, run_all(sandbox, [ADD.program(code) for code in hostile.values()], progress=False)))
    assert time.perf_counter() - started < 3 * (3 + 2)  # two workers, two 3-second timeouts at most in a row
    assert {name: v.passed for name, v in verdicts.items()} == {name: False for name in hostile}
    assert verdicts["infinite loop"].status == "timed out"
    assert verdicts["forks sleeping children"].status == "timed out"
    assert verdicts["allocates 50 GB"].status == "out of memory"
    assert verdicts["writes outside its directory"].error.split(":")[0] in ("PermissionError", "FileNotFoundError")
    assert verdicts["kills its parent"].error == "the program killed its parent process (signal 9)"
    assert verdicts["reads the environment"].error == "KeyError: 'MFTCODER_TEST_SECRET'"
    assert not outside.exists()
    assert processes_with(marker) == []  # the timeout killed the whole process group
    assert sandbox.run(ADD.program(body("return a + b"))).passed  # and the evaluator goes on


def test_children_that_leave_the_process_group_die_with_their_problem():
    if "namespaces" not in AVAILABLE:
        pytest.skip("needs PID namespaces: a child that calls setsid() escapes a process group")
    sandbox = Sandbox(Limits(timeout=3), "namespaces")
    marker = f"{time.time() % 1000 + 1000:.6f}"
    escape = f"/tmp/mftcoder-escape-{uuid.uuid4().hex}"
    code = body("import os", "if os.fork() == 0:", "    os.setsid()", f"    os.execv('/bin/sleep', ['sleep', '{marker}'])",
                f"open({escape!r}, 'w').write('x')", "return a + b")
    verdict = sandbox.run(ADD.program(code))
    assert verdict.passed  # a correct answer that also left a child behind and wrote to its own /tmp
    assert processes_with(marker) == []
    assert not Path(escape).exists()  # its /tmp was private


def test_files_and_output_are_size_limited(sandbox):
    limited = Sandbox(Limits(timeout=3, file_bytes=1 << 20), "namespaces" if sandbox.namespaces else "process")
    written, printed = run_all(limited, [ADD.program(body("open('big', 'w').write('x' * (4 << 20))", "return a + b")),
                                         ADD.program(body("print('y' * (4 << 20))", "return a + b"))], progress=False)
    assert (written.passed, written.error) == (False, "OSError: [Errno 27] File too large")
    assert (printed.passed, printed.error) == (False, "OSError: [Errno 27] File too large")


def test_the_process_limit_holds_even_for_root(sandbox):
    # As root the program runs as nobody, so RLIMIT_NPROC applies. Bounded: 200 forks at most even without it.
    limited = Sandbox(Limits(timeout=5, processes=16), "namespaces" if sandbox.namespaces else "process")
    code = body("import os, time", "for _ in range(200):", "    if os.fork() == 0:", "        time.sleep(60)",
                "        os._exit(0)", "return a + b")
    verdict = limited.run(ADD.program(code))
    assert (verdict.passed, verdict.error) == (False, "BlockingIOError: [Errno 11] Resource temporarily unavailable")
