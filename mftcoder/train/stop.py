"""Stopping on a signal: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) end a run the same way.

Outside the training loop either signal raises `Interrupted` at once (the data and model set-up clean up after
themselves). Inside it, the first signal lets the optimizer step finish, the ranks agree on the step to stop after,
a checkpoint is saved and the run ends; a second signal stops at once (the last checkpoint stays as it was).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; `exit_status` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def in_forked_child(owner: int, signum: int) -> bool:
    """True in a process forked from `owner` that inherited its handler (a DataLoader worker): there SIGINT is left to
    the parent (it stops the run) and SIGTERM ends the process as by default (how its parent ends a worker)."""
    if os.getpid() == owner:
        return False
    if signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return True


def _raise_interrupted(owner: int):
    def handler(signum: int, frame) -> None:
        if not in_forked_child(owner, signum):
            raise Interrupted(signum)

    return handler


@contextlib.contextmanager
def raise_on_signals():
    """While inside: SIGTERM, like SIGINT, raises in the main thread, so `finally` blocks and `with` exits run."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        handler = _raise_interrupted(os.getpid())
        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


REPEAT_AFTER = 1.0  # seconds: a signal this soon after the first is the same stop (Ctrl-C under torchrun arrives twice)


class StopAtStepEnd:
    """While the loop runs: the first signal is recorded (the step finishes), a second one at least REPEAT_AFTER
    seconds later raises `Interrupted`."""

    def __init__(self, say=None):
        self.signum: int | None = None
        self._first = 0.0
        self._say = say  # None: silent (the processes other than the main one)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopAtStepEnd":
        self._owner = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame) -> None:
        if in_forked_child(self._owner, signum):
            return
        if self.signum is not None:
            if time.monotonic() - self._first < REPEAT_AFTER:  # the terminal's and torchrun's copy of one Ctrl-C
                return
            raise Interrupted(signum)
        self.signum, self._first = signum, time.monotonic()
        if self._say:
            self._say(f"{signal.Signals(signum).name}: stopping after this optimizer step and saving a checkpoint "
                      "(send it again to stop at once)")

    def agreed(self, all_reduce_max) -> int:
        """The signal any rank received (0: none): every rank stops after the same step."""
        return int(all_reduce_max(float(self.signum or 0)))
