"""gRPC plumbing shared by the services: channel/server options and startup."""
from __future__ import annotations

import grpc

# Prompts of 100k+ tokens and batched responses exceed gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    ("grpc.keepalive_time_ms", 30000),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def aio_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


def sync_channel(addr: str) -> grpc.Channel:
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


def aio_server(interceptors: list[grpc.aio.ServerInterceptor] | None = None) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, addr: str) -> int:
    """Bind addr (host:port) and return the port; fail loudly if it is taken."""
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
