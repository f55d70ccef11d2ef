"""Start `radixserve serve` (five processes) on free loopback ports for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc

from radixserve.common.grpc_security import TOKEN_ENV, SyncTokenInterceptor
from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc

# The inter-service token the test stacks run with, so that tests can call the services directly.
STACK_GRPC_TOKEN = f"test-stack-{secrets.token_hex(8)}"

MODEL = (
    "SmolLM2-135M-Instruct"  # what start_stack serves without --model-path (the embedded SmolLM2)
)
FIXED_PROMPT = "The three most important inventions of the nineteenth century were"
# The default_stack fixture's (tests/conftest.py): the default settings, a KV pool far below the
# default's (several GiB at SmolLM2's size) that no test of it fills.
DEFAULT_STACK_FLAGS = ("--max-total-tokens", "20000")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Stack:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    scheduler_addr: str
    log_path: str
    grpc_token: str | None = (
        None  # the services' inter-service token (None: one the launcher made up)
    )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def grpc_channel(self, addr: str) -> grpc.Channel:
        """A blocking channel to one of the stack's services that carries its inter-service token."""
        channel = grpc.insecure_channel(addr)
        return (
            channel
            if self.grpc_token is None
            else grpc.intercept_channel(channel, SyncTokenInterceptor(self.grpc_token))
        )

    def log_tail(self, n: int = 60) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


READY_LINE = "radixserve ready: "  # what the launcher prints once /health answered 200


def start_stack(
    *extra: str,
    log_path: str,
    timeout: float = 600,
    command: tuple[str, ...] = ("radixserve.cli", "serve"),
    grpc_token: str | None = STACK_GRPC_TOKEN,
) -> Stack:
    """command: the module (and subcommand) run with `python -m`, e.g. ("radixserve.launch_server",).
    grpc_token: the services' inter-service token, given in the environment; None: none given (the
    launcher makes one up, which the test does not know)."""
    http, grpc_port, tok, sch, exe, detok = free_ports(6)
    cmd = [
        sys.executable,
        "-m",
        *command,
        "--port",
        str(http),
        "--gateway-grpc-port",
        str(grpc_port),
        "--tokenizer-addr",
        f"127.0.0.1:{tok}",
        "--scheduler-addr",
        f"127.0.0.1:{sch}",
        "--executor-addr",
        f"127.0.0.1:{exe}",
        "--detokenizer-addr",
        f"127.0.0.1:{detok}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if grpc_token is not None:
        env[TOKEN_ENV] = grpc_token
    log = open(log_path, "w")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    stack = Stack(proc, http, grpc_port, f"127.0.0.1:{sch}", log_path, grpc_token)
    deadline = time.time() + timeout
    # Ready when the launcher says so: from then on its own readiness probes (/health, a generation)
    # no longer share the scheduler with the test's requests.
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"radixserve serve exited ({proc.returncode}):\n{stack.log_tail()}")
        if READY_LINE in pathlib.Path(log_path).read_text(errors="replace"):
            return stack
        time.sleep(0.5)
    stop_stack(stack)
    raise RuntimeError(f"stack not healthy after {timeout}s:\n{stack.log_tail()}")


@contextlib.contextmanager
def running_stack(log_dir, *flags: str):
    """A started stack for a test module; on exit it must stop cleanly (exit code 0)."""
    stack = start_stack(*flags, log_path=str(log_dir / "serve.log"))
    try:
        yield stack
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()


def openai_client(stack: Stack):
    import openai

    return openai.OpenAI(
        base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def stop_stack(stack: Stack) -> None:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()


def scheduler_info(stack) -> scheduler_pb2.SchedulerInfo:
    with stack.grpc_channel(stack.scheduler_addr) as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetInfo(
            scheduler_pb2.SchedulerInfoRequest(), timeout=10
        )


def wait_idle_and_check_no_leak(stack, timeout=30.0) -> scheduler_pb2.SchedulerInfo:
    """Idle, every slot free or cached. An abort frees its KV only once the in-flight step that
    writes those slots has come back (overlap scheduling), so the release may trail the abort."""
    deadline = time.time() + timeout
    while True:
        info = scheduler_info(stack)
        settled = (
            info.running_requests == 0 and info.waiting_requests == 0 and info.in_use_tokens == 0
        )
        if settled or time.time() > deadline:
            break
        time.sleep(0.2)
    assert info.running_requests == 0 and info.waiting_requests == 0, info
    assert info.in_use_tokens == 0, info
    assert info.free_tokens + info.cached_tokens == info.max_total_tokens, info
    return info
