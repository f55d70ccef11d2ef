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
