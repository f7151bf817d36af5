"""Device jobs in worker processes: one fresh process per job, forked from a preloaded forkserver.

Why not ProcessPoolExecutor: one killed worker breaks the whole executor (every job of the round is lost, not
just the killed one), and a `kill -9` of the server left the forkserver, the resource tracker and a worker alive.
Here each job has its own process and result pipe, so a job that raises or dies fails alone; and each job process
exits as soon as the server is gone (it watches `multiprocessing.parent_process()`, whose sentinel closes when the
server dies), after which the forkserver and the resource tracker exit by themselves (their pipes close).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import forkserver, resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any


@dataclass
class JobFailed:
    """A job whose process raised or died: the reason, one line."""

    reason: str


class DevicePool:
    """Runs fn(*job) for each job in a fresh process, at most `workers` at a time.

    A fresh process per job: a device's measured peak memory must be its own job's, not what the allocator kept
    from earlier jobs. Each forks from the forkserver (never from the server), so the server's memory is not in
    the job's RSS, and what `preload` imports (numpy, ONNX Runtime) is already there. The forkserver is
    multiprocessing's one per server process: `preload` counts only if it is not running yet.
    """

    def __init__(self, workers: int, preload: list[str] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._ctx = multiprocessing.get_context("forkserver")
        if preload:
            self._ctx.set_forkserver_preload(preload)
        # The forkserver starts with SIGINT blocked, so every job inherits the mask from its first instruction: a
        # Ctrl-C (sent to the whole process group) cannot interrupt a job, and print a traceback, before _run_job
        # ignores it (the resource tracker guards its own start the same way, bpo-33613). The tracker is started
        # first because starting it unblocks SIGINT.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
        """fn(*job) for every job, results in job order; fn and its results must be picklable.

        A job that raises gives JobFailed('<Type>: <first line of the message>'); a process that ends without a
        result gives JobFailed naming the signal or exit code. The other jobs are unaffected. No job process
        outlives the call: if it is left by an exception (Ctrl-C), the running ones are killed and reaped.
        """
        results: list[Any] = [None] * len(jobs)
        todo = list(enumerate(jobs))[::-1]
        running: list[_Running] = []
        try:
            while todo or running:
                while todo and len(running) < self.workers:
                    index, job = todo.pop()
                    running.append(self._start(index, fn, job))
                ready = set(wait([r.process.sentinel for r in running] + [r.reader for r in running if r.reader]))
                for r in list(running):
                    if r.reader is not None and r.reader in ready:
                        r.receive()  # now, not after the exit: a large result would block the job's send
                    if r.process.sentinel in ready:
                        running.remove(r)
                        results[r.index] = r.finish()
        finally:
            for r in running:
                r.process.kill()
            for r in running:
                r.finish()
        return results

    def _start(self, index: int, fn: Callable[..., Any], job: tuple) -> _Running:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_run_job, args=(writer, fn, job), name=f"progfl-job-{index}")
        process.start()
        writer.close()  # only the job holds the write end: its death is EOF here
        return _Running(index, process, reader)


_NO_RESULT = object()


@dataclass
class _Running:
    """A started job: its process and the read end of its result pipe (None once read)."""

    index: int
    process: BaseProcess
    reader: Connection | None
    result: Any = _NO_RESULT

    def receive(self) -> None:
        try:
            self.result = pickle.loads(self.reader.recv_bytes())
        except EOFError:  # the process ended (or was killed) before sending its result
            pass
        finally:
            self.reader.close()
            self.reader = None

    def finish(self) -> Any:
        """Reap the ended process; its result or why there is none."""
        self.process.join()
        if self.reader is not None and self.reader.poll():  # sent just before it exited
            self.receive()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        code = self.process.exitcode
        self.process.close()
        if self.result is not _NO_RESULT:
            return self.result
        if code is not None and code < 0:
            return JobFailed(f"device process died (signal {-code})")
        return JobFailed(f"device process exited with code {code} without a result")


# ---- job side ----
def _run_job(writer: Connection, fn: Callable[..., Any], job: tuple) -> None:
    # The server handles Ctrl-C (and kills its jobs); a job must not print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_with_server, name="progfl-server-watch", daemon=True).start()
    try:
        result = fn(*job)
    except Exception as e:  # noqa: BLE001  (any error of the job is its result)
        result = JobFailed(_one_line(e))
    try:
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001
        payload = pickle.dumps(JobFailed(f"the result cannot be pickled: {_one_line(e)}"))
    writer.send_bytes(payload)


def _exit_with_server() -> None:
    """Exit when the server is gone, even after its `kill -9`.

    The job's parent is the forkserver, not the server, so PR_SET_PDEATHSIG cannot see the server die. The
    parent sentinel can: it is the job's end of the pipe it was started over, whose other end the server holds
    until it closes the Process, or dies. Needs the GIL: a C call that holds it delays the exit until it returns.
    """
    multiprocessing.parent_process().join()
    os._exit(1)


def _one_line(e: BaseException) -> str:
    message = str(e).splitlines()
    return f"{type(e).__name__}: {message[0]}" if message else type(e).__name__
