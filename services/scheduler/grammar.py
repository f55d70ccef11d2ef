"""Structured output: compiles a request's constraint (SamplingParams.constraint) with xgrammar and
tracks where its output stands in the grammar.

A GrammarBackend holds the tokenizer's vocabulary as xgrammar sees it; it loads the tokenizer on the
first constrained request, so servers that never see one do not pay for it. Each constrained
request gets a RequestGrammar (an xgrammar GrammarMatcher) that the scheduler core asks for the
next token's bitmask and feeds every sampled token.

Compiling is where a client can make the server work hard: a 47-byte schema ({"type": "string",
"pattern": "[a-z]{1,20000}"}) compiles for minutes, and xgrammar's C++ compile cannot be
interrupted. So the scheduler (GrammarBackend.compile_async) compiles in worker processes
(grammar_worker.py) and bounds every compile:
- size and shape first: more than --grammar-max-bytes of text, or a JSON schema nested deeper than
  MAX_SCHEMA_DEPTH, is a 400 before any compile;
- at most --grammar-max-concurrent-compiles compile at once; a constraint that cannot start within
  --grammar-compile-timeout gets RESOURCE_EXHAUSTED (503, retry later);
- a compile that runs past --grammar-compile-timeout is a 400 naming the limit, and its worker
  process is killed at once (its CPU work stops; a new worker is forked from the warm zygote);
- a compile whose requests all end (client gone, abort) is killed the same way, and a scheduler
  that stops kills them all;
- a worker's heap is capped (GrammarLimits.worker_memory_bytes): past it, the compile is a 400;
- compiled grammars are cached by (kind, spec) (LRU, GRAMMAR_CACHE_BYTES); a constraint that failed
  or ran out of time is remembered for REMEMBER_FAILURES_S, so a client retrying it gets its 400
  at once; the seconds that ended (cancelled) compiles of a constraint ran add up against its
  time limit, so retrying after a client-side timeout does not buy a fresh budget each time.
Requests for the same constraint share one compile. The first compile starts the compiler zygote
(importing xgrammar and torch: about 5 s, more on a busy machine), outside any compile's time limit.
The synchronous compile()/matcher_for() compile in process (tests and tools; no time limit).

JSON is generated on one line, with ", " and ": " as the only whitespace (xgrammar's
any_whitespace=False): with free whitespace, small models tend to loop on newlines and spaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from radixserve.v1 import executor_pb2
from radixserve.common.sampling import Constraint, SamplingParams
from radixserve.common.args import ServerArgs
from radixserve.scheduler.grammar_worker import (
    JSON_OBJECT_SCHEMA,
    WORKER_NICENESS,
    FrameTooLarge,
    InvalidConstraint,
    compile_constraint,
    receive_worker,
    recv_frame,
    send_frame,
)
from radixserve.tokenizer.core import load_tokenizer, tokenizer_folder

__all__ = [
    "JSON_OBJECT_SCHEMA",
    "CompileBusy",
    "CompilerProcesses",
    "CompilerUnavailable",
    "Constraint",
    "GrammarBackend",
    "GrammarLimits",
    "InvalidConstraint",
    "RequestGrammar",
    "check_constraint",
    "grammar_backend",
    "request_grammar",
]

log = logging.getLogger("radixserve.scheduler")

GRAMMAR_CACHE_BYTES = 256 << 20  # compiled grammars kept (their xgrammar memory_size_bytes)
GRAMMAR_CACHE_ENTRIES = 4096
COMPILE_THREADS = 4  # per compile, at most; fewer when cores are scarce (see compile_threads)
# JSON nesting (objects and arrays) of a json_schema. Compile time grows steeply with depth: arrays
# nested 100 deep compile in 0.1 s, 300 deep in 2.5 s, 500 deep in 12 s.
MAX_SCHEMA_DEPTH = 100
MAX_COMPILED_BYTES = (
    64 << 20
)  # a compiled grammar, serialized (a 120 KB enum of 8000 strings: 19 MB)
REMEMBER_FAILURES_S = 600.0  # how long a constraint that failed or ran out of time stays remembered
REMEMBERED_CONSTRAINTS = 4096
COMPILER_START_TIMEOUT_S = 120.0  # the zygote imports xgrammar and torch: seconds
WORKER_FORK_TIMEOUT_S = 30.0
SHUTTING_DOWN = "the scheduler is shutting down"

ConstraintKey = tuple[str, bytes]  # (kind, sha256 of spec)


class CompileBusy(Exception):
    """No compile slot freed up in time (RESOURCE_EXHAUSTED: the client may retry)."""


class CompilerUnavailable(Exception):
    """The compiler processes cannot run (the scheduler is stopping, or they fail to start)."""


@dataclass(frozen=True)
class GrammarLimits:
    compile_timeout: float = 10.0  # --grammar-compile-timeout
    max_concurrent_compiles: int = 2  # --grammar-max-concurrent-compiles
    max_bytes: int = 131072  # --grammar-max-bytes
    queue_timeout: float | None = (
        None  # how long a compile may wait for a slot; None: compile_timeout
    )
    # Heap a compile worker may allocate (RLIMIT_DATA beyond what it inherits); past it the compile is
    # a 400. Valid 120 KB schemas (an enum of 8000 strings) take about 350 MB.
    worker_memory_bytes: int = 4 << 30

    @classmethod
    def from_args(cls, args: ServerArgs) -> GrammarLimits:
        return cls(
            compile_timeout=args.grammar_compile_timeout,
            max_concurrent_compiles=args.grammar_max_concurrent_compiles,
            max_bytes=args.grammar_max_bytes,
        )

    @property
    def slot_timeout(self) -> float:
        return self.compile_timeout if self.queue_timeout is None else self.queue_timeout

    @property
    def compile_threads(self) -> int:
        """xgrammar threads per compile: the concurrent compiles together use at most the machine's cores."""
        return max(
            1, min(COMPILE_THREADS, (os.cpu_count() or 1) // max(1, self.max_concurrent_compiles))
        )


def constraint_key(constraint: Constraint) -> ConstraintKey:
    return constraint.kind, hashlib.sha256(constraint.spec.encode()).digest()


def check_constraint(constraint: Constraint, limits: GrammarLimits) -> None:
    """InvalidConstraint when the constraint is too big or too deep to compile: checked before compiling."""
    check_size(constraint, limits)
    check_shape(constraint)


def check_size(constraint: Constraint, limits: GrammarLimits) -> None:
    size = len(constraint.spec.encode())
    if size > limits.max_bytes:
        raise InvalidConstraint(
            f"the {constraint.kind} is {size} bytes, more than the {limits.max_bytes} allowed "
            f"(--grammar-max-bytes)"
        )


def check_shape(constraint: Constraint) -> None:
    """Parses a json_schema (about 1 ms per 100 KB): compiled ones are not checked again."""
    if constraint.kind == "json_schema" and _nests_deeper(constraint.spec, MAX_SCHEMA_DEPTH):
        raise InvalidConstraint(
            f"the json_schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep"
        )


def _nests_deeper(text: str, limit: int) -> bool:
    try:
        doc = json.loads(text)
    except RecursionError:
        return True
    except ValueError:
        return False  # not JSON: the compiler tells the client what is wrong with it
    stack = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class RequestGrammar:
    """One request's position in its grammar. Used from the scheduler's step loop only."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def next_token_bitmask(self) -> bytes:
        """The tokens allowed next, in the executor's token_bitmask layout (little-endian int32
        words; bit j of word i allows token 32*i+j)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask[0].numpy().astype("<i4").tobytes()

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False (state unchanged) if the grammar forbids it."""
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """Whether the grammar is complete and its stop token (EOS) was accepted."""
        return self._matcher.is_terminated()


class GrammarBackend:
    """Compiles constraints against one tokenizer, loaded on first use: compile_async in worker
    processes, bounded by `limits` (the scheduler's way); compile/matcher_for in process, unbounded
    (tests and tools). Its async methods run on one event loop."""

    def __init__(
        self,
        load: Callable[[], PreTrainedTokenizerBase],
        vocab_size: int,
        stop_token_ids: list[int],
        limits: GrammarLimits | None = None,
        processes: CompilerProcesses | None = None,
    ):
        """vocab_size is the model's (its logits width), which may exceed the tokenizer's;
        stop_token_ids (the model's EOS ids; empty: the tokenizer's) end a complete output.
        processes: compiler processes to share with another backend of the same tokenizer (tests); their
        owner closes them."""
        self.load_tokenizer = load
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.limits = limits or GrammarLimits()
        self._info: xgr.TokenizerInfo | None = None
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        # compile_async's state
        self._cache = _CompiledCache(GRAMMAR_CACHE_BYTES, GRAMMAR_CACHE_ENTRIES)
        self._attempts = _Attempts(REMEMBER_FAILURES_S, REMEMBERED_CONSTRAINTS)
        self._jobs: dict[ConstraintKey, _Job] = {}
        self._slots = asyncio.Semaphore(max(1, self.limits.max_concurrent_compiles))
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self.processes = processes or CompilerProcesses(self._tokenizer_info_json)
        self._owns_processes = processes is None
        self._closed = False
        self.compiling = 0  # compiles running in workers now
        self.most_compiling = 0
        self.compiles = 0  # compiles sent to workers
        self.timed_out = 0  # compiles killed at the time limit

    @property
    def tokenizer_info(self) -> xgr.TokenizerInfo:
        with self._lock:
            if self._info is None:
                self._info = xgr.TokenizerInfo.from_huggingface(
                    self.load_tokenizer(),
                    vocab_size=self.vocab_size,
                    stop_token_ids=self.stop_token_ids or None,
                )
            return self._info

    def _tokenizer_info_json(self) -> bytes:
        return self.tokenizer_info.serialize_json().encode()

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """The in-process compiler of compile(); its own cache keeps compiled grammars by (kind, spec)."""
        info = self.tokenizer_info
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=COMPILE_THREADS, cache_limit_bytes=GRAMMAR_CACHE_BYTES
                )
            return self._compiler

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """Compile in this process and thread, without a time limit."""
        check_constraint(constraint, self.limits)
        return compile_constraint(self.compiler, constraint.kind, constraint.spec)

    def matcher_for(self, sampling: SamplingParams) -> RequestGrammar | None:
        """A fresh matcher for the request's constraint, or None when it has none (compiled in process)."""
        constraint = sampling.constraint
        if constraint is None:
            return None
        return RequestGrammar(self.compile(constraint), self.vocab_size)

    # ---- compiles in worker processes, bounded ----------------------------------------------

    async def compile_async(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache or a worker process. Raises InvalidConstraint (the
        client's fault: too big, does not compile, or not within --grammar-compile-timeout),
        CompileBusy (no compile slot in time) or CompilerUnavailable. Cancelling the caller stops
        the compile once no other request waits for it."""
        if self._closed:
            raise CompilerUnavailable(SHUTTING_DOWN)
        check_size(constraint, self.limits)
        key = constraint_key(constraint)
        compiled = self._cache.get(key)
        if compiled is not None:
            return compiled
        error = self._attempts.error(key)
        if error is not None:
            raise InvalidConstraint(error)
        check_shape(constraint)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(
                asyncio.create_task(
                    self._compile_job(key, constraint), name=f"compile-{constraint.kind}"
                )
            )
            job.task.add_done_callback(functools.partial(self._job_done, key, job))
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        except asyncio.CancelledError:
            if self._closed and job.task.cancelled() and not _being_cancelled():
                raise CompilerUnavailable(SHUTTING_DOWN) from None
            raise
        finally:
            job.waiters -= 1
            if job.waiters == 0 and not job.task.done():
                job.task.cancel()  # nobody waits for it any more: its worker is killed

    def _job_done(self, key: ConstraintKey, job: _Job, task: asyncio.Task) -> None:
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _compile_job(self, key: ConstraintKey, constraint: Constraint) -> xgr.CompiledGrammar:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.slot_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise CompileBusy(
                f"{limits.max_concurrent_compiles} structured-output constraints are compiling "
                f"(--grammar-max-concurrent-compiles) and this one could not start within "
                f"{limits.slot_timeout:g} s; retry later"
            ) from None
        try:
            return await self._compile_in_worker(key, constraint)
        finally:
            self._slots.release()

    async def _compile_in_worker(
        self, key: ConstraintKey, constraint: Constraint
    ) -> xgr.CompiledGrammar:
        loop = asyncio.get_running_loop()
        request = json.dumps([constraint.kind, constraint.spec]).encode()
        limit = self.limits.compile_timeout
        timed_out = (
            f"the {constraint.kind} did not compile within {limit:g} s (--grammar-compile-timeout); "
            f"simplify it"
        )
        for attempt in (1, 2):
            worker = await self._worker()
            budget = limit - self._attempts.spent(key)
            self._busy.add(worker)
            self.compiles += 1
            self.compiling += 1
            self.most_compiling = max(self.most_compiling, self.compiling)
            started = loop.time()
            try:
                async with asyncio.timeout(max(budget, 0.0)):
                    reply = await _in_thread(worker.compile, request, name="grammar-compile")
            except TimeoutError:
                worker.kill()
                self.timed_out += 1
                self._attempts.fail(key, timed_out)
                log.warning(
                    "a %s did not compile within %g s; its compiler process (pid %d) was killed",
                    constraint.kind,
                    limit,
                    worker.pid,
                )
                raise InvalidConstraint(timed_out) from None
            except asyncio.CancelledError:
                worker.kill()
                self._attempts.add_spent(key, loop.time() - started, limit, timed_out)
                raise
            except FrameTooLarge:
                worker.kill()
                message = (
                    f"the {constraint.kind} compiles to a grammar of more than {MAX_COMPILED_BYTES >> 20} MiB; "
                    f"simplify it"
                )
                self._attempts.fail(key, message)
                raise InvalidConstraint(message) from None
            except (EOFError, OSError) as e:
                worker.kill()
                if self._closed:
                    raise CompilerUnavailable(SHUTTING_DOWN) from None
                self._attempts.add_spent(key, loop.time() - started, limit, timed_out)
                if (
                    attempt == 1
                ):  # maybe the worker had died idle: try a fresh one before blaming the constraint
                    log.warning(
                        "a grammar compiler process (pid %d) failed (%s); retrying in a new one",
                        worker.pid,
                        e,
                    )
                    continue
                message = f"the {constraint.kind} could not be compiled (the compiler process failed on it)"
                self._attempts.fail(key, message)
                raise InvalidConstraint(message) from None
            finally:
                self._busy.discard(worker)
                self.compiling -= 1
            self._give_back(worker)
            break
        if reply[:1] != b"K":
            message = reply[1:].decode(errors="replace")
            self._attempts.fail(key, message)
            raise InvalidConstraint(message)
        # Deserializing takes ~0.1 s per MB and cannot be interrupted either: a daemon thread (GIL released).
        compiled = await _in_thread(
            xgr.CompiledGrammar.deserialize_json,
            reply[1:].decode(),
            self.tokenizer_info,
            name="grammar-load",
            orphan=functools.partial(self._cache.put, key),
        )
        self._cache.put(key, compiled)
        return compiled

    async def _worker(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if not worker.dead:
                return worker
        # The first one loads the tokenizer and starts the zygote (seconds); later ones fork in ms.
        try:
            return await _in_thread(
                self.processes.start_worker,
                self.limits.compile_threads,
                self.limits.worker_memory_bytes,
                name="grammar-compiler-start",
                orphan=self._give_back,
            )
        except CompilerUnavailable:
            raise
        except Exception as e:  # e.g. the tokenizer does not load
            log.exception("the grammar compiler did not start")
            raise CompilerUnavailable(f"the grammar compiler did not start: {e}") from None

    def _give_back(self, worker: _Worker) -> None:
        if self._closed or worker.dead:
            worker.kill()
        else:
            self._idle.append(worker)

    def worker_pids(self) -> list[int]:
        """The compiler worker processes alive now (idle or compiling)."""
        return [w.pid for w in (*self._idle, *self._busy) if not w.dead]

    @property
    def zygote_pid(self) -> int | None:
        return self.processes.zygote_pid

    def close(self) -> None:
        """Stop every compile, its workers and (unless shared) the compiler zygote: the scheduler
        stops. Later compiles fail."""
        self._closed = True
        for job in list(self._jobs.values()):
            job.task.cancel()
        for worker in [*self._idle, *self._busy]:
            worker.kill()
        self._idle.clear()
        if self._owns_processes:
            self.processes.close()


@dataclass
class _Job:
    """One constraint's compile, shared by the requests that wait for it."""

    task: asyncio.Task
    waiters: int = 0


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _in_thread(
    fn: Callable[..., Any], *args: Any, name: str, orphan: Callable[[Any], None] | None = None
) -> asyncio.Future:
    """fn(*args) in a new daemon thread, as a future of this loop: unlike the default executor's
    threads, nothing at shutdown waits for it. Cancelling the future does not stop fn; its result
    then goes to orphan (if given)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.cancelled():
            if ok and orphan is not None:
                orphan(value)
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            value, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(deliver, ok, value)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class _CompiledCache:
    """Compiled grammars by constraint key, least recently used first out, bounded in bytes and entries."""

    def __init__(self, max_bytes: int, max_entries: int):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[ConstraintKey, xgr.CompiledGrammar] = OrderedDict()
        self.bytes = 0

    def get(self, key: ConstraintKey) -> xgr.CompiledGrammar | None:
        compiled = self._entries.get(key)
        if compiled is not None:
            self._entries.move_to_end(key)
        return compiled

    def put(self, key: ConstraintKey, compiled: xgr.CompiledGrammar) -> None:
        if key in self._entries:
            return
        size = compiled.memory_size_bytes
        if size > self.max_bytes:
            return
        self._entries[key] = compiled
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.memory_size_bytes


@dataclass
class _Attempt:
    expires: float
    spent: float = 0.0  # seconds cancelled compiles ran
    error: str | None = None  # the 400 it fails with


class _Attempts:
    """What earlier compiles of constraints showed, for a while after the last: the error one failed
    with (timeouts included), or the seconds its cancelled compiles ran. Bounded in entries."""

    def __init__(self, ttl: float, max_entries: int):
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: OrderedDict[ConstraintKey, _Attempt] = OrderedDict()

    def _get(self, key: ConstraintKey) -> _Attempt | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= time.monotonic():
            del self._entries[key]
            return None
        return entry

    def _touch(self, key: ConstraintKey) -> _Attempt:
        entry = self._get(key) or _Attempt(0.0)
        entry.expires = time.monotonic() + self.ttl
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def error(self, key: ConstraintKey) -> str | None:
        entry = self._get(key)
        return entry.error if entry is not None else None

    def spent(self, key: ConstraintKey) -> float:
        entry = self._get(key)
        return entry.spent if entry is not None else 0.0

    def fail(self, key: ConstraintKey, message: str) -> None:
        self._touch(key).error = message

    def add_spent(self, key: ConstraintKey, seconds: float, limit: float, timed_out: str) -> None:
        entry = self._touch(key)
        entry.spent += seconds
        if entry.spent >= limit:
            entry.error = timed_out


class _Worker:
    """The scheduler's handle on one worker process. compile runs in a thread; kill from anywhere."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()
        self._busy = False
        self.dead = False
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)  # signals it, never a process that reused its pid
        except ProcessLookupError:
            self.dead = True
            sock.close()
        except (AttributeError, OSError):
            pass

    def compile(self, request: bytes) -> bytes:
        """Send a compile and wait for its reply (blocking). EOFError/OSError: the worker died or was killed."""
        with self._lock:
            if self.dead:
                raise EOFError("the compiler process was stopped")
            self._busy = True
        try:
            send_frame(self._sock, request)
            return recv_frame(self._sock, MAX_COMPILED_BYTES)
        finally:
            with self._lock:
                self._busy = False
                if self.dead:
                    self._release()

    def kill(self) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
            with contextlib.suppress(ProcessLookupError):
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            if (
                not self._busy
            ):  # else compile() releases once its read ends (at once: the socket closes)
                self._release()

    def _release(self) -> None:
        self._sock.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


# Lower its priority before importing xgrammar and torch (seconds of CPU), then serve.
_ZYGOTE_MAIN = (
    "import os\ntry:\n    os.nice(%d)\nexcept OSError:\n    pass\n"
    "from radixserve.scheduler.grammar_worker import zygote_main\nzygote_main(%%d)\n"
    % WORKER_NICENESS
)


class CompilerProcesses:
    """The compiler zygote (started on first use, again if it dies) and the workers forked from it.
    start_worker blocks: call it from a thread."""

    def __init__(self, tokenizer_info_json: Callable[[], bytes]):
        self._tokenizer_info_json = tokenizer_info_json
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._closed = False

    @property
    def zygote_pid(self) -> int | None:
        zygote = self._zygote
        return zygote.pid if zygote is not None and zygote.poll() is None else None

    def start_worker(self, threads: int, memory: int) -> _Worker:
        """A new worker with `threads` compile threads that may allocate `memory` bytes beyond what it inherits."""
        with self._lock:
            for attempt in (1, 2):
                if self._closed:
                    raise CompilerUnavailable(SHUTTING_DOWN)
                try:
                    if self._zygote is None or self._zygote.poll() is not None:
                        self._start_zygote()
                        if self._closed:
                            raise EOFError(SHUTTING_DOWN)
                    send_frame(self._control, b"F%d %d" % (threads, memory))
                    return _Worker(*receive_worker(self._control))
                except (EOFError, OSError) as e:  # socket.timeout is an OSError
                    self._stop_zygote()
                    if self._closed:
                        raise CompilerUnavailable(SHUTTING_DOWN) from None
                    if attempt == 2:
                        raise CompilerUnavailable(
                            f"the grammar compiler process failed to start: {e}"
                        ) from None
                    log.warning("the grammar compiler zygote failed (%s); starting it again", e)
        raise AssertionError("unreachable")

    def _start_zygote(self) -> None:
        started = time.monotonic()
        ours, theirs = socket.socketpair()
        try:
            self._zygote = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_MAIN % theirs.fileno()],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control = ours
        try:
            ours.settimeout(COMPILER_START_TIMEOUT_S)
            if recv_frame(ours, 16) != b"R":
                raise OSError("the grammar compiler zygote sent an unexpected greeting")
            send_frame(ours, self._tokenizer_info_json())
            ours.settimeout(WORKER_FORK_TIMEOUT_S)
        except BaseException:
            self._stop_zygote()
            raise
        log.info(
            "grammar compiler zygote started (pid %d) in %.1f s",
            self._zygote.pid,
            time.monotonic() - started,
        )

    def _stop_zygote(self) -> None:
        control, zygote = self._control, self._zygote
        self._control = self._zygote = None
        if control is not None:
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
            control.close()
        if zygote is not None:
            with contextlib.suppress(OSError):
                zygote.kill()  # its workers get SIGKILL from the kernel (PR_SET_PDEATHSIG)
            with contextlib.suppress(subprocess.TimeoutExpired):
                zygote.wait(1.0)

    def close(self) -> None:
        """Stop the zygote, hence every worker; does not wait for a start in progress (it fails)."""
        self._closed = True
        control, zygote = self._control, self._zygote
        if control is not None:
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)
        if zygote is not None:
            with contextlib.suppress(OSError):
                zygote.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                zygote.wait(1.0)


def grammar_backend(
    args: ServerArgs, model: executor_pb2.ExecutorModelInfo
) -> GrammarBackend | None:
    """The scheduler's backend for the served model; None without a tokenizer."""
    if args.skip_tokenizer_init:
        return None
    return GrammarBackend(
        lambda: load_tokenizer(tokenizer_folder(args)),
        model.vocab_size,
        list(model.eos_token_ids),
        GrammarLimits.from_args(args),
    )


async def request_grammar(
    backend: GrammarBackend | None, sampling: SamplingParams
) -> RequestGrammar | None:
    """The request's matcher (None if unconstrained), compiled in a worker process (compile_async):
    the step loop never waits for it. Raises InvalidConstraint, CompileBusy or CompilerUnavailable."""
    constraint = sampling.constraint
    if constraint is None:
        return None
    if backend is None:
        raise InvalidConstraint(
            "structured output needs the tokenizer (the server runs with --skip-tokenizer-init)"
        )
    compiled = await backend.compile_async(constraint)
    return RequestGrammar(compiled, backend.vocab_size)  # ~1 ms
