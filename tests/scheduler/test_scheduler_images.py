"""The scheduler core with image prompts: the prefix cache keys image positions by the image's hash
(the same image and text hit, another image misses from its first placeholder on), every NewRequest of
the request carries its images, and image runs that do not fit the prompt are refused."""

import pytest
import torch

from radixserve.common.multimodal import ImageTensors, PromptImage, cache_key_ids
from radixserve.common.sampling import StoppingCriteria
from radixserve.scheduler.request import Request
from tests.scheduler.harness import Harness

IMAGE_TOKEN = 999
PROMPT = [5, 6, 7] + [IMAGE_TOKEN] * 6 + [8, 9, 10]


def image(h: int, offset: int = 3, length: int = 6) -> PromptImage:
    return PromptImage(ImageTensors(torch.full((1, 3, 2, 2), float(h))), offset, length, h)


def add(h: Harness, rid: str, images: list[PromptImage], prompt=PROMPT):
    h.sched.add_request(Request(rid, list(prompt), StoppingCriteria(3), images=images))


def test_same_image_hits_the_cache_and_another_image_does_not():
    h = Harness()
    add(h, "a", [image(11)])
    h.run()
    add(h, "same", [image(11)])
    h.run()
    add(h, "other", [image(12)])
    h.run()
    assert h.finals["same"].cached_tokens == len(PROMPT) - 1  # all but the token that samples
    assert h.finals["other"].cached_tokens == 3  # the text before the image only
    for rid, hash_ in (("a", 11), ("same", 11), ("other", 12)):
        new = h.new_plan_of(rid)
        assert [i.hash for i in new.images] == [
            hash_
        ]  # the executor gets the whole prompt's images
        assert new.input_ids == PROMPT[len(new.prefix_slots) :]  # real token ids, not cache keys


def test_cache_key_ids_replace_only_the_placeholders():
    key = cache_key_ids(PROMPT, [image(11)])
    assert key[:3] == PROMPT[:3] and key[9:] == PROMPT[9:]
    assert len(set(key[3:9])) == 1 and key[3] < 0
    assert cache_key_ids(PROMPT, [image(12)])[3] != key[3]
    assert cache_key_ids(PROMPT, []) == PROMPT


@pytest.mark.parametrize(
    "images",
    [[image(1, offset=10, length=6)], [image(1, 3, 4), image(2, 5, 2)], [image(1, 3, 0)]],
    ids=["past-the-end", "overlapping", "empty"],
)
def test_image_runs_outside_the_prompt_are_refused(images):
    h = Harness()
    with pytest.raises(ValueError, match="placeholder run"):
        add(h, "bad", images)
    assert h.sched.requests == {}


def test_grpc_generate_with_images_and_bad_images():
    """Over gRPC (a fake executor): a request with an image is served; a run outside the prompt or a
    tensor that does not decode is INVALID_ARGUMENT."""
    import grpc

    from radixserve.common.multimodal import prompt_image_to_proto
    from radixserve.v1 import common_pb2, scheduler_pb2
    from tests.scheduler.server_stack import run, stack

    def request(rid, images):
        return scheduler_pb2.SchedulerGenerateRequest(
            request_id=rid,
            input_ids=PROMPT,
            stopping=common_pb2.StoppingCriteria(max_new_tokens=2),
            images=images,
        )

    async def scenario():
        async with stack() as (stub, executor, _):
            good = [prompt_image_to_proto(image(11))]
            out = [m async for m in stub.Generate(request("ok", good))]
            assert out[-1].finish_reason and out[-1].usage.prompt_tokens == len(PROMPT)
            broken = prompt_image_to_proto(image(12))
            broken.tensors.pixel_values.dtype = "float99"
            for rid, images in (
                ("past", [prompt_image_to_proto(image(1, offset=10))]),
                ("broken", [broken]),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    _ = [m async for m in stub.Generate(request(rid, images))]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rid

    run(scenario())
