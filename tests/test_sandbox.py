"""The sandbox contains hostile completions: each is reported as a failure, nothing it started outlives it, and the
evaluator goes on. Tests run as root here, where RLIMIT_NPROC does not hold: no unbounded fork bomb is run. As root,
this file also runs itself as an ordinary user (nobody), where the sandbox uses a user namespace."""

import inspect
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mftcoder.codeeval.problems import Problem
from mftcoder.codeeval.sandbox import (Limits, Sandbox, SandboxError, namespaces_available, namespaces_unavailable,
                                       run_all)

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


def processes_with(marker: str, within: float = 2.0) -> list[int]:
    """Live (not zombie) processes whose command line holds the marker, still there after `within` seconds (a killed
    process takes a moment to go; one that was not killed sleeps far longer)."""
    deadline = time.perf_counter() + within
    while (found := _processes_with(marker)) and time.perf_counter() < deadline:
        time.sleep(0.05)
    return found


def _processes_with(marker: str) -> list[int]:
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


def test_the_sandbox_uses_namespaces_where_unshare_allows_them():
    chosen = Sandbox(Limits(timeout=3))
    print(f"\nsandbox mode: {chosen.describe()}" + (f" (no namespaces: {chosen.why_not_namespaces})"
                                                    if not chosen.namespaces else ""))
    if os.geteuid() == 0:  # as root: the namespaces directly, the program as nobody
        assert namespaces_available() and "namespaces" in AVAILABLE
        assert chosen.describe().startswith("own PID/mount/network namespaces, as nobody")
    elif namespaces_unavailable() is None:  # an ordinary user: inside a user namespace of its own
        assert chosen.describe().startswith("own user/PID/mount/network namespaces, as this user (its root, no ")
    else:
        assert chosen.describe().startswith("own process group, as this user")


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
        # Completion is the program's process ending with a status drawn for the run: no message written to any
        # descriptor (its own, or the sandbox processes' above it through /proc) and no plain exit status passes.
        "forges its completion": body("import os, glob", "parent = os.getppid()",
                                      "grandparent = int(open(f'/proc/{parent}/stat').read().rsplit(')')[1].split()[1])",
                                      "for message in (b'done', b'passed\\n', b'ready\\npassed\\n'):",
                                      "    for fd in range(1024):", "        try: os.write(fd, message)",
                                      "        except OSError: pass",
                                      "    for pid in (parent, grandparent):",
                                      "        for path in glob.glob(f'/proc/{pid}/fd/*'):",
                                      "            try: open(path, 'wb').write(message)",
                                      "            except OSError: pass",
                                      "os._exit(0)"),
        "exits with status 0": body("import os", "os._exit(0)"),
        "calls sys.exit(0)": body("import sys", "sys.exit(0)"),
        "mounts over /tmp": body("import ctypes", "libc = ctypes.CDLL(None)",
                                 "assert libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) != 0, 'mounted'",
                                 "assert libc.umount2(b'/tmp', 2) != 0, 'unmounted'", "raise PermissionError('refused')"),
    }
    started = time.perf_counter()
    verdicts = dict(zip(hostile, run_all(sandbox, [ADD.program(code) for code in hostile.values()], progress=False)))
    assert time.perf_counter() - started < 3 * (3 + 2)  # two workers, two 3-second timeouts at most in a row
    # Without namespaces and without root the program is this user: it can write wherever the user can (docs/eval.md).
    escapes = not sandbox.namespaces and os.geteuid() != 0
    assert {name: v.passed for name, v in verdicts.items()} == {name: escapes and name == "writes outside its directory"
                                                                for name in hostile}
    assert verdicts["infinite loop"].status == "timed out"
    assert verdicts["forks sleeping children"].status == "timed out"
    assert verdicts["allocates 50 GB"].status == "out of memory"
    assert verdicts["writes outside its directory"].error.split(":")[0] == \
        ("" if escapes else "FileNotFoundError" if sandbox.namespaces else "PermissionError")
    assert verdicts["kills its parent"].error == "the program killed its parent process (signal 9)"
    assert verdicts["reads the environment"].error == "KeyError: 'MFTCODER_TEST_SECRET'"
    assert verdicts["forges its completion"].error == "the program exited (status 0) before its end"
    assert verdicts["exits with status 0"].error == "the program exited (status 0) before its end"
    assert verdicts["calls sys.exit(0)"].error == "SystemExit: 0"
    assert verdicts["mounts over /tmp"].error == "PermissionError: refused"
    assert outside.exists() == escapes
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


def test_an_ordinary_user_gets_the_same_verdicts(tmp_path):
    """This file's other tests, run as nobody: in a user namespace where `unshare --user` works, else in process mode."""
    if os.geteuid() != 0:
        pytest.skip("the suite already runs as an ordinary user: the other tests are this test")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no `setpriv` (util-linux) to become an ordinary user")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    checkout = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(checkout), *site.getsitepackages()])}
    python = ordinary_python(nobody, env)
    if python is None:
        pytest.skip(f"nobody can run neither {sys.executable} nor a python{sys.version_info[0]}."
                    f"{sys.version_info[1]} of the system with this checkout and its packages")
    userns = subprocess.run([*nobody, "unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--net",
                             "true"], capture_output=True).returncode == 0
    home = Path(tempfile.mkdtemp(prefix="mftcoder-nobody-"))
    try:
        os.chown(home, 65534, 65534)
        done = subprocess.run([*nobody, python, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--noconftest",
                               f"--basetemp={home / 'tmp'}", f"{Path(__file__).resolve()}", "-k", "not ordinary_user"],
                              cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    output = done.stdout + done.stderr
    mode = re.search(r"^sandbox mode: (.*)$", output, re.M)
    assert mode, output[-3000:]
    assert mode.group(1).startswith("own user/PID/mount/network namespaces, as this user" if userns else
                                    "own process group, as this user"), mode.group(1)
    isolations = 2 if userns else 1  # process mode works for nobody whenever it can run Python at all
    per_isolation = [name for name, f in globals().items() if name.startswith("test_") and
                     "sandbox" in inspect.signature(f).parameters]
    expected = 1 + len(per_isolation) * isolations + (1 if userns else 0)  # the mode; each isolation; the setsid escape
    summary = output.strip().splitlines()[-1]
    assert done.returncode == 0 and re.match(rf"{expected} passed(, 1 skipped)?, 1 deselected in ", summary), output[-3000:]


def ordinary_python(nobody: list[str], env: dict) -> str | None:
    """A Python of this version that nobody can run with this checkout and its packages (this one may be unreachable)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and subprocess.run([*nobody, candidate, "-c", "import pytest, tqdm, mftcoder.codeeval.sandbox, subprocess, sys; "
                                        "subprocess.run([sys.executable, '-I', '-c', 'import json'], check=True)"],
                                        env=env, capture_output=True).returncode == 0:
            return candidate
    return None
