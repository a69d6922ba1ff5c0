"""Run untrusted Python programs (generated code and its tests), each in its own contained process.

Every program gets a separate process in a new session, a fresh working directory, CPU-time, memory, file-size,
open-file and process limits, a clean environment and a wall-clock timeout after which its whole process group is
killed. Where the machine allows it it also gets its own PID, mount, network and IPC namespaces (as root directly,
as an ordinary user inside a user namespace of its own): no network, private /tmp, and every process it started
dies with it even if it left the process group. Started as root, the program runs as `nobody`; in a user namespace,
as the namespace's root without any capability (the ordinary user outside).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

CHILD = Path(__file__).with_name("sandbox_child.py")
NAMESPACES = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--ipc"]
USER_NAMESPACE = ["--user", "--map-root-user"]  # an ordinary user may create the others only inside one of its own
SIGNALS = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit", signal.SIGKILL: "killed",
           signal.SIGSEGV: "segmentation fault"}


class SandboxError(RuntimeError):
    """The sandbox itself could not start a program (not a verdict on the program)."""


@dataclass(frozen=True)
class Limits:
    """What one program may use. Memory is address space (RLIMIT_AS); processes counts the user's processes."""

    timeout: float = 10.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20
    open_files: int = 256
    processes: int = 256
    tmp_size: str = "64m"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    status: str  # passed, failed, timed out, or the limit that stopped it
    error: str  # the last line of the traceback (or what happened), "" when passed
    seconds: float


def unshare_command() -> list[str]:
    """The `unshare` command line for this user: as root the namespaces directly, otherwise inside a user namespace."""
    return NAMESPACES if os.geteuid() == 0 else [NAMESPACES[0], *USER_NAMESPACE, *NAMESPACES[1:]]


