"""DecodeBatcher: concurrent detokenizer calls share batch RPCs and each gets its own result."""

import asyncio

import grpc

from radixserve.v1 import detokenizer_pb2
from radixserve.gateway.pipeline.decode_batcher import DecodeBatcher
from radixserve.gateway.api.errors import ApiError


class FakeDetokenizer:
    def __init__(self, fail: bool = False):
        self.batch_sizes: list[int] = []
        self.fail = fail

    async def exchange(self, method, request, timeout, lane):
        assert method == "DecodeStream" and lane == 0  # one batch in flight: one lane
        self.batch_sizes.append(len(request.items))
        await asyncio.sleep(0.01)
        if self.fail:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="detokenizer down",
            )
        return detokenizer_pb2.DetokenizerDecodeResponse(
            results=[
                detokenizer_pb2.DetokenizerDecodeResult(
                    request_id=item.request_id,
                    text="".join(chr(65 + t) for t in item.new_token_ids),
                )
                for item in request.items
            ]
        )


def item(rid: str, ids: list[int]) -> detokenizer_pb2.DetokenizerDecodeItem:
    return detokenizer_pb2.DetokenizerDecodeItem(request_id=rid, new_token_ids=ids)


def test_lone_call_is_sent_at_once_and_concurrent_calls_are_coalesced():
    async def run():
        fake = FakeDetokenizer()
        batcher = DecodeBatcher(lambda: fake, timeout_s=5)
        first = await batcher.decode(item("solo", [0]))
        results = await asyncio.gather(
            *(batcher.decode(item(f"r{i}", [i % 26, (i + 1) % 26])) for i in range(16))
        )
        return fake, batcher, first, results

    fake, batcher, first, results = asyncio.run(run())
    assert first.request_id == "solo" and first.text == "A"
    assert [r.request_id for r in results] == [f"r{i}" for i in range(16)]
    assert all(r.text == chr(65 + i % 26) + chr(65 + (i + 1) % 26) for i, r in enumerate(results))
    assert fake.batch_sizes[0] == 1 and sum(fake.batch_sizes) == 17
    assert batcher.rpcs <= 3, fake.batch_sizes


def test_cancelled_caller_does_not_disturb_the_others():
    async def run():
        fake = FakeDetokenizer()
        batcher = DecodeBatcher(lambda: fake, timeout_s=5)
        doomed = asyncio.create_task(batcher.decode(item("doomed", [1])))
        others = [asyncio.create_task(batcher.decode(item(f"r{i}", [i]))) for i in range(4)]
        await asyncio.sleep(0)
        doomed.cancel()
        return await asyncio.gather(*others)

    results = asyncio.run(run())
    assert [r.text for r in results] == ["A", "B", "C", "D"]


def test_rpc_failure_reaches_every_caller_of_the_batch_as_503():
    async def run():
        batcher = DecodeBatcher(lambda: FakeDetokenizer(fail=True), timeout_s=5)
        return await asyncio.gather(
            *(batcher.decode(item(f"r{i}", [i])) for i in range(3)), return_exceptions=True
        )

    errors = asyncio.run(run())
    assert all(isinstance(e, ApiError) and e.status == 503 for e in errors), errors
