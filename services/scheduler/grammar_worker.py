"""Grammar compile processes: xgrammar compiles in C++ and cannot be interrupted, so the scheduler
compiles each constraint in a worker process that it kills when the compile runs past its time
limit, when its request ends, or when the scheduler stops.

The scheduler starts a *zygote* process (zygote_main): it imports xgrammar (and with it torch:
seconds), loads the tokenizer's vocabulary (TokenizerInfo, serialized by the scheduler) once, then
forks a worker whenever the scheduler asks for one, so a killed worker is replaced in milliseconds.
A worker compiles one constraint at a time and answers the compiled grammar serialized
(CompiledGrammar.serialize_json); the scheduler deserializes it.

Zygote and workers run at a lower CPU priority (WORKER_NICENESS) than the scheduler and executor.
The zygote exits when the scheduler closes its control socket (the scheduler exiting, even by
SIGKILL, closes it); a worker exits when its socket closes and is SIGKILLed by the kernel when the
zygote exits (PR_SET_PDEATHSIG), so no compile outlives the scheduler.

This module imports only the standard library and xgrammar.

Messages are frames: an 8-byte big-endian length, then that many bytes.
  control socket, zygote -> scheduler: b"R" once imported; then per fork: a 4-byte pid with the
      worker's socket attached (SCM_RIGHTS)
  control socket, scheduler -> zygote: first the TokenizerInfo JSON, then per fork b"F<threads> <memory bytes>"
  worker socket, scheduler -> worker: JSON [kind, spec]
  worker socket, worker -> scheduler: b"K" + the compiled grammar's JSON, or b"E" + the client-facing error
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import socket
import struct

import xgrammar as xgr

# OpenAI's json_object: any JSON object (what SGLang compiles it to as well).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
WORKER_NICENESS = 10  # the step loop and the executor come first when cores are scarce
MAX_TOKENIZER_INFO_BYTES = 256 << 20
MAX_REQUEST_BYTES = 64 << 20  # a constraint (the scheduler caps it far lower: --grammar-max-bytes)
# xgrammar's C++ errors start "[hh:mm:ss] /path/file.cc:123: ", checks then "Check failed: (...) is false: ".
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")
_HEADER = struct.Struct("!Q")
_PID = struct.Struct("!i")
_PR_SET_PDEATHSIG = 1


class InvalidConstraint(ValueError):
    """The constraint does not compile; the message is fit for the client."""


class FrameTooLarge(ValueError):
    """A frame announced more bytes than its reader accepts."""


def compile_constraint(compiler: xgr.GrammarCompiler, kind: str, spec: str) -> xgr.CompiledGrammar:
    """Compile one constraint; raises InvalidConstraint with a client-facing message."""
    try:
        if kind == "json_schema":
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "ebnf":
            return compiler.compile_grammar(spec)
    except (RuntimeError, MemoryError) as e:
        raise InvalidConstraint(failure_message(kind, e)) from None
    raise InvalidConstraint(f"unknown constraint kind {kind!r}")


def failure_message(kind: str, error: Exception) -> str:
    if isinstance(error, MemoryError) or "bad_alloc" in str(error):  # past the worker's RLIMIT_DATA
        return f"the {kind} needs too much memory to compile; simplify it"
    return f"invalid {kind}: {client_message(error)}"


def client_message(error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_LOG_PREFIX.sub("", first_line)


# ---- frames ----------------------------------------------------------------------------------


def send_frame(sock: socket.socket, data: bytes) -> None:
    if len(data) < 65536:
        sock.sendall(_HEADER.pack(len(data)) + data)
    else:  # no copy of a big grammar
        sock.sendall(_HEADER.pack(len(data)))
        sock.sendall(data)


def recv_frame(sock: socket.socket, max_bytes: int) -> bytes:
    """One frame; EOFError when the peer closed, FrameTooLarge past max_bytes (nothing more read)."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > max_bytes:
        raise FrameTooLarge(f"a frame of {size} bytes, more than {max_bytes}")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, 1 << 20))
        if n == 0:
            raise EOFError("the peer closed the socket")
        got += n
    return bytes(buf)


# ---- the zygote and its workers -------------------------------------------------------------


def zygote_main(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the scheduler's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited workers
    try:
        send_frame(control, b"R")
        info = xgr.TokenizerInfo.deserialize_json(
            recv_frame(control, MAX_TOKENIZER_INFO_BYTES).decode()
        )
        while True:
            command = recv_frame(control, 64)
            if command[:1] != b"F":
                raise ValueError(f"unknown command {command[:1]!r}")
            threads, memory = map(int, command[1:].split())
            _fork_worker(control, info, max(1, threads), memory)
    except (EOFError, OSError):
        pass  # the scheduler is gone
    os._exit(0)


def _fork_worker(
    control: socket.socket, info: xgr.TokenizerInfo, threads: int, memory: int
) -> None:
    ours, theirs = socket.socketpair()
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control.close()
            ours.close()
            _die_with(zygote)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _limit_memory(memory)
            serve_compiles(
                theirs, xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            )
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    try:
        socket.send_fds(control, [_PID.pack(pid)], [ours.fileno()])
    finally:
        ours.close()


def _limit_memory(extra: int) -> None:
    """Cap the worker's heap at what it has now (inherited from the zygote) plus `extra`: a
    constraint that makes the compiler allocate without bound fails (its worker answers an error or
    dies) instead of exhausting the machine's memory."""
    try:
        with open("/proc/self/status") as f:
            data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
        limit = data_kb * 1024 + extra
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (OSError, ValueError, StopIteration):
        pass


def _die_with(parent: int) -> None:
    """SIGKILL when the zygote exits (it does when the scheduler goes): a compile never outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it exited before prctl took effect
        os._exit(0)


def serve_compiles(sock: socket.socket, compiler: xgr.GrammarCompiler) -> None:
    """A worker: compile what arrives on sock, one at a time, until it closes."""
    while True:
        try:
            kind, spec = json.loads(recv_frame(sock, MAX_REQUEST_BYTES))
        except (EOFError, OSError):
            return
        try:
            reply = b"K" + compile_constraint(compiler, kind, spec).serialize_json().encode()
        except InvalidConstraint as e:
            reply = b"E" + str(e).encode()
        except Exception as e:  # noqa: BLE001 - whatever xgrammar raises is the constraint's fault
            reply = b"E" + failure_message(kind, e).encode()
        try:
            send_frame(sock, reply)
        except OSError:
            return


def receive_worker(control: socket.socket) -> tuple[int, socket.socket]:
    """The scheduler's side of a fork: the worker's pid and socket."""
    data, fds, _flags, _addr = socket.recv_fds(control, _PID.size, 1)
    if not data:
        raise EOFError("the compiler zygote closed its socket")
    if not fds:
        raise OSError("the compiler zygote sent no socket")
    sock = socket.socket(fileno=fds[0])
    for extra in fds[1:]:
        os.close(extra)
    if len(data) < _PID.size:
        data += _recv_exactly(control, _PID.size - len(data))
    return _PID.unpack(data)[0], sock
