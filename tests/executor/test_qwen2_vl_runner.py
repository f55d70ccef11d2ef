"""Qwen2-VL and Qwen2.5-VL through the image pipeline against transformers, on tiny random fp32
checkpoints saved as the hub's (tiny_qwen2_vl.py): the tokenizer service's core renders the chat
(pillow pictures, the image processor, placeholders expanded, M-RoPE positions and delta) and the real
ModelRunner runs it (image rows written into the placeholders, [3, T] positions): last-token logits of
prompts with one and with two images, a prefill chunked inside an image, prefix-cache hits ending
inside and after an image, and greedy tokens over several decode steps (positions p + delta) against
transformers' forward and generate. Decode steps of an M-RoPE request must take the plain forward,
never the fast CPU decode path (which reads [T] positions).

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
from radixserve.tokenizer.images import GridPlaceholderProcessor  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import SlotPool  # noqa: E402
from tests.executor.tiny_llava import picture  # noqa: E402
from tests.executor.tiny_qwen2_vl import KINDS, build_tiny_qwen2_vl  # noqa: E402

ATOL = 1e-4
SIZES = [(32, 24), (16, 24), (24, 8)]  # (width, height) of the pictures: 12, 6 and 3 image tokens


@pytest.fixture(scope="module", params=list(KINDS))
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_qwen2_vl(request.param, folder)
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device="cpu", max_total_tokens=2048, attention_backend="torch_native"
        ),
    )
    return hf, TokenizerCore(folder), runner


def chat(core: TokenizerCore, pictures: list[bytes], question: str = "What is this?"):
    parts = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": question}]
    parts = [p for i in parts for p in (i, {"type": "text", "text": " and "})][:-1]
    conv = Conversation(
        [{"role": "user", "content": parts}], add_generation_prompt=True, images=pictures
    )
    return core.apply_chat_template([conv])[0]


def pictures(*seeds: int) -> list[bytes]:
    return [picture(s, SIZES[i % len(SIZES)]) for i, s in enumerate(seeds)]


def hf_inputs(hf, r: RenderedChat) -> dict:
    input_ids = torch.tensor([r.ids])
    return dict(
        input_ids=input_ids,
        pixel_values=torch.cat([i.tensors.pixel_values for i in r.images]),
        image_grid_thw=torch.cat([i.tensors.extras["image_grid_thw"] for i in r.images]),
        mm_token_type_ids=(input_ids == hf.config.image_token_id).int(),
    )


def hf_last_logits(hf, r: RenderedChat) -> torch.Tensor:
    with torch.no_grad():
        return hf(**hf_inputs(hf, r)).logits[0, -1].float()


def new_request(rid: str, r: RenderedChat, ids, slots, **fields) -> NewRequest:
    return NewRequest(
        rid,
        ids,
        slots,
        images=r.images,
        mrope_positions=r.mrope_positions,
        mrope_position_delta=r.mrope_position_delta,
        **fields,
    )


def test_the_tokenizer_core_renders_images_and_mrope_positions(setup):
    hf, core, runner = setup
    assert isinstance(core.images.processor, GridPlaceholderProcessor)  # no torchvision here
    r = chat(core, pictures(1, 2))
    assert [i.length for i in r.images] == [12, 6]
    token = hf.config.image_token_id
    assert all(r.ids[i.offset : i.end] == [token] * i.length for i in r.images)
    assert r.ids.count(token) == 18
    inputs = hf_inputs(hf, r)
    expected, delta = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    )
    assert r.mrope_positions == expected[:, 0].reshape(-1).tolist()
    assert r.mrope_position_delta == int(delta) < 0


@pytest.mark.parametrize("count", [1, 2])
def test_logits_match_hf(setup, count):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, pictures(*range(count)))
    assert len(r.images) == count
    pool = SlotPool(runner.kv_slots)
    out = runner.step(
        StepInput(1, new_requests=[new_request("a", r, r.ids, pool.take(len(r.ids)))])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)
    # The image rows are freed with the prompt done; the M-RoPE positions stay for the decode steps.
    assert runner.image_inputs.requests["a"].images == []


def test_chunked_prefill_cut_inside_an_image(setup):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, pictures(3, 4))
    pool = SlotPool(runner.kv_slots, seed=1)
    cut = r.images[0].offset + r.images[0].length // 2
    out = runner.step(
        StepInput(1, new_requests=[new_request("x", r, r.ids[:cut], pool.take(cut), sample=False)])
    )
    assert out.outputs == []
    rest = len(r.ids) - cut
    out = runner.step(
        StepInput(2, continuing_requests=[ContinuingRequest("x", pool.take(rest), r.ids[cut:])])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)


@pytest.mark.parametrize("where", ["inside", "after"])
def test_prefix_hit_inside_or_after_an_image(setup, where):
    hf, core, runner = setup
    runner.reset()
    r = chat(core, pictures(5, 6))
    pool = SlotPool(runner.kv_slots, seed=2)
    slots = pool.take(len(r.ids))
    runner.step(StepInput(1, new_requests=[new_request("p", r, r.ids, slots)]))
    first = r.images[0]
    hit = first.offset + 1 if where == "inside" else first.end + 2
    out = runner.step(
        StepInput(
            2,
            finished_request_ids=["p"],
            new_requests=[
                new_request(
                    "q", r, r.ids[hit:], pool.take(len(r.ids) - hit), prefix_slots=slots[:hit]
                )
            ],
        )
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, r), atol=ATOL, rtol=0)


class RefusingFastDecode:
    """A fast decode path that claims every step and fails when used: M-RoPE steps must not take it."""

    def supports(self, batch) -> bool:
        return True

    def forward(self, batch):
        raise AssertionError("an M-RoPE step took the fast decode path")


def test_greedy_decode_matches_hf_generate(setup, monkeypatch):
    hf, core, runner = setup
    runner.reset()
    monkeypatch.setattr(runner, "fast_decode", RefusingFastDecode())
    r = chat(core, pictures(7, 8))
    steps = 8
    with torch.no_grad():
        expected = hf.generate(
            **hf_inputs(hf, r),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(r.ids) :].tolist()
    pool = SlotPool(runner.kv_slots, seed=3)
    out = runner.step(
        StepInput(1, new_requests=[new_request("g", r, r.ids, pool.take(len(r.ids)))])
    )
    got = [out.outputs[0].token_id]
    for step in range(steps - 1):
        out = runner.step(
            StepInput(step + 2, continuing_requests=[ContinuingRequest("g", pool.take(1))])
        )
        got.append(out.outputs[0].token_id)
    assert got == expected
    runner.step(StepInput(steps + 1, finished_request_ids=["g"]))
    assert runner.image_inputs.requests == {}


def test_no_fast_decode_kernels_are_built_for_an_m_rope_model(setup, caplog):
    from types import SimpleNamespace

    from radixserve.executor.fast_decode import FastDecode

    _, _, runner = setup
    bf16_cpu = SimpleNamespace(
        model=runner.model, device=torch.device("cpu"), dtype=torch.bfloat16, kv_pool=runner.kv_pool
    )
    with caplog.at_level("INFO", logger="radixserve.executor.fast_decode"):
        assert FastDecode.build(bf16_cpu) is None
    assert "M-RoPE positions not supported" in caplog.text


def test_readmitted_request_with_generated_tokens_continues_at_p_plus_delta(setup):
    """A retracted request comes back as a new one whose ids are its prompt and the tokens it had
    generated; its M-RoPE positions cover the prompt, the generated tokens take p + delta."""
    hf, core, runner = setup
    runner.reset()
    r = chat(core, pictures(9, 10))
    with torch.no_grad():
        expected = hf.generate(
            **hf_inputs(hf, r), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(r.ids) :].tolist()
    ids = r.ids + expected[:4]
    pool = SlotPool(runner.kv_slots, seed=4)
    out = runner.step(StepInput(1, new_requests=[new_request("h", r, ids, pool.take(len(ids)))]))
    assert out.outputs[0].token_id == expected[4]
    # transformers' positions of the whole sequence continue the prompt's as p + delta
    inputs = hf_inputs(hf, r)
    inputs["input_ids"] = torch.tensor([ids])
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == hf.config.image_token_id).int()
    with torch.no_grad():
        expected_logits = hf(**inputs).logits[0, -1].float()
    torch.testing.assert_close(out.logits[0], expected_logits, atol=ATOL, rtol=0)


def test_placeholders_that_do_not_fit_the_images_are_refused(setup):
    _, core, _ = setup
    two = "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(ValueError, match="do not fit the prompt"):
        core.with_images(two, pictures(1))
    with pytest.raises(ValueError, match="do not fit the prompt"):
        core.with_images("no image here", pictures(1))
    r = core.with_images(two, pictures(1, 2))
    assert [i.length for i in r.images] == [12, 6] and len(r.mrope_positions) == 3 * len(r.ids)
