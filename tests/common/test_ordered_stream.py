"""common/ordered_stream.py: a unary handler served over a bidirectional stream (answer_in_order) and
its client (OrderedExchange), over real grpc.aio on loopback with byte messages."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from radixserve.common.ordered_stream import OrderedExchange, answer_in_order

METHOD = "/test.Echo/Stream"


def same(b: bytes) -> bytes:
    return b


class Echo:
    """The unary handler: answers b"<request>!" after the delay the request names (b"slow:0.2"), aborts
    with INVALID_ARGUMENT on b"bad", hangs on b"hang"; records what runs at once and what was cancelled."""

    def __init__(self):
        self.running = 0
        self.most_running = 0
        self.cancelled: list[bytes] = []
        self.handled: list[bytes] = []

    async def __call__(self, request: bytes, context) -> bytes:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if request == b"bad":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
            if request == b"hang":
                await asyncio.Event().wait()
            if request.startswith(b"slow:"):
                await asyncio.sleep(float(request[5:]))
            self.handled.append(request)
            return request + b"!"
        except asyncio.CancelledError:
            self.cancelled.append(request)
            raise
        finally:
            self.running -= 1


async def serve(echo: Echo) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    async def stream(requests, context):
        async for answer in answer_in_order(echo, requests, context):
            yield answer

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream, same, same)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def run(body):
    async def main():
        echo = Echo()
        server, channel = await serve(echo)
        try:
            await body(echo, OrderedExchange(channel.stream_stream(METHOD, same, same)))
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(main())


def test_answers_come_in_request_order_while_requests_are_handled_at_once():
    async def body(echo, exchange):
        futures = [await exchange.send(r) for r in (b"slow:0.3", b"slow:0.1", b"fast")]
        assert [await exchange.wait(f, 5) for f in futures] == [
            b"slow:0.3!",
            b"slow:0.1!",
            b"fast!",
        ]
        assert echo.handled[0] == b"fast"  # handled out of order, answered in order
        assert echo.most_running == 3
        assert await exchange.exchange(b"again", 5) == b"again!"
        assert exchange.streams_opened == 1 and exchange.pending == 0

    run(body)


def test_an_abort_ends_the_stream_with_its_status_and_the_next_send_opens_a_new_one():
    async def body(echo, exchange):
        bad = await exchange.send(b"bad")
        after = await exchange.send(b"slow:0.5")  # sent before the abort ends the stream
        for future in (bad, after):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await exchange.wait(future, 5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "bad request"
        assert await exchange.exchange(b"ok", 5) == b"ok!"
        assert exchange.streams_opened == 2

    run(body)


def test_no_answer_in_time_closes_the_stream_and_cancels_the_handlers():
    async def body(echo, exchange):
        hung = await exchange.send(b"hang")
        queued = await exchange.send(b"slow:5")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await exchange.wait(hung, 0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await exchange.wait(queued, 5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the server sees the stream cancelled
            if len(echo.cancelled) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(echo.cancelled) == [b"hang", b"slow:5"]
        assert await exchange.exchange(b"ok", 5) == b"ok!"

    run(body)


def test_close_fails_pending_requests_as_cancelled():
    async def body(echo, exchange):
        pending = await exchange.send(b"hang")
        exchange.close()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await exchange.wait(pending, 5)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert exchange.pending == 0

    run(body)


def test_a_server_that_goes_away_fails_pending_requests_as_unavailable():
    async def main():
        echo = Echo()
        server, channel = await serve(echo)
        exchange = OrderedExchange(channel.stream_stream(METHOD, same, same))
        try:
            pending = await exchange.send(b"hang")
            await server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await exchange.wait(pending, 5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        finally:
            await channel.close()

    asyncio.run(main())
