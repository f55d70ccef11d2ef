"""The child processes of `radixserve serve`: started, restarted with backoff when they die, stopped
in order.

A child that exits is started again with the same command after a backoff. A quick crash (the
child ran less than RestartPolicy.stable_after_s) doubles the next backoff; after
max_quick_crashes quick crashes in a row the supervisor gives up. Only the child that died is
restarted. Each child runs in its own process group, so a terminal's Ctrl-C reaches only the
launcher (which then stops the children in order), and gets SIGTERM if the launcher dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger("radixserve.launcher")


def _child_setup() -> None:
    """In the child before exec: its own process group; SIGTERM when the launcher dies, even by SIGKILL."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class ProcessSpec:
    name: str
    command: list[str]
    env: dict[str, str] | None = None  # None: the launcher's

    def spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(self.command, env=self.env, preexec_fn=_child_setup)
        log.info("started %s (pid %d)", self.name, proc.pid)
        return proc


@dataclass
class RestartPolicy:
    backoff_s: float = 0.5  # before restarting a child; doubled by each quick crash in a row
    max_backoff_s: float = 10.0
    stable_after_s: float = 60.0  # a child that ran this long before exiting did not crash quickly
    max_quick_crashes: int = 5  # quick crashes in a row of one child before giving up

    def backoff(self, quick_crashes: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, quick_crashes - 1))


@dataclass
class _Life:
    started_at: float
    quick_crashes: int = 0
    restart_at: float | None = None  # set while the child is dead and waits for its restart


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class Supervisor:
    def __init__(
        self,
        specs: list[ProcessSpec],
        procs: dict[str, subprocess.Popen],
        policy: RestartPolicy | None = None,
    ):
        self.specs = {spec.name: spec for spec in specs}
        self.procs = procs
        self.policy = policy or RestartPolicy()
        now = time.monotonic()
        self._lives = {name: _Life(now) for name in procs}
        self.restarts = 0

    def first_failed_start(self) -> str | None:
        """While the server comes up: how the first child that exited on its own (an exit code, e.g. a
        bad flag or model) did, or None. A child killed by a signal (OOM killer, an operator, a crash)
        is left to check(), which restarts it as it would once the server is ready."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and code >= 0:
                return f"{name} exited with {describe_exit(code)}"
        return None

    def check(self) -> str | None:
        """Schedule the restart of the children that exited and restart those whose backoff passed;
        why the supervisor gives up, or None."""
        now = time.monotonic()
        for name, proc in self.procs.items():
            life = self._lives[name]
            if life.restart_at is not None:
                if now >= life.restart_at:
                    self.procs[name] = self.specs[name].spawn()
                    life.started_at, life.restart_at = now, None
                    self.restarts += 1
                continue
            code = proc.poll()
            if code is None:
                continue
            ran = now - life.started_at
            life.quick_crashes = life.quick_crashes + 1 if ran < self.policy.stable_after_s else 0
            if life.quick_crashes >= self.policy.max_quick_crashes:
                return (
                    f"{name} exited with {describe_exit(code)}, {life.quick_crashes} times in a row within "
                    f"{self.policy.stable_after_s:g}s of starting; giving up"
                )
            delay = self.policy.backoff(life.quick_crashes)
            log.error(
                "%s (pid %d) exited with %s after %.1fs; restarting it in %.1fs",
                name,
                proc.pid,
                describe_exit(code),
                ran,
                delay,
            )
            life.restart_at = now + delay
        return None

    def stop(
        self, first: str | None = None, first_timeout: float = 10.0, timeout: float = 10.0
    ) -> None:
        """Stop `first` (waiting up to first_timeout for it), then all the others."""
        if first in self.procs:
            stop_processes({first: self.procs[first]}, first_timeout)
        stop_processes({n: p for n, p in reversed(self.procs.items()) if n != first}, timeout)


def stop_processes(procs: dict[str, subprocess.Popen], timeout: float) -> None:
    """SIGTERM each, then SIGKILL those still running after timeout seconds."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %gs; killing it", name, proc.pid, timeout)
            proc.kill()
            proc.wait()
