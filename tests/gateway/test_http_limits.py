"""HTTP/1.1 limits of the gateway (services/gateway/http_limits.py), over raw sockets against a real
gateway on fake backends: request head size and header count (431), the header timeout (slowloris), the
keep-alive timeout, the connection limit, and one quiet log line for a client gone during its upload."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import socket
import time

import pytest

from radixserve.gateway.api.http_limits import (
    LINGER_S,
    MAX_DEFAULT_CONNECTIONS,
    HttpLimits,
    default_max_connections,
)
from tests.gateway.fakes import FakeBackends, RunningGateway


@pytest.fixture(scope="module")
def backends():
    fakes = FakeBackends()
    yield fakes
    fakes.stop()


@contextlib.contextmanager
def running(backends, **flags):
    gw = RunningGateway(backends, **flags)
    try:
        yield gw
    finally:
        gw.close()


def connect(gw, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.gateway.http_port), timeout=timeout)


def request(
    path: str = "/health",
    headers: list[tuple[str, str]] = (),
    method: str = "GET",
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"] + [
        f"{name}: {value}" for name, value in headers
    ]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response with a Content-Length body: (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole response came: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, value in (h.split(":", 1) for h in header_lines)
    }
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closed the connection (EOF or reset), reading and dropping data; None if it
    was still open after limit seconds."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def assert_error(status: int, headers: dict, body: bytes, expected_status: int, code: str) -> dict:
    assert status == expected_status, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def health(gw) -> int:
    with connect(gw) as sock:
        sock.sendall(request())
        return read_response(sock)[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def send_until_answered(sock: socket.socket, chunk: bytes, total: int) -> int:
    """Send up to total bytes of chunk repeated, stopping early once the server has answered."""
    sent = 0
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(chunk)
        except (ConnectionResetError, BrokenPipeError):
            break
        sent += len(chunk)
    return sent


# ---- head size and header count ----


def test_a_head_over_the_size_limit_gets_431_without_growing_memory(backends):
    with running(backends) as gw:  # the default limit: 64 KiB
        assert health(gw) == 200
        with connect(gw) as sock:
            sock.sendall(request(headers=[("X-Filler", "a" * 60_000)]))
            assert read_response(sock)[0] == 200  # under the limit

        with connect(gw) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(request(headers=[("X-Big", "a" * 200_000)]))
            error = assert_error(*read_response(sock), 431, "request_header_fields_too_large")
            assert "65536 bytes" in error["message"] and error["type"] == "invalid_request_error"
            assert closed_after(sock, 5) is not None

        # An endless header: the gateway stops reading it at the limit, and its memory stays put.
        before = rss_bytes()
        megabyte = b"b" * (1 << 20)
        for _ in range(3):
            with connect(gw) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Endless: ")
                sent = send_until_answered(sock, megabyte, 24 << 20)
                grown = rss_bytes() - before
                assert_error(*read_response(sock), 431, "request_header_fields_too_large")
                assert sent < 24 << 20, "the gateway read a 24 MB header without answering"
                assert grown < 8 << 20, (
                    f"the process grew by {grown >> 20} MB while a header streamed in"
                )
        assert health(gw) == 200


def test_a_refused_client_that_keeps_sending_is_reset_after_a_bounded_drain(backends):
    # After its 431 the gateway drops what the client still sends, so that the client gets to read the answer,
    # but only LINGER_MAX_BYTES of it: reading megabytes per refusal cost more CPU than the refusal itself.
    with running(backends) as gw, connect(gw) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Endless: ")
        chunk, sent, started = b"c" * 65536, 0, time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < 256 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        elapsed = time.monotonic() - started
        assert sent < 32 << 20 and elapsed < LINGER_S, (sent, elapsed)
        assert_error(
            *read_response(sock), 431, "request_header_fields_too_large"
        )  # still in the receive queue
        assert health(gw) == 200


def test_more_headers_than_the_limit_get_431(backends):
    with running(backends, http_max_headers=20) as gw:
        with connect(gw) as sock:  # Host + 19 = 20 header fields: at the limit
            sock.sendall(request(headers=[(f"X-H{i}", "v") for i in range(19)]))
            assert read_response(sock)[0] == 200
        with connect(gw) as sock:
            sock.sendall(request(headers=[(f"X-H{i}", "v") for i in range(20)]))
            error = assert_error(*read_response(sock), 431, "request_header_fields_too_large")
            assert "20 header fields" in error["message"]
            assert closed_after(sock, 5) is not None


def test_the_default_header_count_limit_is_100(backends):
    with running(backends) as gw:
        with connect(gw) as sock:
            sock.sendall(request(headers=[(f"X-H{i}", "v") for i in range(99)]))
            assert read_response(sock)[0] == 200
        with connect(gw) as sock:
            sock.sendall(request(headers=[(f"X-H{i}", "v") for i in range(100)]))
            assert_error(*read_response(sock), 431, "request_header_fields_too_large")


def test_the_head_limit_applies_to_each_head_not_to_pipelined_requests_or_bodies(backends):
    with running(backends, http_max_header_bytes=200) as gw:
        with connect(gw) as sock:
            sock.sendall(request() * 3)  # three heads in one packet, together over 200 bytes
            assert [read_response(sock)[0] for _ in range(3)] == [200, 200, 200]
            body = json.dumps(
                {"model": "fake-model", "prompt": "x" * 200, "max_tokens": 2}
            ).encode()
            sock.sendall(
                request("/v1/completions", method="POST", body=body)
            )  # head and body in one packet
            status, _, answer = read_response(sock)
            assert status == 200 and json.loads(answer)["choices"][0]["text"], answer
            sock.sendall(request(headers=[("X-Filler", "a" * 150)]))  # a head of 200 bytes and more
            error = assert_error(*read_response(sock), 431, "request_header_fields_too_large")
            assert "200 bytes" in error["message"]


# ---- timeouts ----


def test_a_head_not_complete_within_the_header_timeout_is_closed(backends):
    with running(backends, http_header_timeout=0.5) as gw:
        silent, partial, kept_alive = connect(gw), connect(gw), connect(gw)
        with silent, partial, kept_alive:
            partial.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
            kept_alive.sendall(request())
            assert read_response(kept_alive)[0] == 200
            kept_alive.sendall(b"GET /health HTTP/1.1\r\n")  # the next head, unfinished

            after = closed_after(silent, 5)
            assert after is not None and after < 3, after
            assert_error(*read_response(partial), 408, "request_timeout")
            assert closed_after(partial, 3) is not None
            assert_error(*read_response(kept_alive), 408, "request_timeout")
        assert health(gw) == 200


def test_an_idle_kept_alive_connection_closes_after_the_keep_alive_timeout(backends):
    with running(backends, http_keep_alive_timeout=0.5) as gw:
        with connect(gw) as sock:
            sock.sendall(request())
            assert read_response(sock)[0] == 200
            after = closed_after(sock, 4)
            assert after is not None and 0.3 < after < 3, after


# ---- the connection limit ----


def open_connections(gw) -> int:
    return len(gw.gateway.http.server_state.connections)


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_past_the_connection_limit_new_connections_get_503_and_the_others_are_served(backends):
    with (
        running(backends, http_max_connections=8, http_header_timeout=2.0) as gw,
        contextlib.ExitStack() as stack,
    ):
        keeper = stack.enter_context(connect(gw))
        keeper.sendall(request())
        assert read_response(keeper)[0] == 200
        idle = [stack.enter_context(connect(gw)) for _ in range(7)]
        for sock in idle:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert wait_until(lambda: open_connections(gw) == 8, 5)

        for _ in range(20):
            with connect(gw) as sock:
                sock.sendall(request())
                error = assert_error(*read_response(sock), 503, "too_many_connections")
                assert error["type"] == "service_unavailable_error"
                assert closed_after(sock, 3) is not None
        assert open_connections(gw) == 8
        assert wait_until(lambda: gw.gateway.http_limits.refusing == 0, 3)

        keeper.sendall(request())  # a connection under the limit keeps being served
        assert read_response(keeper)[0] == 200

        for sock in idle:  # the idle ones go at the header timeout, making room again
            assert closed_after(sock, 5) is not None
        assert health(gw) == 200


def test_a_flood_of_idle_sockets_does_not_stop_health(backends):
    with (
        running(backends, http_max_connections=16, http_header_timeout=0.5) as gw,
        contextlib.ExitStack() as stack,
    ):
        flood = [stack.enter_context(connect(gw)) for _ in range(120)]
        for sock in flood:
            assert (
                closed_after(sock, 5) is not None
            )  # at once, at the header timeout, or after lingering
        assert wait_until(
            lambda: open_connections(gw) == 0 and gw.gateway.http_limits.refusing == 0, 5
        )
        assert health(gw) == 200


def test_the_default_connection_limit_comes_from_the_open_file_limit(backends):
    assert default_max_connections(1024) == 896
    assert default_max_connections(256) == 128
    assert default_max_connections(100) == 50
    assert default_max_connections(1 << 30) == MAX_DEFAULT_CONNECTIONS
    assert default_max_connections(resource.RLIM_INFINITY) == MAX_DEFAULT_CONNECTIONS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert HttpLimits().max_connections == default_max_connections(soft)
    with pytest.raises(ValueError, match="http-max-connections"):
        HttpLimits(max_connections=0)
    with pytest.raises(ValueError, match="http-keep-alive-timeout"):
        HttpLimits(keep_alive_timeout=-1)
    with running(backends) as gw:
        assert gw.gateway.http_limits.max_connections == default_max_connections(soft)
        assert gw.gateway.http.config.timeout_keep_alive == 5.0


# ---- a client gone during its upload ----


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_gone_during_its_upload_makes_one_info_line(backends):
    with running(backends) as gw:
        handler = Records()
        loggers = [
            logging.getLogger(),
            logging.getLogger("uvicorn"),
        ]  # uvicorn's does not propagate to the root
        radixserve = logging.getLogger("radixserve")
        level = radixserve.level
        radixserve.setLevel(logging.INFO)
        for logger in loggers:
            logger.addHandler(handler)
        try:
            for path in ("/v1/chat/completions", "/v1/completions"):
                with connect(gw) as sock:
                    sock.sendall(
                        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                        + b"{"
                        * 1000
                    )
                    time.sleep(0.2)
            assert wait_until(
                lambda: sum("disconnected" in r.getMessage() for r in handler.records) >= 2, 5
            )
            time.sleep(0.3)
            assert health(gw) == 200
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            radixserve.setLevel(level)
        about = [r for r in handler.records if "disconnect" in r.getMessage().lower() or r.exc_info]
        assert [(r.levelno, r.exc_info) for r in about] == [(logging.INFO, None)] * 2, [
            (r.name, r.levelname, r.getMessage()) for r in about
        ]
        assert [r.getMessage() for r in about] == [
            "client disconnected while sending the body of POST /v1/chat/completions",
            "client disconnected while sending the body of POST /v1/completions",
        ]
        assert not [r for r in handler.records if r.levelno >= logging.WARNING]
