"""The executor's step watchdog (--watchdog-timeout).

A step that never returns (a deadlocked kernel or collective, a stuck device) would hold every request
forever. A watchdog thread checks how long the job on the torch worker has been running; past the
timeout it logs, dumps every thread's stack with faulthandler (the stuck one runs on the worker
thread named in the log) and calls on_hang, by default an exit with WATCHDOG_EXIT_CODE: the launcher
restarts the executor and the scheduler, its step failed, re-runs the queued requests on the new one.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("radixserve.executor.watchdog")

WATCHDOG_EXIT_CODE = 70  # EX_SOFTWARE
MAX_POLL_S = 1.0
T = TypeVar("T")


def exit_hung(message: str) -> None:
    """The default on_hang: flush the logs and leave at once (a hung worker cannot be joined)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_CODE)


class StepWatchdog:
    def __init__(self, timeout_s: float, on_hang: Callable[[str], None] = exit_hung):
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self._lock = threading.Lock()
        # The watched jobs by thread (the torch worker, the step collector): (what, start time, thread name).
        self._jobs: dict[int, tuple[str, float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StepWatchdog":
        self._thread = threading.Thread(target=self._watch, name="executor-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the calling thread, watched."""
        job = (getattr(fn, "__name__", "job"), time.monotonic(), threading.current_thread().name)
        thread = threading.get_ident()
        with self._lock:
            self._jobs[thread] = job
        try:
            return fn(*args)
        finally:
            with self._lock:
                del self._jobs[thread]

    def _watch(self) -> None:
        reported = None
        while not self._stop.wait(min(MAX_POLL_S, self.timeout_s / 4)):
            with self._lock:
                job = min(self._jobs.values(), key=lambda j: j[1], default=None)  # the oldest
            if job is None or job is reported:
                continue
            what, started, thread = job
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                reported = job
                message = (
                    f"{what} on thread {thread} has run {elapsed:.1f}s, over --watchdog-timeout "
                    f"{self.timeout_s:g}s: the executor is hung"
                )
                log.error("%s; stacks of all threads follow, then the process exits", message)
                _dump_stacks()
                self.on_hang(message)


def _dump_stacks() -> None:
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (
        AttributeError,
        OSError,
        ValueError,
    ):  # stderr replaced by an object without a file descriptor
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
