"""HTTP/1.1 connection limits that uvicorn's httptools protocol lacks, as a small subclass of it.

uvicorn closes idle kept-alive connections (--http-keep-alive-timeout, passed on as its
timeout_keep_alive), but bounds neither the request head nor the connections themselves:

- Head size. httptools buffers a header until it ends, so one endless header grew memory without
  bound. Here the bytes of a head are counted as they arrive and the parser is fed at most
  --http-max-header-bytes of it; a longer head, or more than --http-max-headers header fields, gets 431.
  (The count starts when a request's first byte is read; bytes pipelined behind an earlier request in the
  same read are counted from the next read on, so a head costs at most the limit plus one read.)
- Head time (slowloris). A connection that had not sent a whole head stayed open forever. A head not
  complete within --http-header-timeout seconds (counted from the connection's opening, or on a kept-alive
  connection from the first byte of the next request) ends the connection, with a 408 if part of the head
  had arrived. The wait between requests is the keep-alive timeout's.
- Connections. Each one holds a file descriptor, and once they ran out the gateway could accept no
  connection at all, /health included. Past --http-max-connections open connections (default: from the
  open-file limit, see default_max_connections) a new connection is answered 503 at once and closed;
  the connections under the limit are served as before.

Each refusal is an OpenAI-shaped JSON error with `Connection: close`. The server then reads no more
requests from that connection but, for up to LINGER_S and LINGER_MAX_BYTES, drops what the client is still
sending, so the client reads the answer instead of a connection reset. Refusals are logged as a warning at most once per
WARN_INTERVAL_S per kind (with a count), so that an attack does not flood the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from radixserve.gateway.api.errors import RETRY_AFTER_S, ApiError

log = logging.getLogger("radixserve.gateway.http")

LINGER_S = (
    1.0  # how long a refused connection's remaining input is read and dropped before closing it
)
# ... and how much of it: a client streaming a huge header has megabytes in flight when its 431 leaves, and
# reading them all cost the gateway more CPU than the rest of the refusal. Past this the connection is reset
# (the answer is in the client's receive queue by then).
LINGER_MAX_BYTES = 256 * 1024
MIN_FD_HEADROOM = (
    128  # descriptors kept for what is not a client connection (gRPC channels, files, ...)
)
MAX_DEFAULT_CONNECTIONS = (
    65536  # the derived default never exceeds this, however high the open-file limit
)
WARN_INTERVAL_S = 10.0


def default_max_connections(open_files: int | None = None) -> int:
    """Client connections allowed by default: the soft RLIMIT_NOFILE less 1/8 of it (at least
    MIN_FD_HEADROOM, at most half of it) for the process's other descriptors, capped at MAX_DEFAULT_CONNECTIONS.
    1024 open files give 896 connections."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY or open_files <= 0:
        return MAX_DEFAULT_CONNECTIONS
    headroom = min(max(MIN_FD_HEADROOM, open_files // 8), open_files // 2)
    return max(1, min(MAX_DEFAULT_CONNECTIONS, open_files - headroom))


@dataclass
class HttpLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0  # enforced by uvicorn itself (timeout_keep_alive)
    max_connections: int = field(default_factory=default_max_connections)
    # Connections past max_connections still being answered 503 (they linger up to LINGER_S); past this
    # many, a further one is closed at once without an answer.
    max_refusing: int = 0
    refusing: int = 0
    _warned: dict = field(
        default_factory=dict
    )  # kind -> (time of the last warning, refusals not logged since)

    def __post_init__(self):
        for name in (
            "max_header_bytes",
            "max_headers",
            "header_timeout",
            "keep_alive_timeout",
            "max_connections",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"--http-{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        self.max_refusing = self.max_refusing or max(8, self.max_connections // 32)

    @classmethod
    def from_args(cls, args) -> HttpLimits:
        return cls(
            max_header_bytes=args.http_max_header_bytes,
            max_headers=args.http_max_headers,
            header_timeout=args.http_header_timeout,
            keep_alive_timeout=args.http_keep_alive_timeout,
            max_connections=(
                default_max_connections()
                if args.http_max_connections is None
                else args.http_max_connections
            ),
        )

    def warn(self, kind: str, message: str, *log_args) -> None:
        """A warning for this kind of refusal, at most once per WARN_INTERVAL_S."""
        now = time.monotonic()
        last, unlogged = self._warned.get(kind, (float("-inf"), 0))
        if now - last < WARN_INTERVAL_S:
            self._warned[kind] = (last, unlogged + 1)
            return
        self._warned[kind] = (now, 0)
        suffix = f" ({unlogged} more since the last such warning)" if unlogged else ""
        log.warning(message + suffix, *log_args)


def http_error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI-shaped error, closing the connection."""
    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _HeadRejected(Exception):
    """Raised from a parser callback to stop parsing a head that broke a limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of HttpLimits; use protocol_class() to bind them."""

    limits: HttpLimits

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests, or reading a request head
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._rejection: tuple[int, str, str] | None = (
            None  # set by a parser callback that broke a limit
        )
        self._discarding = (
            False  # answered with an error: further input is dropped until the connection closes
        )
        self._dropped_bytes = 0  # input dropped while lingering
        self._over_limit = False  # beyond max_connections: never served
        self._counted_refusing = False

    # ---- connections ----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.limits
        if len(self.connections) < limits.max_connections:
            super().connection_made(transport)
            self._arm_head_timer()
            return
        self.transport = transport
        self._over_limit = True
        limits.warn(
            "connections",
            "%d HTTP connections open (--http-max-connections); refusing new ones with 503",
            len(self.connections),
        )
        if limits.refusing >= limits.max_refusing:
            transport.abort()
            return
        limits.refusing += 1
        self._counted_refusing = True
        self._answer_and_linger(
            http_error_response(
                503,
                f"The server has too many open connections ({limits.max_connections}); retry later.",
                "too_many_connections",
                {"retry-after": str(RETRY_AFTER_S)},
            )
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        if self._over_limit:
            if self._counted_refusing:
                self.limits.refusing -= 1
                self._counted_refusing = False
            return
        super().connection_lost(exc)

    def _answer_and_linger(self, response: bytes) -> None:
        """Write a last response, then drop the client's input until it closes (or LINGER_S has passed)."""
        self._discarding = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.transport.write(response)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the client reads the response, then the end of the stream
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.abort)

    # ---- reading ----

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._dropped_bytes += len(data)
            if self._dropped_bytes > LINGER_MAX_BYTES and self._linger_timer is not None:
                self.transport.abort()
            return
        self._unset_keepalive_if_required()
        limit = self.limits.max_header_bytes
        while data and not self._discarding and not self.transport.is_closing():
            if self._in_head:
                if self._head_timer is None:
                    self._arm_head_timer()
                piece, data = data[: limit - self._head_bytes], data[limit - self._head_bytes :]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
            if not self._feed(piece):
                return
            if self._in_head and self._head_bytes >= limit and not self.transport.is_closing():
                self._reject(
                    431,
                    f"The request head is larger than the server's limit of {limit} bytes.",
                    "request_header_fields_too_large",
                )

    def _feed(self, data: bytes) -> bool:
        """Feed the parser as uvicorn does; False once the connection stops being read as HTTP/1.1."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            if self._rejection is not None:
                self._reject(*self._rejection)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return False
        return True

    def _reject(self, status: int, message: str, code: str) -> None:
        self.limits.warn(code, "refused an HTTP request from %s: %s", _peer(self.client), message)
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier (pipelined) request's response is still being written: no room for an answer.
            self._discarding = True
            self.transport.close()
            return
        self._answer_and_linger(http_error_response(status, message, code))

    # ---- parser callbacks ----

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._rejection = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._rejection = (
                431,
                f"The request has more than the server's limit of {self.limits.max_headers} "
                "header fields.",
                "request_header_fields_too_large",
            )
            raise _HeadRejected()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    # ---- the header timeout ----

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self._discarding or not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits behind a response in progress
            return
        self.limits.warn(
            "header_timeout",
            "closed an HTTP connection from %s that sent no complete request head "
            "within %gs (--http-header-timeout)",
            _peer(self.client),
            self.limits.header_timeout,
        )
        self._discarding = True
        if self._head_bytes:
            self.transport.write(
                http_error_response(
                    408,
                    f"The request head did not arrive within {self.limits.header_timeout:g}s.",
                    "request_timeout",
                )
            )
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for uvicorn.Config(http=...) with these limits (shared by its connections)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
