"""Tokenizer and detokenizer replicas behind one gateway: calls are spread round robin, and a replica
that dies is failed over to the others."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import httpx
import pytest

from radixserve.v1 import detokenizer_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from radixserve.gateway.pipeline.replicas import ReplicaSet, parse_addrs
from tests.gateway.fakes import (
    FakeBackends,
    FakeDetokenizer,
    FakeTokenizer,
    RunningGateway,
    expected_output,
)


class Counted:
    """Counts the calls a fake servicer answers."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def count(self):
        with self._lock:
            self.calls += 1


class CountedTokenizer(FakeTokenizer, Counted):
    def Encode(self, request, context):
        self.count()
        return super().Encode(request, context)

    def ApplyChatTemplate(self, request, context):
        self.count()
        return super().ApplyChatTemplate(request, context)


class CountedDetokenizer(FakeDetokenizer, Counted):
    def Decode(self, request, context):
        self.count()
        return super().Decode(request, context)


def serve(add, servicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack():
    backends = FakeBackends()
    tokenizers = [CountedTokenizer(), CountedTokenizer()]
    detokenizers = [CountedDetokenizer(), CountedDetokenizer()]
    servers = [serve(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, t) for t in tokenizers]
    servers += [
        serve(detokenizer_pb2_grpc.add_DetokenizerServicer_to_server, d) for d in detokenizers
    ]
    backends.tokenizer_addr = f"{servers[0][1]},{servers[1][1]}"
    backends.detokenizer_addr = f"{servers[2][1]}, {servers[3][1]}"
    gateway = RunningGateway(backends)
    yield gateway, tokenizers, detokenizers, [server for server, _ in servers]
    gateway.close()
    for server, _ in servers:
        server.stop(0)
    backends.stop()


def chat(gateway, i: int, stream: bool = False) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/v1/chat/completions",
        timeout=30,
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": f"hello {i}"}],
            "max_tokens": 8,
            "stream": stream,
        },
    )


def test_both_replicas_serve_then_the_survivors_take_over(stack):
    gateway, tokenizers, detokenizers, servers = stack
    for i in range(6):
        resp = chat(gateway, i, stream=i % 2 == 1)
        assert resp.status_code == 200, resp.text
    assert all(t.calls >= 2 for t in tokenizers), [t.calls for t in tokenizers]
    assert all(d.calls >= 2 for d in detokenizers), [d.calls for d in detokenizers]

    servers[1].stop(0).wait()  # the second tokenizer and detokenizer replicas die
    servers[3].stop(0).wait()
    before = [tokenizers[1].calls, detokenizers[1].calls]
    stubs = gateway.gateway.engine.stubs()
    tried = [stubs.tokenizer.calls[1], stubs.detokenizer.calls[1]]
    for i in range(6):
        resp = chat(gateway, 10 + i, stream=i % 2 == 1)
        assert resp.status_code == 200, resp.text
        if i % 2 == 0:
            assert resp.json()["choices"][0]["message"]["content"] == expected_output(8)
    assert [tokenizers[1].calls, detokenizers[1].calls] == before
    # The dead replicas were tried (and their calls went on to the live ones).
    assert stubs.tokenizer.calls[1] > tried[0] and stubs.detokenizer.calls[1] > tried[1]


def test_parse_addrs():
    assert parse_addrs(" a:1, b:2 ,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        parse_addrs(" , ")


class ScriptedStub:
    """A stub whose Encode answers from a script of results and status codes."""

    def __init__(self, channel, script):
        self.script = script
        self.seen = 0

    async def Encode(self, request, timeout=None):
        self.seen += 1
        outcome = self.script.pop(0)
        if isinstance(outcome, grpc.StatusCode):
            raise grpc.aio.AioRpcError(
                outcome, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted"
            )
        return outcome


def scripted_replicas(*scripts) -> tuple[ReplicaSet, list[ScriptedStub]]:
    scripts = list(scripts)
    replicas = ReplicaSet(
        [f"r{i}:1" for i in range(len(scripts))],
        lambda ch: ScriptedStub(ch, scripts.pop(0)),
        channel=lambda addr: None,
    )
    return replicas, replicas.stubs


def test_only_unavailable_is_retried_and_the_last_error_reaches_the_caller():
    async def body():
        request = tokenizer_pb2.TokenizerEncodeRequest(texts=["x"])
        replicas, stubs = scripted_replicas([grpc.StatusCode.INVALID_ARGUMENT], ["unused"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await replicas.Encode(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and stubs[1].seen == 0

        replicas, stubs = scripted_replicas(
            [grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.UNAVAILABLE]
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await replicas.Encode(request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and [s.seen for s in stubs] == [1, 1]

        # r0 failed a moment ago: on its next turn (the third call) r1 goes first.
        replicas, stubs = scripted_replicas([grpc.StatusCode.UNAVAILABLE], ["b1", "b2", "b3"])
        assert [await replicas.Encode(request) for _ in range(3)] == ["b1", "b2", "b3"]
        assert [s.seen for s in stubs] == [1, 3]

    asyncio.run(body())
