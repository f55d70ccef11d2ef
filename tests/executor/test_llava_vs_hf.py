"""LLaVA-family models against transformers on tiny random checkpoints: the tokenizer service's core
processes the chat (pillow pictures, the model's own HF processor, placeholder expansion) and our
ModelRunner runs the prompt, its image rows written into the placeholder positions; logits of prompts
with one and with two images, a prefill chunked through the middle of an image, a prefix-cache hit
covering part of an image and greedy decoding must match HF.

Tolerance: logits agree to atol 1e-4 (fp32; the differences come from op order).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from radixserve.tokenizer.conversation import Conversation  # noqa: E402
from radixserve.tokenizer.core import RenderedChat, TokenizerCore  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import SlotPool  # noqa: E402
from tests.executor.tiny_llava import build_tiny_llava, picture  # noqa: E402

ATOL = 1e-4
KINDS = ["llava", "llava_next", "llava_onevision"]


@pytest.fixture(scope="module", params=KINDS)
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_llava(request.param, folder)
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device="cpu", max_total_tokens=4096, attention_backend="torch_native"
        ),
    )
    core = (
        OnevisionCore(folder, hf, runner.model)
        if request.param == "llava_onevision"
        else TokenizerCore(folder)
    )
    return hf, core, runner


class OnevisionCore:
    """The tokenizer core's part for OneVision without its processor (tiny_llava.ONEVISION_NOTE): the
    image processor's tensors, the placeholder expanded to as many tokens as our embedding has rows
    (HF's forward refuses a count that differs from its own features)."""

    def __init__(self, folder, hf, model):
        import transformers

        self.images = transformers.AutoImageProcessor.from_pretrained(str(folder))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        self.hf = hf
        self.model = model

    def apply_chat_template(self, conversations):
        from radixserve.common.multimodal import ImageTensors, PromptImage, image_hash
        from radixserve.tokenizer.images import decode_image

        conv = conversations[0]
        text = self.tokenizer.apply_chat_template(
            conv.messages, add_generation_prompt=True, tokenize=False
        )
        token = self.hf.config.image_token_id
        pieces = text.split("<image>")
        ids = self.tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
        images = []
        for i, (data, piece) in enumerate(zip(conv.images, pieces[1:])):
            out = self.images([decode_image(data, i)], return_tensors="pt")
            t = ImageTensors(out["pixel_values"], {"image_sizes": out["image_sizes"]})
            with torch.no_grad():
                rows = self.model.embed_images([t])[0].shape[0]
            images.append(PromptImage(t, len(ids), rows, image_hash(t)))
            ids += [token] * rows + self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return [RenderedChat(text, ids, images)]


def chat(core: TokenizerCore, pictures: list[bytes], question: str = "What is this?"):
    parts = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": question}]
    # Text between the images keeps their placeholder runs apart.
    parts = [p for i in parts for p in (i, {"type": "text", "text": " and "})][:-1]
    conv = Conversation(
        [{"role": "user", "content": parts}], add_generation_prompt=True, images=pictures
    )
    return core.apply_chat_template([conv])[0]


def hf_inputs(r: RenderedChat) -> dict:
    inputs = {"input_ids": torch.tensor([r.ids])}
    if r.images:
        inputs["pixel_values"] = torch.cat([i.tensors.pixel_values for i in r.images])
        for name in r.images[0].tensors.extras:
            inputs[name] = torch.cat([i.tensors.extras[name] for i in r.images])
    return inputs


def hf_last_logits(hf, r: RenderedChat) -> torch.Tensor:
    with torch.no_grad():
        return hf(**hf_inputs(r)).logits[0, -1].float()


@pytest.mark.parametrize("count", [1, 2])
def test_logits_match_hf(setup, count):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, [picture(i) for i in range(count)])
    assert len(r.images) == count and all(i.length > 1 for i in r.images)
    pool = SlotPool(runner.kv_slots)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("a", r.ids, pool.take(len(r.ids)), images=r.images)])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)
    assert runner.image_inputs.requests == {}  # the image rows are freed with the prompt done


def test_different_images_give_different_logits(setup):
    hf, core, runner = setup
    runner.reset()
    a, b = chat(core, [picture(1)]), chat(core, [picture(2)])
    assert a.ids == b.ids and a.images[0].hash != b.images[0].hash
    pool = SlotPool(runner.kv_slots)
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("a", a.ids, pool.take(len(a.ids)), images=a.images),
                NewRequest("b", b.ids, pool.take(len(b.ids)), images=b.images),
            ],
        )
    )
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-3
    torch.testing.assert_close(out.logits[1], hf_last_logits(hf, b), atol=ATOL, rtol=0)


def test_chunked_prefill_through_an_image(setup):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, [picture(3), picture(4)])
    pool = SlotPool(runner.kv_slots, seed=1)
    cut = r.images[0].offset + r.images[0].length // 2  # the first chunk ends inside image 0
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("x", r.ids[:cut], pool.take(cut), sample=False, images=r.images)
            ],
        )
    )
    assert out.outputs == [] and "x" in runner.image_inputs.requests
    rest = len(r.ids) - cut
    out = runner.step(
        StepInput(2, continuing_requests=[ContinuingRequest("x", pool.take(rest), r.ids[cut:])])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)


def test_prefix_hit_inside_an_image(setup):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, [picture(5)])
    pool = SlotPool(runner.kv_slots, seed=2)
    slots = pool.take(len(r.ids))
    runner.step(StepInput(1, new_requests=[NewRequest("p", r.ids, slots, images=r.images)]))
    hit = r.images[0].offset + 1  # the cached prefix ends one token into the image
    out = runner.step(
        StepInput(
            2,
            finished_request_ids=["p"],
            new_requests=[
                NewRequest(
                    "q",
                    r.ids[hit:],
                    pool.take(len(r.ids) - hit),
                    prefix_slots=slots[:hit],
                    images=r.images,
                )
            ],
        )
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)


def test_greedy_tokens_match_hf_generate(setup):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, [picture(6), picture(7)])
    with torch.no_grad():
        expected = hf.generate(
            **hf_inputs(r), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(r.ids) :].tolist()
    pool = SlotPool(runner.kv_slots, seed=3)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("g", r.ids, pool.take(len(r.ids)), images=r.images)])
    )
    got = [out.outputs[0].token_id]
    for step in range(11):
        out = runner.step(
            StepInput(step + 2, continuing_requests=[ContinuingRequest("g", pool.take(1))])
        )
        got.append(out.outputs[0].token_id)
    assert got == expected


def test_images_for_a_text_only_model_are_refused(model_dir):
    from radixserve.common.step import StepError

    runner = ModelRunner(
        model_dir,
        runner_config(dtype="float32", device="cpu", load_format="dummy", max_total_tokens=64),
    )
    r_images = chat_images_stub()
    with pytest.raises(StepError, match="takes no images"):
        runner.step(
            StepInput(1, new_requests=[NewRequest("t", [1, 2, 3], [1, 2, 3], images=r_images)])
        )
    assert runner.states == {}


def chat_images_stub():
    from radixserve.common.multimodal import ImageTensors, PromptImage

    return [PromptImage(ImageTensors(torch.zeros(1, 3, 2, 2)), 1, 1, 7)]
