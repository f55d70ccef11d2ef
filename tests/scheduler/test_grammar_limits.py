"""Structured-output compiles are bounded (issue 17): a size and depth check before compiling, a time
limit enforced by killing the worker process that compiles, a cap on concurrent compiles, failures
remembered, compiles killed when their requests end and when the scheduler stops. GrammarBackend
with the real SmolLM2 tokenizer, then the gRPC scheduler with the fake executor, then (e2e) the
HTTP API of a tiny stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from radixserve.v1 import common_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.common.lifecycle import SHUTDOWN_GRACE_S
from radixserve.common.model_files import resolve_model_path
from tests.fake_executor import FakeExecutorServicer, reference_tokens
from radixserve.scheduler.grammar import (
    MAX_SCHEMA_DEPTH,
    CompileBusy,
    CompilerUnavailable,
    Constraint,
    GrammarBackend,
    GrammarLimits,
    InvalidConstraint,
)
from radixserve.scheduler.server import start_scheduler
from radixserve.tokenizer.core import load_tokenizer
from tests.stack import stop_stack
from tests.tiny_stack import MODEL, service_pids, start_tiny_stack

VOCAB = 49152  # SmolLM2's
EOS = 2


def poison(n: int = 20000) -> str:
    """47 bytes of JSON schema that xgrammar compiles for minutes (n=5000: about 4 s)."""
    return json.dumps({"type": "string", "pattern": "[a-z]{1,%d}" % n})


def nested_arrays(depth: int) -> str:
    """A schema whose JSON nests `depth` objects deep."""
    return '{"type": "array", "items": ' * (depth - 1) + '{"type": "string"}' + "}" * (depth - 1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None))


@pytest.fixture(scope="module")
def processes(tokenizer):
    """One compiler zygote for the module's backends (it takes seconds to start)."""
    owner = GrammarBackend(lambda: tokenizer, VOCAB, [EOS])
    yield owner.processes
    owner.close()


