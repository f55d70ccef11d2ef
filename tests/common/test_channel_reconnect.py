"""grpc_util's channels keep their connections to themselves: a new channel to an address whose earlier
server went away (a restarted stage, or a port the OS handed out again) reaches the server listening
there now, even while an older channel to that address still waits out its reconnect backoff."""

from __future__ import annotations

import asyncio

import grpc

from radixserve.common.grpc_util import aio_channel

METHOD = "/test.Echo/Unary"


def same(b: bytes) -> bytes:
    return b


async def echo_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    async def unary(request, context):
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary, same, same)}
            ),
        )
    )
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def test_a_new_channel_reaches_a_new_server_on_a_reused_address(clean_grpc):
    async def body():
        first, port = await echo_server()
        old = aio_channel(f"127.0.0.1:{port}")
        assert await old.unary_unary(METHOD, same, same)(b"a", timeout=5) == b"a"
        await first.stop(None)
        try:
            await old.unary_unary(METHOD, same, same)(b"b", timeout=1)
        except grpc.aio.AioRpcError as e:  # the old channel now backs off before reconnecting
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        second, _ = await echo_server(port)
        new = aio_channel(f"127.0.0.1:{port}")
        try:  # a fail-fast call (no wait_for_ready), as most of the services' calls are
            assert await new.unary_unary(METHOD, same, same)(b"c", timeout=5) == b"c"
        finally:
            await old.close()
            await new.close()
            await second.stop(None)

    asyncio.run(body())
