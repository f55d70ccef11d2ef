"""The launcher's supervision of its children, on stand-in processes: restart with backoff, giving up
after quick crashes in a row, stopping the gateway first, replica processes."""

from __future__ import annotations

import os
import signal
import sys
import time

from radixserve.common.args import ServerArgs
from radixserve.launcher import service_specs
from radixserve.supervisor import ProcessSpec, RestartPolicy, Supervisor

FAST = RestartPolicy(backoff_s=0.1, max_backoff_s=1.0, stable_after_s=60.0, max_quick_crashes=3)


def sleeper(name: str, log_path=None, term_delay: float = 0.0) -> ProcessSpec:
    """A child that runs until SIGTERM; then it logs `<name> term`, waits term_delay, logs `<name> exit`.
    It logs `<name> ready` once its SIGTERM handler is installed."""
    script = f"""
import signal, sys, time
def log(what):
    if {str(log_path)!r} != 'None':
        with open({str(log_path)!r}, 'a') as f:
            f.write(f'{name} {{what}}\\n')
def on_term(*_):
    log('term')
    time.sleep({term_delay})
    log('exit')
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
log('ready')
while True:
    time.sleep(0.05)
"""
    return ProcessSpec(name, [sys.executable, "-c", script])


def start(specs, policy=FAST) -> Supervisor:
    return Supervisor(specs, {spec.name: spec.spawn() for spec in specs}, policy)


def check_until(supervisor: Supervisor, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        why = supervisor.check()
        if why is not None or predicate():
            return why
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_dead_child_is_restarted_alone_with_the_same_command():
    supervisor = start([sleeper("executor"), sleeper("gateway")])
    try:
        executor, gateway = supervisor.procs["executor"], supervisor.procs["gateway"]
        executor.kill()
        assert check_until(supervisor, lambda: supervisor.procs["executor"] is not executor) is None
        restarted = supervisor.procs["executor"]
        assert restarted.args == executor.args and restarted.poll() is None
        assert supervisor.procs["gateway"] is gateway and gateway.poll() is None
        assert supervisor.restarts == 1
    finally:
        supervisor.stop()
    assert all(proc.poll() is not None for proc in supervisor.procs.values())


def test_before_ready_an_exit_code_stops_the_launch_but_a_killed_child_is_restarted():
    failing = ProcessSpec("tokenizer", [sys.executable, "-c", "import sys; sys.exit(2)"])
    supervisor = start([sleeper("executor"), failing])
    try:
        deadline = time.monotonic() + 10
        while (why := supervisor.first_failed_start()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert why == "tokenizer exited with code 2"  # a bad flag or model: stop, do not retry
    finally:
        supervisor.stop()

    supervisor = start([sleeper("executor"), sleeper("gateway")])
    try:
        executor = supervisor.procs["executor"]
        executor.kill()  # e.g. the OOM killer, or an operator, while the server comes up
        executor.wait(10)
        assert supervisor.first_failed_start() is None
        assert check_until(supervisor, lambda: supervisor.procs["executor"] is not executor) is None
        assert supervisor.procs["executor"].poll() is None
    finally:
        supervisor.stop()


def test_quick_crashes_in_a_row_make_it_give_up_with_growing_backoff():
    crasher = ProcessSpec("scheduler", [sys.executable, "-c", "raise SystemExit(3)"])
    supervisor = start([crasher, sleeper("gateway")])
    started = time.monotonic()
    try:
        why = check_until(supervisor, lambda: False)
    finally:
        supervisor.stop()
    assert "scheduler exited with code 3, 3 times in a row" in why and "giving up" in why
    assert supervisor.restarts == 2
    assert time.monotonic() - started >= FAST.backoff(1) + FAST.backoff(2)
    assert FAST.backoff(1) < FAST.backoff(2) < FAST.backoff(3)


def test_stop_drains_the_gateway_before_stopping_the_others(tmp_path):
    log = tmp_path / "events"
    supervisor = start(
        [
            sleeper("executor", log),
            sleeper("scheduler", log),
            sleeper("gateway", log, term_delay=0.5),
        ]
    )
    deadline = (
        time.monotonic() + 30
    )  # until the children installed their SIGTERM handlers (slow under load)
    while time.monotonic() < deadline and (
        not log.exists() or log.read_text().count(" ready\n") < 3
    ):
        time.sleep(0.02)
    supervisor.stop("gateway", first_timeout=5, timeout=5)
    events = [e for e in log.read_text().split("\n")[:-1] if not e.endswith(" ready")]
    assert events[:2] == ["gateway term", "gateway exit"]
    assert sorted(events[2:]) == [
        "executor exit",
        "executor term",
        "scheduler exit",
        "scheduler term",
    ]
    assert all(proc.returncode == 0 for proc in supervisor.procs.values())


def test_a_child_that_ignores_sigterm_is_killed():
    stubborn = ProcessSpec(
        "executor",
        [
            sys.executable,
            "-c",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(60)",
        ],
    )
    supervisor = start([stubborn])
    time.sleep(0.5)
    started = time.monotonic()
    supervisor.stop(timeout=0.5)
    assert supervisor.procs["executor"].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_replica_lists_start_one_process_per_address():
    args = ServerArgs(
        tokenizer_addr="127.0.0.1:7001,127.0.0.1:7002", detokenizer_addr="127.0.0.1:7003"
    )
    specs = {spec.name: spec.command for spec in service_specs(args)}
    assert list(specs) == [
        "executor",
        "scheduler",
        "tokenizer",
        "tokenizer-2",
        "detokenizer",
        "gateway",
    ]

    def flag(command, name):
        return command[command.index(name) + 1]

    assert flag(specs["tokenizer"], "--tokenizer-addr") == "127.0.0.1:7001"
    assert flag(specs["tokenizer-2"], "--tokenizer-addr") == "127.0.0.1:7002"
    assert flag(specs["gateway"], "--tokenizer-addr") == "127.0.0.1:7001,127.0.0.1:7002"
    assert specs["tokenizer"][specs["tokenizer"].index("radixserve.cli") + 1] == "tokenizer"
    assert "tokenizer" not in {s.name for s in service_specs(ServerArgs(skip_tokenizer_init=True))}


def test_data_parallel_replicas_start_a_scheduler_and_an_executor_each():
    args = ServerArgs(
        dp_size=2, tp_size=2, scheduler_addr="127.0.0.1:7012", executor_addr="127.0.0.1:7013,h:9"
    )
    specs = {spec.name: spec.command for spec in service_specs(args)}
    assert list(specs) == [
        "executor",
        "executor-dp1",
        "scheduler",
        "scheduler-dp1",
        "tokenizer",
        "detokenizer",
        "gateway",
    ]

    def flags(command, *names):
        return [command[command.index(name) + 1] if name in command else None for name in names]

    own = ("--scheduler-addr", "--executor-addr", "--base-gpu-id", "--dp-rank")
    assert (
        flags(specs["scheduler"], *own)
        == flags(specs["executor"], *own)
        == ["127.0.0.1:7012", "127.0.0.1:7013", "0", "0"]
    )
    assert (
        flags(specs["scheduler-dp1"], *own)
        == flags(specs["executor-dp1"], *own)
        == ["127.0.0.1:7112", "h:9", "2", "1"]
    )
    assert flags(specs["gateway"], *own) == ["127.0.0.1:7012", "127.0.0.1:7013,h:9", "0", None]


def test_children_run_in_their_own_process_group():
    supervisor = start([sleeper("executor")])
    try:
        pid = supervisor.procs["executor"].pid
        assert os.getpgid(pid) == pid != os.getpgid(0)
    finally:
        supervisor.stop()