@pytest.fixture
def backend_with(tokenizer, processes):
    """make(**limits): a backend on the module's zygote; closed (its workers killed) after the test."""
    made = []

    def make(**limits) -> GrammarBackend:
        made.append(
            GrammarBackend(lambda: tokenizer, VOCAB, [EOS], GrammarLimits(**limits), processes)
        )
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def alive(pid: int) -> bool:
    """Not exited: a zombie (Z) and a process its parent is reaping (X, shown for an instant before
    /proc/N goes) both count as gone (X read as alive once failed a check right after a wait loop
    that had seen the zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X", "x")


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """Live and zombie children of `pid`, by the parent field of every /proc/N/stat (the kernel's
    /proc/N/task/*/children can miss a child while another forks, which made this test flaky)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def warm(backend: GrammarBackend) -> None:
    """Start the zygote (seconds, once per module) and a worker: later compiles start at once."""
    await backend.compile_async(Constraint("json_object", ""))


# ---- GrammarBackend ---------------------------------------------------------------------------


def test_an_oversize_or_too_deep_constraint_is_a_400_before_any_compile(tokenizer):
    backend = GrammarBackend(lambda: tokenizer, VOCAB, [EOS], GrammarLimits(max_bytes=20000))

    async def body():
        started = time.monotonic()
        with pytest.raises(
            InvalidConstraint,
            match=r"^the regex is 20001 bytes, more than the 20000 allowed "
            r"\(--grammar-max-bytes\)$",
        ):
            await backend.compile_async(Constraint("regex", "a" * 20001))
        with pytest.raises(
            InvalidConstraint, match=rf"nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep"
        ):
            await backend.compile_async(
                Constraint("json_schema", nested_arrays(MAX_SCHEMA_DEPTH + 1))
            )
        with pytest.raises(
            InvalidConstraint, match=rf"more than {MAX_SCHEMA_DEPTH} deep"
        ):  # too deep for json.loads
            await backend.compile_async(Constraint("json_schema", "[" * 5000 + "]" * 5000))
        return time.monotonic() - started

    assert run(body()) < 0.5
    with pytest.raises(
        InvalidConstraint, match="--grammar-max-bytes"
    ):  # the in-process path checks too
        backend.compile(Constraint("ebnf", 'root ::= "a"' + " " * 20000))
    assert (
        backend.compiles == 0 and backend.zygote_pid is None
    )  # no compiler process was even started


def test_a_schema_at_the_depth_limit_still_compiles(backend_with):
    backend = backend_with()
    compiled = run(
        backend.compile_async(Constraint("json_schema", nested_arrays(MAX_SCHEMA_DEPTH)))
    )
    assert compiled.memory_size_bytes > 0


def test_a_compile_past_its_time_limit_is_a_400_and_its_process_is_killed(backend_with):
    backend = backend_with(compile_timeout=1.0)

    async def body():
        await warm(backend)
        [pid] = backend.worker_pids()
        started = time.monotonic()
        task = asyncio.create_task(backend.compile_async(Constraint("json_schema", poison())))
        await until(lambda: backend.compiling == 1, 1, "the compile to start")
        ticks = cpu_ticks(pid)
        await asyncio.sleep(0.5)
        burnt = cpu_ticks(pid) - ticks
        with pytest.raises(InvalidConstraint) as caught:
            await task
        elapsed = time.monotonic() - started
        await until(lambda: not alive(pid), 1, "the worker to die")
        return pid, burnt, elapsed, str(caught.value)

    pid, burnt, elapsed, message = run(body())
    assert (
        message
        == "the json_schema did not compile within 1 s (--grammar-compile-timeout); simplify it"
    )
    assert burnt > 0  # it was compiling ...
    assert 1.0 <= elapsed < 1.8, elapsed  # ... until the limit, then its process was killed
    assert backend.timed_out == 1 and backend.worker_pids() == []
    assert pid not in children(backend.zygote_pid)  # nothing left compiling


def test_retrying_a_constraint_that_timed_out_is_answered_at_once(backend_with):
    backend = backend_with(compile_timeout=0.5)
    constraint = Constraint("json_schema", poison(20001))

    async def body():
        await warm(backend)
        with pytest.raises(InvalidConstraint, match="--grammar-compile-timeout"):
            await backend.compile_async(constraint)
        compiles = backend.compiles
        times = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(
                InvalidConstraint,
                match=r"did not compile within 0.5 s \(--grammar-compile-timeout\)",
            ):
                await backend.compile_async(constraint)
            times.append(time.monotonic() - started)
        assert backend.compiles == compiles  # no compile started again
        started = time.monotonic()
        await backend.compile_async(
            Constraint("regex", "[0-9]{3}")
        )  # a worker forked afresh from the zygote
        return times, time.monotonic() - started

    retries, fresh = run(body())
    assert max(retries) < 0.01, retries
    assert fresh < 1.0


def test_a_compile_whose_requests_all_end_is_killed_and_its_time_counts_against_retries(
    backend_with,
):
    backend = backend_with(compile_timeout=2.0)
    constraint = Constraint("json_schema", poison(20002))

    async def body():
        await warm(backend)
        waiters = [asyncio.create_task(backend.compile_async(constraint)) for _ in range(2)]
        await until(lambda: backend.compiling == 1, 1, "the compile to start")
        [pid] = backend.worker_pids()
        await asyncio.sleep(0.3)
        waiters[0].cancel()
        await asyncio.sleep(0.2)
        assert (
            alive(pid) and backend.compiles == 2
        )  # one compile for both; the other request still waits
        waiters[1].cancel()
        await until(lambda: not alive(pid), 1, "the worker to die")
        started = time.monotonic()
        with pytest.raises(InvalidConstraint, match="did not compile within 2 s"):
            await backend.compile_async(constraint)  # gets what is left of its 2 s
        return time.monotonic() - started

    retry = run(body())
    assert 0.8 < retry < 1.8, retry


def test_at_most_max_concurrent_compiles_run_and_the_others_wait_their_turn(backend_with):
    backend = backend_with(compile_timeout=1.0, max_concurrent_compiles=2, queue_timeout=5.0)

    async def body():
        await warm(backend)
        started = time.monotonic()
        done_at = {}

        async def compile_(name, constraint):
            try:
                await backend.compile_async(constraint)
                result = "ok"
            except InvalidConstraint as e:
                result = str(e)
            done_at[name] = (time.monotonic() - started, result)

        tasks = [
            asyncio.create_task(compile_(f"slow{i}", Constraint("json_schema", poison(20010 + i))))
            for i in range(3)
        ]
        tasks.append(asyncio.create_task(compile_("small", Constraint("regex", "[a-c]{2}"))))
        most_workers = 0
        while not all(t.done() for t in tasks):
            most_workers = max(most_workers, len(backend.worker_pids()))
            await asyncio.sleep(0.01)
        return done_at, most_workers

    done_at, most_workers = run(body())
    assert backend.most_compiling == 2 and most_workers <= 2
    for name in ("slow0", "slow1"):
        assert 1.0 <= done_at[name][0] < 1.8 and "--grammar-compile-timeout" in done_at[name][1], (
            done_at
        )
    # The third slow one and the small one waited for a slot; the small one then compiled at once.
    assert done_at["small"][1] == "ok" and 1.0 <= done_at["small"][0] < 2.0, done_at
    assert (
        2.0 <= done_at["slow2"][0] < 3.0 and "--grammar-compile-timeout" in done_at["slow2"][1]
    ), done_at


def test_a_compile_past_its_memory_limit_is_a_400_and_the_worker_serves_on(backend_with):
    backend = backend_with(compile_timeout=60, worker_memory_bytes=100 << 20)
    enum = json.dumps(
        {"enum": [f"value{i:06d}" for i in range(8000)]}
    )  # 120 KB: about 350 MB to compile

    async def body():
        await warm(backend)
        [pid] = backend.worker_pids()
        with pytest.raises(
            InvalidConstraint,
            match="^the json_schema needs too much memory to compile; simplify it$",
        ):
            await backend.compile_async(Constraint("json_schema", enum))
        await backend.compile_async(Constraint("regex", "[0-9]{2}"))
        assert backend.worker_pids() == [pid]

    run(body())


def test_a_compile_that_cannot_start_in_time_is_busy_not_invalid(backend_with):
    backend = backend_with(compile_timeout=5.0, max_concurrent_compiles=1, queue_timeout=0.3)

    async def body():
        await warm(backend)
        slow = asyncio.create_task(backend.compile_async(Constraint("json_schema", poison(20020))))
        await until(lambda: backend.compiling == 1, 1, "the compile to start")
        started = time.monotonic()
        with pytest.raises(
            CompileBusy,
            match=r"^1 structured-output constraints are compiling "
            r"\(--grammar-max-concurrent-compiles\)",
        ):
            await backend.compile_async(Constraint("regex", "[x-z]{4}"))
        waited = time.monotonic() - started
        slow.cancel()
        return waited

    assert 0.3 <= run(body()) < 0.8


def test_closing_the_backend_kills_its_compiles(backend_with):
    """(The scheduler test below checks that closing also stops the zygote the backend started.)"""
    backend = backend_with(compile_timeout=60)

    async def body():
        await warm(backend)
        task = asyncio.create_task(backend.compile_async(Constraint("json_schema", poison())))
        await until(lambda: backend.compiling == 1, 1, "the compile to start")
        pids = backend.worker_pids()
        started = time.monotonic()
        backend.close()
        with pytest.raises(CompilerUnavailable, match="^the scheduler is shutting down$"):
            await task
        await until(lambda: not any(alive(p) for p in pids), 1, "the compiler processes to exit")
        return time.monotonic() - started

    assert run(body()) < 1.0
    with pytest.raises(CompilerUnavailable):
        run(backend.compile_async(Constraint("regex", "[0-9]")))


# ---- the gRPC scheduler with the fake executor -------------------------------------------------


async def collect(call) -> list:
    return [message async for message in call]


def test_the_scheduler_serves_others_during_a_slow_compile_and_stops_promptly():
    async def body():
        executor = FakeExecutorServicer(
            kv_slots=1024, vocab_size=VOCAB, context_length=256, eos_token_ids=(EOS,)
        )
        exec_server = aio_server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
        port = bind(exec_server, "127.0.0.1:0")
        await exec_server.start()
        args = ServerArgs(
            scheduler_addr="127.0.0.1:0",
            executor_addr=f"127.0.0.1:{port}",
            grammar_compile_timeout=2.0,
        )
        scheduler = await start_scheduler(args)
        grammars = scheduler.grammars
        channel = aio_channel(f"127.0.0.1:{scheduler.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        figures = {}
        stopped = False
        try:

            def generate(rid, max_new=8, ignore_eos=False, **sampling):
                return stub.Generate(
                    scheduler_pb2.SchedulerGenerateRequest(
                        request_id=rid,
                        input_ids=[1, 2, 3],
                        sampling=common_pb2.SamplingParams(**sampling),
                        stopping=common_pb2.StoppingCriteria(
                            max_new_tokens=max_new, ignore_eos=ignore_eos
                        ),
                    )
                )

            await collect(
                generate("warm", json_object=True)
            )  # starts the compiler zygote (seconds)

            started = time.monotonic()
            slow = asyncio.create_task(collect(generate("slow", json_schema=poison())))
            await until(lambda: grammars.compiling == 1, 2, "the slow compile to start")
            t = time.monotonic()
            free = await collect(generate("free", ignore_eos=True))
            figures["free_s"] = time.monotonic() - t
            t = time.monotonic()
            small = await collect(generate("small", regex="(yes|no)"))
            figures["small_s"] = time.monotonic() - t
            figures["still_compiling"] = grammars.compiling
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await slow
            figures["slow_s"] = time.monotonic() - started
            figures["slow_error"] = (caught.value.code(), caught.value.details())
            assert [t for m in free for t in m.token_ids] == reference_tokens([1, 2, 3], 8, VOCAB)
            assert small[-1].finish_reason == common_pb2.FINISH_REASON_STOP

            # The client goes away: its compile is killed.
            gone = generate("gone", json_schema=poison(20001))
            reader = asyncio.create_task(collect(gone))
            await until(lambda: grammars.compiling == 1, 2, "the compile to start")
            [pid] = grammars.worker_pids()
            gone.cancel()
            t = time.monotonic()
            await until(lambda: not alive(pid), 2, "the cancelled compile's worker to die")
            figures["cancel_kill_s"] = time.monotonic() - t
            with pytest.raises(asyncio.CancelledError):
                await reader

            # The scheduler stops while a compile runs: at once, with its compiler processes.
            last = asyncio.create_task(collect(generate("last", json_schema=poison(20002))))
            await until(lambda: grammars.compiling == 1, 2, "the compile to start")
            pids = [*grammars.worker_pids(), grammars.zygote_pid]
            t = time.monotonic()
            stopped = True
            await scheduler.stop(grace=5.0)
            figures["stop_s"] = time.monotonic() - t
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await last
            figures["last_error"] = caught.value.code()
            await until(
                lambda: not any(alive(p) for p in pids), 2, "the compiler processes to exit"
            )
            return figures
        finally:
            await channel.close()
            if not stopped:
                await scheduler.stop()
            await exec_server.stop(None)

    figures = run(body())
    assert (
        figures["free_s"] < 1.0 and figures["small_s"] < 1.0 and figures["still_compiling"] == 1
    ), figures
    code, details = figures["slow_error"]
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT
        and "within 2 s (--grammar-compile-timeout)" in details
    )
    assert 2.0 <= figures["slow_s"] < 3.0, figures
    assert figures["cancel_kill_s"] < 0.5, figures
    assert figures["stop_s"] < 1.5 and figures["last_error"] == grpc.StatusCode.UNAVAILABLE, figures


# ---- end to end: the HTTP API of a tiny stack ------------------------------------------------------


def chat(base_url: str, timeout: float = 60, **fields) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        **fields,
    }
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=timeout)


def compiler_workers(scheduler: int) -> list[int]:
    """The live worker processes of the scheduler's compiler zygote."""
    return [w for zygote in children(scheduler) for w in children(zygote) if alive(w)]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def schema_format(schema: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(schema)}}


@pytest.mark.e2e
def test_grammar_limits_through_the_http_api(tmp_path):
    stack = start_tiny_stack(
        tmp_path, "--grammar-compile-timeout", "2", "--grammar-max-bytes", "4096"
    )
    try:
        url = stack.base_url
        big = json.dumps({"enum": [f"value{i:05d}" for i in range(400)]})  # 5 KB
        started = time.monotonic()
        resp = chat(url, response_format=schema_format(big))
        assert resp.status_code == 400 and time.monotonic() - started < 2, resp.text
        error = resp.json()["error"]
        assert (
            error["type"] == "invalid_request_error" and "--grammar-max-bytes" in error["message"]
        )

        resp = chat(url, response_format={"type": "json_object"})  # warms the compiler up (seconds)
        assert resp.status_code == 200, resp.text

        # A 4-token chat while a poison schema compiles; the poison schema then gets its 400.
        slow: dict = {}
        thread = threading.Thread(
            target=lambda: slow.update(resp=chat(url, response_format=schema_format(poison())))
        )
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)
        t = time.monotonic()
        resp = chat(url)
        quick = time.monotonic() - t
        assert resp.status_code == 200 and quick < 1.5, (resp.text, quick)
        thread.join(10)
        slow_s = time.monotonic() - started
        assert slow["resp"].status_code == 400 and slow_s < 4
        assert (
            "did not compile within 2 s (--grammar-compile-timeout)"
            in slow["resp"].json()["error"]["message"]
        )
        started = time.monotonic()
        resp = chat(url, response_format=schema_format(poison()))  # remembered
        assert resp.status_code == 400 and time.monotonic() - started < 0.5, resp.text

        # The client gives up (its HTTP timeout): the gateway aborts the request, and its compile is
        # killed then, not at its 2 s limit.
        scheduler = service_pids(stack.proc.pid)["scheduler"]

        def give_up():
            with contextlib.suppress(httpx.TimeoutException):
                chat(url, timeout=0.5, response_format=schema_format(poison(20003)))

        started = time.monotonic()
        threading.Thread(target=give_up, daemon=True).start()
        pid = wait_for(
            lambda: next(iter(compiler_workers(scheduler)), None), 5, "the compile to start"
        )
        wait_for(lambda: not alive(pid), 3, "the abandoned compile's worker to die")
        abandoned_s = time.monotonic() - started
        assert abandoned_s < 1.5

        # SIGTERM to the scheduler while a compile runs: the compile is killed at once (well before its
        # 2 s limit), and the scheduler exits within its shutdown grace (the gateway's session stays open).
        thread = threading.Thread(
            target=lambda: chat(url, response_format=schema_format(poison(20001))), daemon=True
        )
        thread.start()
        workers = wait_for(lambda: compiler_workers(scheduler), 5, "the compile to start")
        zygotes = children(scheduler)
        assert len(zygotes) == 1 and len(workers) == 1, (zygotes, workers)
        started = time.monotonic()
        os.kill(scheduler, signal.SIGTERM)
        gone = False  # decided once: a pid read again later could be another process's
        while not gone and time.monotonic() - started < 1.5:
            gone = not any(alive(p) for p in zygotes + workers)
            if not gone:
                time.sleep(0.01)
        compilers_gone = time.monotonic() - started
        assert gone and compilers_gone < 1.0, compilers_gone
        while time.monotonic() - started < SHUTDOWN_GRACE_S + 5 and alive(scheduler):
            time.sleep(0.05)
        assert not alive(scheduler), stack.log_tail()
        print(
            f"4-token chat during a compile {quick:.2f} s; poison 400 after {slow_s:.2f} s; abandoned compile "
            f"killed {abandoned_s:.2f} s after its request; compilers gone {compilers_gone:.2f} s after SIGTERM, "
            f"scheduler exited {time.monotonic() - started:.1f} s after it"
        )
    finally:
        stop_stack(stack)
