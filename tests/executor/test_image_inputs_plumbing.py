"""The executor's side of the vision-language interface with a minimal fake model (a tiny Llama that says
`is_multimodal` and `uses_mrope`, whose `embed_images` returns its pixel rows): a request's M-RoPE
positions reach the model as [3, T] for the prompt, chunked or not, and as sequence position + delta in
all three rows past it; the image rows land at the placeholder positions, across prefill chunks and
behind a cached prefix; the proto round trip of a step keeps all of it; bad image runs fail the step
before anything changes."""

import json

import pytest
import torch

from radixserve.common.multimodal import (
    ImageTensors,
    PromptImage,
    image_hash,
    image_tensors_from_proto,
    image_tensors_to_proto,
)
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput
from radixserve.common.step_convert import step_from_proto, step_to_proto
from radixserve.executor.models import registry
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.executor.tiny_llama import TINY_CONFIG

HIDDEN = TINY_CONFIG["hidden_size"]
IMAGE_TOKEN = 100


class FakeMropeVL(LlamaForCausalLM):
    is_multimodal = True
    uses_mrope = True

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, input_ids, positions, input_embeds=None):
        self.seen.append(
            (positions.clone(), None if input_embeds is None else input_embeds.clone())
        )
        return super().forward(input_ids, positions[0], input_embeds)

    def embed_images(self, images):
        return [i.pixel_values[0] for i in images]


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODEL_REGISTRY, "FakeMropeVL", FakeMropeVL)
    config = dict(TINY_CONFIG, architectures=["FakeMropeVL"], image_token_id=IMAGE_TOKEN)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ModelRunner(
        tmp_path,
        runner_config(
            dtype="float32", device="cpu", load_format="dummy", random_seed=0, max_total_tokens=200
        ),
    )


def image(offset: int, length: int, value: float) -> PromptImage:
    t = ImageTensors(
        torch.full((1, length, HIDDEN), value), {"image_sizes": torch.tensor([[4, 6]])}
    )
    return PromptImage(t, offset, length, image_hash(t))


PROMPT = [5, 6, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8, 9]
MROPE = torch.tensor([[0, 1, 2, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 2, 3, 5, 6, 7]])
DELTA = -2


def new_request(**kw) -> NewRequest:
    fields = dict(images=[image(2, 3, 0.5)], mrope_positions=MROPE.flatten().tolist())
    fields.update(kw)
    return NewRequest(
        "r", fields.pop("ids", PROMPT), fields.pop("slots", list(range(1, 9))), **fields
    )


def roundtrip(step: StepInput) -> StepInput:
    return step_from_proto(step_to_proto(step))


def test_mrope_positions_and_image_rows_through_chunks_and_decode(runner):
    model = runner.model
    first = new_request(ids=PROMPT[:3], slots=[1, 2, 3], mrope_position_delta=DELTA, sample=False)
    runner.step(roundtrip(StepInput(1, new_requests=[first])))
    runner.step(roundtrip(StepInput(2, continuing_requests=[
        ContinuingRequest("r", [4, 5, 6, 7, 8], PROMPT[3:])
    ])))  # fmt: skip
    runner.step(roundtrip(StepInput(3, continuing_requests=[ContinuingRequest("r", [9])])))
    (pos1, emb1), (pos2, emb2), (pos3, emb3) = model.seen
    assert torch.equal(pos1, MROPE[:, :3]) and torch.equal(pos2, MROPE[:, 3:])
    assert torch.equal(pos3, torch.full((3, 1), 8 + DELTA))  # sequence position 8, plus delta
    # Image rows (0.5) at the placeholders: one in the first chunk, two in the second.
    assert torch.all(emb1[2] == 0.5) and not torch.all(emb1[1] == 0.5)
    assert torch.all(emb2[:2] == 0.5) and not torch.all(emb2[2] == 0.5)
    assert emb3 is None  # decode: plain token embeddings
    runner.step(StepInput(4, finished_request_ids=["r"]))
    assert runner.image_inputs.requests == {}


def test_cached_prefix_inside_the_image(runner):
    model = runner.model
    req = new_request(ids=PROMPT[3:], slots=[4, 5, 6, 7, 8], prefix_slots=[1, 2, 3])
    runner.step(StepInput(1, new_requests=[req]))
    positions, embeds = model.seen[-1]
    assert torch.equal(positions, MROPE[:, 3:])
    assert torch.all(embeds[:2] == 0.5) and not torch.all(embeds[2] == 0.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(images=[image(2, 4, 0.5)]), "embedding rows for"),
        (dict(images=[image(6, 3, 0.5)]), "placeholder run"),
        (dict(mrope_positions=[0, 1]), "not 3 rows"),
    ],
    ids=["rows-mismatch", "run-past-the-prompt", "mrope-shape"],
)
def test_bad_image_inputs_fail_the_step_cleanly(runner, fields, message):
    if message == "embedding rows for":  # the model returns 3 rows for a 4-token run
        fields["images"][0].tensors.pixel_values = torch.zeros(1, 3, HIDDEN)
    with pytest.raises(StepError, match=message):
        runner.step(StepInput(1, new_requests=[new_request(**fields)]))
    assert runner.states == {} and runner.image_inputs.requests == {}
    runner.step(StepInput(2, new_requests=[new_request()]))  # still serving


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_tensor_protos_round_trip(dtype):
    t = ImageTensors(
        torch.arange(24).reshape(2, 3, 4).to(dtype), {"image_grid_thw": torch.tensor([[1, 2, 3]])}
    )
    back = image_tensors_from_proto(image_tensors_to_proto(t))
    assert back.pixel_values.dtype == dtype and torch.equal(back.pixel_values, t.pixel_values)
    assert torch.equal(back.extras["image_grid_thw"], t.extras["image_grid_thw"])
    assert image_hash(back) == image_hash(t)
    other = ImageTensors(t.pixel_values, {"image_grid_thw": torch.tensor([[1, 3, 2]])})
    assert image_hash(other) != image_hash(t)
