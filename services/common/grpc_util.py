"""gRPC plumbing shared by the services: channel/server options, credentials, interceptors, startup.

A service process installs its process-wide settings once at start (`install`): TLS credentials
and the interceptors of tracing and of the inter-service token. Every channel and server made here
afterwards uses them; with nothing installed, channels and servers are plain insecure ones with no
interceptor on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

# Prompts of 100k+ tokens and batched responses exceed gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    # A name that resolves to several replicas (dns:///tokenizer:30011 in compose, a headless
    # Service in Kubernetes) spreads calls over all of them instead of pinning the first.
    ("grpc.lb_policy_name", "round_robin"),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]

# Keepalive, one definition for both ends of every channel (channel_options, server_options): each end
# pings a connection every KEEPALIVE_TIME_MS, also while a long stream (the gateway's scheduler session,
# the scheduler's executor session) sits idle, and drops it when a ping goes unanswered for
# KEEPALIVE_TIMEOUT_MS. Servers accept pings up to twice that often: with gRPC's default policy (none
# more often than every 5 minutes without data) a server answers a client pinging every 30 s with
# GOAWAY too_many_pings after a few minutes of an idle stream, breaking the stream and its requests.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Reconnects to a stage that is down (restarting, still loading): gRPC's default back-off grows to
# 2 minutes between attempts, so a stage that came up late was reached up to half a minute after it
# was ready. Kept short (under a second between attempts, with gRPC's +-20% jitter); the calls that
# wait for a stage use wait_for_ready and so go out as soon as the channel connects.
RECONNECT_INITIAL_BACKOFF_MS = 100
RECONNECT_MAX_BACKOFF_MS = 800


def channel_options() -> list[tuple[str, object]]:
    """CHANNEL_OPTIONS with the keepalive and reconnect settings (read when a channel is made)."""
    return [
        *CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Unlimited: by default a client sends two pings without data between them, then none, so an
        # idle stream would stop being checked.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
        # Each channel its own connections: by default a process shares them across channels to the
        # same address, so a new channel to an address whose earlier server went away (a restarted
        # stage, a reused port) inherits the old connection's backoff and fails fast calls with
        # "failed to connect" although a server listens there now.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def server_options() -> list[tuple[str, object]]:
    """SERVER_OPTIONS with the ping policy that lets the clients' keepalive through, and the server's own
    keepalive (a client that vanished without closing its connection is noticed)."""
    return [
        *SERVER_OPTIONS,
        # The C core's name for the least interval between pings it accepts without data
        # (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS); gRPC's max_ping_strikes (2) stays.
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass
class GrpcSettings:
    """What every channel and server of this process uses (see install)."""

    client_interceptors: list = field(default_factory=list)  # grpc.aio.ClientInterceptor instances
    server_interceptors: list = field(default_factory=list)  # grpc.aio.ServerInterceptor instances
    channel_credentials: grpc.ChannelCredentials | None = None  # None: insecure channels
    server_credentials: grpc.ServerCredentials | None = None  # None: insecure ports
    # Left out of public servers (the gateway's API for clients): the inter-service token check.
    inter_service_interceptors: list = field(default_factory=list)
    public_server_credentials: grpc.ServerCredentials | None = None  # None: insecure public ports
    # The client interceptors for blocking channels (see channel), e.g. the inter-service token's.
    sync_client_interceptors: list = field(
        default_factory=list
    )  # grpc.UnaryUnaryClientInterceptor ...
    # Metadata that bidirectional calls opened with open_bidi send (the inter-service token): they carry
    # it themselves because a stream-stream client interceptor on grpc.aio routes every write through a
    # queue, a task and asyncio.wait (~30 us a message; scripts/bench_grpc_costs.py), and the services'
    # per-token hops are bidirectional streams.
    bidi_metadata: tuple = ()


settings = GrpcSettings()


def install(
    client_interceptors=(),
    server_interceptors=(),
    channel_credentials=None,
    server_credentials=None,
    inter_service_interceptors=(),
    public_server_credentials=None,
    sync_client_interceptors=(),
    bidi_metadata=(),
) -> None:
    """Add interceptors and set credentials for the channels and servers made from now on."""
    settings.client_interceptors.extend(client_interceptors)
    settings.bidi_metadata += tuple(bidi_metadata)
    settings.sync_client_interceptors.extend(sync_client_interceptors)
    settings.server_interceptors.extend(server_interceptors)
    settings.inter_service_interceptors.extend(inter_service_interceptors)
    if public_server_credentials is not None:
        settings.public_server_credentials = public_server_credentials
    if channel_credentials is not None:
        settings.channel_credentials = channel_credentials
    if server_credentials is not None:
        settings.server_credentials = server_credentials


def reset() -> None:
    """Back to plain insecure channels and servers (tests that install settings undo them)."""
    global settings
    settings = GrpcSettings()


def aio_channel(
    addr: str, interceptors: list[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    """A channel with the installed interceptors first, then these."""
    interceptors = [*settings.client_interceptors, *(interceptors or [])] or None
    if settings.channel_credentials is not None:
        return grpc.aio.secure_channel(
            addr, settings.channel_credentials, options=channel_options(), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(addr, options=channel_options(), interceptors=interceptors)


def open_bidi(method: grpc.aio.StreamStreamMultiCallable, **kwargs) -> grpc.aio.StreamStreamCall:
    """Open a bidirectional call (no request iterator: the caller writes) with the installed metadata."""
    if settings.bidi_metadata:
        kwargs["metadata"] = (*kwargs.get("metadata", ()), *settings.bidi_metadata)
    return method(**kwargs)


def channel(addr: str) -> grpc.Channel:
    """A blocking (non-asyncio) channel with the installed credentials and token, for synchronous
    clients (benchmarks, tests)."""
    if settings.channel_credentials is not None:
        plain = grpc.secure_channel(addr, settings.channel_credentials, options=channel_options())
    else:
        plain = grpc.insecure_channel(addr, options=channel_options())
    return grpc.intercept_channel(plain, *settings.sync_client_interceptors)


def aio_server(
    interceptors: list[grpc.aio.ServerInterceptor] | None = None, public: bool = False
) -> grpc.aio.Server:
    """A server with the installed interceptors first, then these; a public one (for clients outside
    the deployment) leaves out the inter-service ones."""
    inter_service = [] if public else settings.inter_service_interceptors
    chain = [*inter_service, *settings.server_interceptors, *(interceptors or [])]
    return grpc.aio.server(interceptors=chain or None, options=server_options())


def bind(server: grpc.aio.Server, addr: str, public: bool = False) -> int:
    """Bind addr (host:port) and return the port; fail loudly if it is taken. TLS when installed
    (for a public server: without client certificates)."""
    credentials = settings.public_server_credentials if public else settings.server_credentials
    if credentials is not None:
        port = server.add_secure_port(addr, credentials)
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {addr}")
    return port


async def start_aio_server(register, servicer, addr: str) -> tuple[grpc.aio.Server, int]:
    """Serve servicer (added with its generated add_*Servicer_to_server) on addr; port 0 picks one."""
    server = aio_server()
    register(servicer, server)
    port = bind(server, addr)
    await server.start()
    return server, port