def namespaces_unavailable() -> str | None:
    """Why `unshare` cannot give a program its own PID, mount, network and IPC namespaces here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no `unshare` command"
    try:
        done = subprocess.run([*unshare_command(), "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare` did not run: {exc}"
    last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
    return None if done.returncode == 0 else f"`{' '.join(unshare_command())} true` failed: {last}"


def namespaces_available() -> bool:
    """Whether `unshare` can give a program its own PID, mount, network and IPC namespaces here."""
    return namespaces_unavailable() is None


class Sandbox:
    """Runs programs under `limits`; `isolation` is 'namespaces', 'process' or 'auto' (namespaces when available)."""

    def __init__(self, limits: Limits = Limits(), isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "process"):
            raise ValueError(f"isolation: expected auto, namespaces or process, got {isolation!r}")
        why = namespaces_unavailable() if isolation != "process" else "isolation 'process' was asked for"
        if isolation == "namespaces" and why:
            raise SandboxError(f"isolation 'namespaces' needs `unshare` with PID, mount and network namespaces "
                               f"(root, or unprivileged user namespaces): {why}")
        self.limits, self.namespaces, self.why_not_namespaces = limits, why is None, why
        self._running: set[subprocess.Popen] = set()  # this sandbox's programs now running (to stop them)
        self._lock = threading.Lock()
        self.user_namespace = self.namespaces and os.geteuid() != 0
        probe = self.run("import json, typing, collections")
        if not probe.passed:
            raise SandboxError(f"the sandbox cannot run Python here ({self.describe()}): {probe.error}. As root without "
                               "namespaces, programs run as nobody, who must be able to read the Python installation")

    def describe(self) -> str:
        """The isolation in words, e.g. 'own PID/mount/network namespaces, as nobody, 10 s, 2 GiB'."""
        user = "as nobody" if os.geteuid() == 0 else "as this user"
        kind = "own PID/mount/network namespaces" if self.namespaces else "own process group"
        if self.user_namespace:
            kind, user = "own user/PID/mount/network namespaces", "as this user (its root, no capabilities)"
        return f"{kind}, {user}, {self.limits.timeout:g} s, {self.limits.memory_bytes / 2**30:g} GiB"

    def run(self, program: str) -> Verdict:
        """Execute one program; passed means it ran to its end without raising."""
        limits, started = self.limits, time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mftcoder-sandbox-") as scratch:
            scratch = Path(scratch)
            scratch.chmod(0o711)  # without namespaces the work dir is in here: nobody must be able to pass through
            workdir = "/tmp/work" if self.namespaces else str(scratch / "work")
            settings = {"private_tmp": self.namespaces, "user_namespace": self.user_namespace, "tmp_size": limits.tmp_size, "workdir": workdir,
                        "cpu_seconds": math.ceil(limits.timeout) + 1, "memory_bytes": limits.memory_bytes,
                        "file_bytes": limits.file_bytes, "open_files": limits.open_files,
                        "processes": limits.processes,
                        "environment": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir,
                                        "TMPDIR": workdir, "PYTHONHASHSEED": "0"}}
            report, report_write = os.pipe()  # not a file: nothing the program can reach by a path
            try:
                with open(scratch / "out", "wb") as out, open(scratch / "err", "wb") as err:
                    settings["report_fd"] = report_write
                    command = [*(unshare_command() if self.namespaces else []), sys.executable, "-I", str(CHILD),
                               json.dumps(settings)]
                    try:
                        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd="/",
                                                   pass_fds=(report_write,), start_new_session=True,
                                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                    except OSError as exc:
                        raise SandboxError(f"the sandbox cannot start {command[0]}: {exc.strerror}") from None
                    os.close(report_write)
                    report_write = -1
                    with self._lock:
                        self._running.add(process)
                    try:
                        timed_out = _feed_and_wait(process, program, limits.timeout)
                    finally:
                        with self._lock:
                            self._running.discard(process)
                report_lines = _read_all(report).decode("utf-8", "replace").split()
            finally:
                os.close(report)
                if report_write >= 0:
                    os.close(report_write)
            stderr = (scratch / "err").read_bytes()[-8192:].decode("utf-8", "replace")
        seconds = time.perf_counter() - started
        if timed_out:
            return Verdict(False, "timed out", f"no result within {limits.timeout:g} s", seconds)
        if not report_lines or report_lines[0] != "ready":
            raise SandboxError(f"the sandbox did not start (exit {process.returncode}): {stderr.strip()[-2000:]}")
        return _verdict(" ".join(report_lines[1:]), stderr, seconds)


    def stop(self) -> None:
        """Kill every program of this sandbox that is running now (their verdicts are then meaningless)."""
        with self._lock:
            running = list(self._running)
        for process in running:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _feed_and_wait(process: subprocess.Popen, program: str, timeout: float) -> bool:
    """Send the program, wait for the sandbox to end; on timeout kill its whole process group. True if timed out."""
    try:
        process.stdin.write(program.encode("utf-8", "surrogatepass"))
        process.stdin.close()
    except BrokenPipeError:
        pass
    try:
        process.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything left in the group (there should be nothing)
        except ProcessLookupError:
            pass
        process.wait()


def _read_all(fd: int) -> bytes:
    """What is in the pipe now, without waiting for writers that may still hold it."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _verdict(outcome: str, stderr: str, seconds: float) -> Verdict:
    if outcome == "passed":
        return Verdict(True, "passed", "", seconds)
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if outcome == "raised":
        status = "out of memory" if last.startswith("MemoryError") else "failed"
        return Verdict(False, status, last, seconds)
    if outcome.startswith("signal"):
        number = int(outcome.split()[1])
        what = SIGNALS.get(number, f"killed by signal {number}")
        return Verdict(False, what if number != signal.SIGKILL else "killed", f"{what} (signal {number})", seconds)
    if outcome.startswith("parent-killed"):
        return Verdict(False, "failed", f"the program killed its parent process (signal {outcome.split()[1]})", seconds)
    if outcome.startswith("exited"):
        return Verdict(False, "failed", f"the program exited (status {outcome.split()[1]}) before its end", seconds)
    return Verdict(False, "failed", f"the sandbox reported nothing after starting: {last}", seconds)


def run_all(sandbox: Sandbox, programs: list[str], workers: int | None = None, progress: bool = True,
            desc: str = "execute", on_verdict: Callable[[int, Verdict], None] | None = None) -> list[Verdict]:
    """Verdicts for the programs, in order; at most `workers` (default: the cores) run at once. on_verdict(i, verdict)
    is called in order as soon as each is known (to save results as they come)."""
    workers = max(1, min(workers or os.cpu_count() or 1, os.cpu_count() or 1, len(programs) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(programs), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        def one(program: str) -> Verdict:
            verdict = sandbox.run(program)
            bar.update(1)
            return verdict

        verdicts = []
        try:
            for verdict in pool.map(one, programs):
                if on_verdict is not None:
                    on_verdict(len(verdicts), verdict)
                verdicts.append(verdict)
        except BaseException:  # interrupted: stop now, not after the programs still queued or running
            pool.shutdown(wait=False, cancel_futures=True)
            sandbox.stop()
            raise
        return verdicts
