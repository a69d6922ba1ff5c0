"""An ordered map over worker processes that always ends them: no threads, one job in flight per worker.

multiprocessing.Pool feeds its workers from a thread; interrupted while that thread is blocked on a full pipe,
Pool.terminate() waits for it forever (seen: SIGTERM during tokenization hung `data check`). Here the caller's own
thread sends each job and reads each result, so an interruption just kills and reaps the workers.
"""

from __future__ import annotations

import collections
import multiprocessing
import signal
from typing import Callable, Iterable, Iterator


class WorkerFailed(RuntimeError):
    """A worker process died, or what it produced could not be sent back."""


def _serve(function: Callable, connection, setup: Callable | None) -> None:
    """In a worker: run jobs until the connection closes. Signals are the parent's to handle (it ends the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if setup is not None:
        setup()
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        try:
            result = (True, function(job))
        except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
            result = (False, exc)
        try:
            connection.send(result)
        except Exception as exc:  # noqa: BLE001 - an exception (or result) that cannot be pickled
            connection.send((False, WorkerFailed(f"a worker's result could not be sent back: {exc}")))


def ordered_map(function: Callable, jobs: Iterable, workers: int, setup: Callable | None = None) -> Iterator:
    """function(job) for each job, in the jobs' order, computed in `workers` processes (forked where possible);
    `setup` runs once in each. However the caller stops iterating, the workers are killed and reaped."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    processes, connections = [], []
    try:
        for _ in range(workers):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(function, theirs, setup), daemon=True)
            process.start()
            theirs.close()
            processes.append(process)
            connections.append(mine)
        pending = iter(jobs)
        in_flight: collections.deque[int] = collections.deque()  # worker of each job sent, oldest first
        for worker in range(workers):
            if _send_next(pending, connections[worker]):
                in_flight.append(worker)
        while in_flight:
            worker = in_flight.popleft()
            try:
                ok, result = connections[worker].recv()
            except EOFError:
                processes[worker].join()
                raise WorkerFailed(f"a worker process ended (exit code {processes[worker].exitcode})") from None
            if not ok:
                raise result
            if _send_next(pending, connections[worker]):  # the next job goes out before this result is used
                in_flight.append(worker)
            yield result
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.join()
        for connection in connections:
            connection.close()


def _send_next(pending: Iterator, connection) -> bool:
    for job in pending:
        connection.send(job)
        return True
    return False
