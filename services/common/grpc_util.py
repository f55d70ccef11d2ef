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
    ("grpc.keepalive_time_ms", 30000),
    # A name that resolves to several replicas (dns:///tokenizer:30011 in compose, a headless
    # Service in Kubernetes) spreads calls over all of them instead of pinning the first.
    ("grpc.lb_policy_name", "round_robin"),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
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


settings = GrpcSettings()


def install(client_interceptors=(), server_interceptors=(), channel_credentials=None,
            server_credentials=None, inter_service_interceptors=(), public_server_credentials=None) -> None:
    """Add interceptors and set credentials for the channels and servers made from now on."""
    settings.client_interceptors.extend(client_interceptors)
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


def aio_channel(addr: str, interceptors: list[grpc.aio.ClientInterceptor] | None = None) -> grpc.aio.Channel:
    """A channel with the installed interceptors first, then these."""
    interceptors = [*settings.client_interceptors, *(interceptors or [])] or None
    if settings.channel_credentials is not None:
        return grpc.aio.secure_channel(addr, settings.channel_credentials, options=CHANNEL_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS, interceptors=interceptors)


def aio_server(interceptors: list[grpc.aio.ServerInterceptor] | None = None, public: bool = False) -> grpc.aio.Server:
    """A server with the installed interceptors first, then these; a public one (for clients outside
    the deployment) leaves out the inter-service ones."""
    inter_service = [] if public else settings.inter_service_interceptors
    chain = [*inter_service, *settings.server_interceptors, *(interceptors or [])]
    return grpc.aio.server(interceptors=chain or None, options=SERVER_OPTIONS)


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
