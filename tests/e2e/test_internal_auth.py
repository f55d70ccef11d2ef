"""Calls between the services are authenticated by default, and only the scheduler drives its executor.

- `radixserve serve` with default flags makes up an inter-service token and hands it to the services in
  their environment: a direct Executor.Step, Scheduler.Generate or Scheduler.Abort(abort_all) without it
  is UNAUTHENTICATED, and the token is on no command line; the healthcheck works given it;
- a service started alone on a non-loopback address without a token (or mutual TLS) refuses to start
  unless --insecure-internal;
- with the token but outside the scheduler's step session, Executor.Step (even with a rogue low step_id),
  Reset and OpenSession are refused at once: no KV written, no step held back (the next real request
  answers as before, as fast); the session frees when its scheduler dies, for the restarted one;
- keepalive: an idle stream stays open and checked by pings past the server's ping limit;
- reconnects: the scheduler reaches an executor that comes up late within about a second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from radixserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from radixserve.common import grpc_util
from radixserve.common.args import FlagError, ServerArgs
from radixserve.common.grpc_security import (
    TOKEN_ENV,
    SyncTokenInterceptor,
    TokenServerInterceptor,
    check_internal_security,
    install_from_args,
)
from radixserve.common.step_session import BlockingExecutorSession, ExecutorSession, SessionRefused
from radixserve.common.ordered_stream import OrderedExchange
from radixserve.gateway.pipeline.scheduler_session import SchedulerSession
from tests.fake_executor import FakeExecutorServicer, reference_tokens
from radixserve.scheduler.server import start_scheduler
from tests.stack import free_ports, stop_stack
from tests.tiny_stack import MODEL, alive, service_pids, start_tiny_stack

VOCAB = 1000
TOKEN = "internal-auth-test-token"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def serve_fake_executor(port: int = 0, executor: FakeExecutorServicer | None = None):
    server = grpc_util.aio_server()
    executor = executor or FakeExecutorServicer(kv_slots=1025, vocab_size=VOCAB)
    executor_pb2_grpc.add_ExecutorServicer_to_server(executor, server)
    port = grpc_util.bind(server, f"127.0.0.1:{port}")
    await server.start()
    return server, port, executor


def gen_request(
    rid: str, prompt: list[int], max_new: int
) -> scheduler_pb2.SchedulerGenerateRequest:
    return scheduler_pb2.SchedulerGenerateRequest(
        request_id=rid,
        input_ids=prompt,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
    )


async def generate(stub, request) -> list[int]:
    return [t async for msg in stub.Generate(request, timeout=30) for t in msg.token_ids]


def channel_with(token: str | None, addr: str) -> grpc.Channel:
    channel = grpc.insecure_channel(addr)
    return (
        channel if token is None else grpc.intercept_channel(channel, SyncTokenInterceptor(token))
    )


def rpc_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# ---- `radixserve serve` with default flags ----

PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 14  # ~200 tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # No token given (the test process's own is left out too): the launcher makes one up. A small pool,
    # so that the rogue step below covers every KV slot.
    s = start_tiny_stack(
        tmp_path_factory.mktemp("internal_auth"), "--max-total-tokens", "4000", grpc_token=None
    )
    yield s
    stop_stack(s)
    assert s.proc.returncode == 0, s.log_tail()


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def environ(pid: int) -> dict[str, str]:
    pairs = (
        e.decode().split("=", 1)
        for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in e
    )
    return dict(pairs)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def services_token(stack) -> str:
    """The token the launcher made up, as the children see it (same user: /proc/PID/environ)."""
    return environ(service_pids(stack.proc.pid)["scheduler"])[TOKEN_ENV]


def executor_addr(stack) -> str:
    return flag(cmdline(service_pids(stack.proc.pid)["executor"]), "--executor-addr")


def complete(stack, max_tokens: int = 12) -> tuple[dict, float]:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.monotonic()
    resp = httpx.post(stack.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json(), time.monotonic() - started


def test_serve_makes_up_a_token_and_refuses_calls_without_it(stack):
    pids = service_pids(stack.proc.pid)
    assert {"executor", "scheduler", "tokenizer", "detokenizer", "gateway"} <= set(pids)
    token = services_token(stack)
    assert len(token) >= 32 and TOKEN_ENV not in environ(stack.proc.pid)  # made up by the launcher
    for name, pid in pids.items():
        assert environ(pid)[TOKEN_ENV] == token, (
            name
        )  # every service got the same one, in its environment
        assert not any(token in arg for arg in cmdline(pid)), name  # ... and on no command line
    assert not any(token in arg for arg in cmdline(stack.proc.pid))

    step = executor_pb2.ExecutorStepRequest(
        step_id=1,
        new_requests=[
            executor_pb2.ExecutorNewRequest(
                request_id="intruder", input_ids=[7] * 8, new_slots=list(range(1, 9)), sample=True
            )
        ],
    )
    with channel_with(None, executor_addr(stack)) as channel:
        executor = executor_pb2_grpc.ExecutorStub(channel)
        assert rpc_code(lambda: executor.Step(step, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            rpc_code(lambda: executor.Reset(executor_pb2.ExecutorResetRequest(), timeout=10))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    with channel_with(None, stack.scheduler_addr) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        assert (
            rpc_code(
                lambda: list(scheduler.Generate(gen_request("intruder", [1, 2, 3], 4), timeout=10))
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            rpc_code(
                lambda: scheduler.Abort(
                    scheduler_pb2.SchedulerAbortRequest(abort_all=True), timeout=10
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
    with channel_with(token, stack.scheduler_addr) as channel:  # whoever is given the token gets in
        info = scheduler_pb2_grpc.SchedulerStub(channel).GetInfo(
            scheduler_pb2.SchedulerInfoRequest(), timeout=10
        )
        assert info.architecture == "LlamaForCausalLM"


def test_the_healthcheck_works_given_the_token(stack):
    def healthcheck(service: str, addr: str, token: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if token is not None:
            env[TOKEN_ENV] = token
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "radixserve.cli",
                "healthcheck",
                service,
                "--addr",
                addr,
                "--timeout",
                "10",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    token = services_token(stack)
    for service, addr in (("scheduler", stack.scheduler_addr), ("executor", executor_addr(stack))):
        ok = healthcheck(service, addr, token)
        assert ok.returncode == 0 and "healthy" in ok.stdout, (service, ok.stdout, ok.stderr)
    denied = healthcheck("scheduler", stack.scheduler_addr, None)
    assert (
        denied.returncode == 1
        and "UNAUTHENTICATED" in denied.stderr
        and "--grpc-auth-token" in denied.stderr
    )


def test_a_step_outside_the_schedulers_session_is_refused_and_changes_nothing(stack):
    complete(stack)  # the prompt's KV into the prefix cache
    before, before_s = complete(stack)
    assert (
        before["usage"]["prompt_tokens"] > 150
        and before["usage"]["prompt_tokens_details"]["cached_tokens"] > 150
    )

    # With the token, as the attacker in issue 17 did: a rogue low step_id and [7]*1000 into KV slots 1..4000.
    rogue = [
        executor_pb2.ExecutorStepRequest(
            step_id=0,
            new_requests=[
                executor_pb2.ExecutorNewRequest(
                    request_id=f"rogue-{i}",
                    input_ids=[7] * 1000,
                    new_slots=list(range(1 + 1000 * i, 1001 + 1000 * i)),
                    sample=True,
                )
            ],
        )
        for i in range(4)
    ]
    with channel_with(services_token(stack), executor_addr(stack)) as channel:
        executor = executor_pb2_grpc.ExecutorStub(channel)
        for session_id in ("", "0123456789abcdef0123456789abcdef"):  # none, and a guessed one
            for msg in rogue:
                msg.session_id = session_id
                started = time.monotonic()
                assert (
                    rpc_code(lambda: executor.Step(msg, timeout=30))
                    == grpc.StatusCode.FAILED_PRECONDITION
                )
                assert (
                    time.monotonic() - started < 2
                )  # refused at once, not after waiting for its turn
            reset = executor_pb2.ExecutorResetRequest(session_id=session_id)
            assert (
                rpc_code(lambda: executor.Reset(reset, timeout=10))
                == grpc.StatusCode.FAILED_PRECONDITION
            )
        # Nor can it take the session: the scheduler holds it.
        with pytest.raises(SessionRefused) as refused:
            BlockingExecutorSession(executor)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION

    after, after_s = complete(stack)
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    assert (
        after["usage"] == before["usage"]
    )  # cached_tokens included: the cache was neither hit by garbage nor lost
    assert after_s < before_s + 2.5, (
        before_s,
        after_s,
    )  # no step held back for the 5 s order timeout


def test_a_restarted_scheduler_takes_the_session_over(stack):
    """Its predecessor's session ends with its process: the new one opens one and serves."""
    before = service_pids(stack.proc.pid)
    reference, _ = complete(stack)
    os.kill(before["scheduler"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = service_pids(stack.proc.pid)
        if now.get("scheduler") not in (None, before["scheduler"]) and alive(now["scheduler"]):
            try:
                if httpx.get(stack.base_url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    else:
        raise AssertionError("the stack did not come back:\n" + stack.log_tail())
    again, _ = complete(stack)
    assert again["choices"][0]["text"] == reference["choices"][0]["text"]


# ---- a service started alone ----


def test_the_check_for_services_started_alone():
    loopback = ServerArgs()
    exposed = ServerArgs(
        scheduler_addr="0.0.0.0:30012",
        executor_addr="10.0.0.5:30013",
        tokenizer_addr=":30011",
        detokenizer_addr="[::]:30014",
        host="0.0.0.0",
    )
    for service in ("scheduler", "executor", "tokenizer", "detokenizer", "gateway"):
        check_internal_security(loopback, service)
        with pytest.raises(
            FlagError, match=f"{service} would listen on .*not loopback.*--insecure-internal"
        ):
            check_internal_security(exposed, service)
        for fine in (
            {"insecure_internal": True},
            {"grpc_auth_token": "t"},
            {"grpc_tls_cert": "c", "grpc_tls_key": "k", "grpc_tls_ca": "ca"},
        ):
            check_internal_security(ServerArgs(**{**vars(exposed), **fine}), service)
    # TLS without a CA authenticates the server only: anyone may still call it.
    with pytest.raises(FlagError):
        check_internal_security(
            ServerArgs(**{**vars(exposed), "grpc_tls_cert": "c", "grpc_tls_key": "k"}), "scheduler"
        )
    for host in ("127.0.0.1", "localhost", "[::1]", "127.0.0.2"):
        check_internal_security(ServerArgs(scheduler_addr=f"{host}:1"), "scheduler")
    # A tensor-parallel shard other than rank 0 serves no gRPC.
    check_internal_security(ServerArgs(executor_addr="0.0.0.0:1", tp_size=2, tp_rank=1), "executor")
    check_internal_security(
        ServerArgs(
            executor_addr="0.0.0.0:1", tp_size=2, nnodes=2, node_rank=1, dist_init_addr="h:1"
        ),
        "executor",
    )
    with pytest.raises(FlagError):
        check_internal_security(ServerArgs(executor_addr="0.0.0.0:1", tp_size=2), "executor")


class ExecutorThread:
    """A fake executor served from a thread of its own (for a scheduler process to connect to)."""

    def __init__(self, token: str | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(
            self._start(token), self.loop
        ).result(30)

    async def _start(self, token):
        server = grpc.aio.server(
            interceptors=[TokenServerInterceptor(token)] if token else None,
            options=grpc_util.server_options(),
        )
        executor_pb2_grpc.add_ExecutorServicer_to_server(
            FakeExecutorServicer(kv_slots=1025, vocab_size=VOCAB), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_scheduler_process(
    tmp_path: Path, port: int, executor_port: int, token: str | None, *flags: str
):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    log = tmp_path / f"scheduler-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "radixserve.cli",
                "scheduler",
                "--scheduler-addr",
                f"0.0.0.0:{port}",
                "--executor-addr",
                f"127.0.0.1:{executor_port}",
                *flags,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def wait_for_line(proc: subprocess.Popen, log: Path, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_a_scheduler_alone_on_every_interface_needs_a_token_or_insecure_internal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    port, executor_port = free_ports(2)
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "scheduler",
            "--scheduler-addr",
            f"0.0.0.0:{port}",
            "--executor-addr",
            f"127.0.0.1:{executor_port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert (
        "radixserve scheduler: error: scheduler would listen on 0.0.0.0 (not loopback)"
        in refused.stderr
    )
    assert "--grpc-auth-token" in refused.stderr and "--insecure-internal" in refused.stderr
    assert "Traceback" not in refused.stderr

    for token, flags in ((None, ("--insecure-internal",)), (TOKEN, ())):
        executor = ExecutorThread(token)
        proc, log = start_scheduler_process(tmp_path, port, executor.port, token, *flags)
        try:
            wait_for_line(proc, log, "scheduler ready on")
            with channel_with(None, f"127.0.0.1:{port}") as channel:
                get_info = scheduler_pb2_grpc.SchedulerStub(channel).GetInfo
                code = rpc_code(lambda: get_info(scheduler_pb2.SchedulerInfoRequest(), timeout=10))
            assert code == (
                grpc.StatusCode.OK if token is None else grpc.StatusCode.UNAUTHENTICATED
            )
        finally:
            proc.terminate()
            proc.wait(30)
            executor.stop()


# ---- the step session (in process, on the fake executor) ----


def test_only_the_schedulers_session_drives_the_executor(clean_grpc):
    async def body():
        server, exec_port, executor = await serve_fake_executor()
        args = ServerArgs(scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{exec_port}")
        scheduler = await start_scheduler(args)
        async with (
            grpc_util.aio_channel(f"127.0.0.1:{scheduler.port}") as sch_channel,
            grpc_util.aio_channel(f"127.0.0.1:{exec_port}") as exec_channel,
        ):
            stub = scheduler_pb2_grpc.SchedulerStub(sch_channel)
            intruder = executor_pb2_grpc.ExecutorStub(exec_channel)
            assert await generate(stub, gen_request("a", [5, 6, 7], 4)) == reference_tokens(
                [5, 6, 7], 4, VOCAB
            )
            # A rogue step (low step_id, slots the cache holds) and a reset, without the session or with a
            # guessed one, are refused before the step order sees them; the session cannot be taken.
            for session_id in ("", "not-the-session"):
                rogue = executor_pb2.ExecutorStepRequest(
                    step_id=0,
                    session_id=session_id,
                    new_requests=[
                        executor_pb2.ExecutorNewRequest(
                            request_id="rogue",
                            input_ids=[9, 9, 9],
                            new_slots=[1, 2, 3],
                            sample=True,
                        )
                    ],
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await intruder.Step(rogue, timeout=5)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                # The same on the step stream (Executor.Steps): the stream ends with Step's refusal.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    steps = OrderedExchange(lambda: grpc_util.open_bidi(intruder.Steps))
                    await steps.exchange(rogue, timeout=5)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await intruder.Reset(
                        executor_pb2.ExecutorResetRequest(session_id=session_id), timeout=5
                    )
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(SessionRefused) as refused:
                await ExecutorSession.open(intruder)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "rogue" not in executor.model.reqs
            started = asyncio.get_running_loop().time()
            # The cached prefix [5, 6, 7] is intact (the fake executor checks every prefix slot's KV).
            assert await generate(stub, gen_request("b", [5, 6, 7, 8], 4)) == reference_tokens(
                [5, 6, 7, 8], 4, VOCAB
            )
            assert (
                asyncio.get_running_loop().time() - started < 2
            )  # no step waited for a rogue step_id
            assert (
                await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            ).total_cached_prompt_tokens >= 3

            # Once the scheduler is gone, its session is free: another client (a new scheduler) opens one.
            await scheduler.stop()
            session = None
            for _ in range(50):
                try:
                    session = await ExecutorSession.open(intruder)
                    break
                except SessionRefused:
                    await asyncio.sleep(0.05)
            assert session is not None and session.live
            # ... and a session that is replaced by its holder ends; its steps are refused.
            newer = await ExecutorSession.open(intruder, replaces=session.id)
            for _ in range(100):
                if not session.live:
                    break
                await asyncio.sleep(0.01)
            assert not session.live and "ABORTED" in session.end_reason
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await intruder.Step(
                    executor_pb2.ExecutorStepRequest(step_id=1, session_id=session.id), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            resp = await intruder.Step(
                executor_pb2.ExecutorStepRequest(step_id=1, session_id=newer.id), timeout=5
            )
            assert resp.step_id == 1
            # The live session's steps go over its step stream too, in order.
            answers = [
                await newer.send_step(executor_pb2.ExecutorStepRequest(step_id=i)) for i in (2, 3)
            ]
            assert [(await newer.wait_step(a, 5)).step_id for a in answers] == [2, 3]
            newer.close()
        await server.stop(None)

    run(body())


# ---- keepalive ----

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_PING, H2_GOAWAY = 0x6, 0x7


class FrameWatchingProxy:
    """A TCP forwarder in front of a plaintext gRPC server that notes when clients send an HTTP/2 PING
    (not an ack) and whether the server sends a GOAWAY."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.pings: list[float] = []
        self.goaways: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is gone
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        pending = b""
        preface = from_client
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                pending += data
                if preface:
                    if len(pending) < len(H2_PREFACE):
                        continue
                    pending, preface = pending[len(H2_PREFACE) :], False
                while len(pending) >= 9:
                    length = int.from_bytes(pending[:3], "big")
                    if len(pending) < 9 + length:
                        break
                    kind, flags, payload = pending[3], pending[4], pending[9 : 9 + length]
                    if from_client and kind == H2_PING and not flags & 0x1:
                        self.pings.append(time.monotonic())
                    if not from_client and kind == H2_GOAWAY:
                        self.goaways.append(payload[8:])
                    pending = pending[9 + length :]
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


IDLE_S = 6.0


def test_an_idle_session_stays_open_and_checked_past_the_servers_ping_limit(
    clean_grpc, monkeypatch
):
    """Both ends from grpc_util's one definition, shortened 100x: the gateway's session to the scheduler sits
    idle while the client pings it about every second (gRPC's least interval), where gRPC's default server
    policy would answer the third ping or so with GOAWAY too_many_pings."""
    monkeypatch.setattr(grpc_util, "KEEPALIVE_TIME_MS", 300, raising=False)
    monkeypatch.setattr(grpc_util, "KEEPALIVE_TIMEOUT_MS", 5000, raising=False)

    async def body():
        server, exec_port, _ = await serve_fake_executor()
        scheduler = await start_scheduler(
            ServerArgs(scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{exec_port}")
        )
        proxy = FrameWatchingProxy(scheduler.port)
        channel = grpc_util.aio_channel(f"127.0.0.1:{proxy.port}")
        session = SchedulerSession(lambda: scheduler_pb2_grpc.SchedulerStub(channel))
        try:
            first = [
                t async for msg in session.start(gen_request("a", [1, 2], 3)) for t in msg.token_ids
            ]
            assert first == reference_tokens([1, 2], 3, VOCAB)
            stream, executor_session = session._call, scheduler.runtime.session
            idle_from = time.monotonic()
            await asyncio.sleep(IDLE_S)
            pings = [t for t in proxy.pings if t > idle_from]
            assert len(pings) >= 4, pings  # keepalive kept checking the idle stream
            assert proxy.goaways == []
            assert session._call is stream and not stream.done()  # the same stream, still open
            assert scheduler.runtime.session is executor_session and executor_session.live
            second = [
                t async for msg in session.start(gen_request("b", [3, 4], 3)) for t in msg.token_ids
            ]
            assert second == reference_tokens([3, 4], 3, VOCAB) and session._call is stream
        finally:
            await session.close()
            await channel.close()
            proxy.close()
            await scheduler.stop()
            await server.stop(None)

    run(body())


# ---- reconnects ----


def test_the_scheduler_reaches_an_executor_that_comes_up_late_within_a_second(clean_grpc):
    async def body():
        loop = asyncio.get_running_loop()
        (port,) = free_ports(1)
        attempts: list[float] = []

        def refuse(
            _reader, writer
        ):  # a port that takes connections but speaks no gRPC: a failed attempt
            attempts.append(loop.time())
            writer.close()

        listener = await asyncio.start_server(refuse, "127.0.0.1", port)
        starting = asyncio.create_task(
            start_scheduler(
                ServerArgs(scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{port}")
            )
        )
        await asyncio.sleep(
            5
        )  # the executor loads for a while; the scheduler's channel keeps trying
        seen = len(attempts)
        while len(attempts) == seen:  # the moment right after a failed attempt
            await asyncio.sleep(0.005)
        listener.close()
        await listener.wait_closed()
        intervals = [b - a for a, b in zip(attempts, attempts[1:])]
        assert len(attempts) >= 8 and max(intervals[-4:]) < 1.2, (
            intervals
        )  # short back-off throughout

        server, _, _ = await serve_fake_executor(port)
        ready = loop.time()
        scheduler = await asyncio.wait_for(starting, 30)
        waited = loop.time() - ready
        await scheduler.stop()
        await server.stop(None)
        return waited

    waited = run(body())
    assert waited < 1.5, waited


def test_install_from_args_gives_blocking_channels_the_token(clean_grpc):
    install_from_args(ServerArgs(grpc_auth_token=TOKEN))

    async def serve():
        server = grpc_util.aio_server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(FakeExecutorServicer(), server)
        port = grpc_util.bind(server, "127.0.0.1:0")
        await server.start()
        return server, port

    async def body():
        server, port = await serve()
        try:

            def calls():
                with grpc_util.channel(f"127.0.0.1:{port}") as channel:
                    info = executor_pb2_grpc.ExecutorStub(channel).GetModelInfo(
                        executor_pb2.ExecutorModelInfoRequest(), timeout=10
                    )
                with channel_with(None, f"127.0.0.1:{port}") as channel:
                    bare = rpc_code(
                        lambda: executor_pb2_grpc.ExecutorStub(channel).GetModelInfo(
                            executor_pb2.ExecutorModelInfoRequest(), timeout=10
                        )
                    )
                return info, bare

            return await asyncio.to_thread(calls)
        finally:
            await server.stop(None)

    info, bare = run(body())
    assert info.architecture == "FakeForCausalLM" and bare == grpc.StatusCode.UNAUTHENTICATED
