"""Qwen2-VL through the whole stack (`radixserve serve` on a tiny random Qwen2-VL saved as the hub's,
tiny_qwen2_vl.py; prefill chunks of 8 so that images straddle chunks, M-RoPE positions from the
tokenizer service to the executor): a streamed chat with an image data URL equal to the same chat
unstreamed and to transformers' greedy tokens, the prefix cache keyed by the image, and an image without a placeholder a 400 with
nothing leaked."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from radixserve.tokenizer.conversation import Conversation
from radixserve.tokenizer.core import TokenizerCore
from tests.e2e.test_vision_stack import cached, data_url, image_part, ok
from tests.executor.tiny_llava import picture
from tests.executor.tiny_qwen2_vl import build_tiny_qwen2_vl
from tests.stack import start_stack, stop_stack, wait_idle_and_check_no_leak

MODEL = "tiny-qwen2-vl"
QUESTION = {"type": "text", "text": "What is in this picture, in detail?"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vl")
    hf = build_tiny_qwen2_vl("qwen2_vl", folder / "model")
    running = start_stack(
        "--model-path",
        str(folder / "model"),
        "--served-model-name",
        MODEL,
        "--max-total-tokens",
        "2048",
        "--chunked-prefill-size",
        "8",
        log_path=str(folder / "serve.log"),
        timeout=180,
    )
    yield running, hf, folder / "model"
    stop_stack(running)


def body(parts: list[dict], **fields) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 6,
        "temperature": 0,
        **fields,
    }


def chat(stack, parts: list[dict], **fields) -> httpx.Response:
    return httpx.post(
        stack.base_url + "/v1/chat/completions", json=body(parts, **fields), timeout=120
    )


def hf_greedy_text(hf, folder, png: bytes, n: int) -> str:
    """transformers' greedy completion of the chat the tokenizer core renders for one picture."""
    core = TokenizerCore(folder)
    conv = Conversation(
        [{"role": "user", "content": [{"type": "image"}, QUESTION]}],
        add_generation_prompt=True,
        images=[png],
    )
    r = core.apply_chat_template([conv])[0]
    ids = torch.tensor([r.ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            pixel_values=r.images[0].tensors.pixel_values,
            image_grid_thw=r.images[0].tensors.extras["image_grid_thw"],
            mm_token_type_ids=(ids == hf.config.image_token_id).int(),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return core.tokenizer.decode(out[0, len(r.ids) :], skip_special_tokens=True)


def test_streamed_chat_with_an_image_equals_the_unstreamed_one_and_hf(stack):
    stack, hf, folder = stack
    png = picture(3, (32, 24))
    parts = [image_part(data_url(png)), QUESTION]
    with httpx.stream(
        "POST",
        stack.base_url + "/v1/chat/completions",
        json=body(parts, stream=True, stream_options={"include_usage": True}),
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [httpx.Response(200, content=s[6:]).json() for s in lines[:-1]]
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    whole = ok(chat(stack, parts))
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == 6
    # 12 image tokens (a 32x24 picture: 8x6 patches of 4, merged 2x2) and the template's text
    assert chunks[-1]["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] > 12
    # M-RoPE positions (and p + delta when decoding) reached the executor: HF's greedy tokens
    assert streamed == hf_greedy_text(hf, folder, png, 6)


def test_repeated_image_hits_the_cache_and_another_image_does_not(stack):
    stack = stack[0]
    first = ok(chat(stack, [image_part(data_url(picture(1, (32, 24)))), QUESTION]))
    again = ok(chat(stack, [image_part(data_url(picture(1, (32, 24)))), QUESTION]))
    other = ok(chat(stack, [image_part(data_url(picture(2, (32, 24)))), QUESTION]))
    prompt = first["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens"] == prompt == other["usage"]["prompt_tokens"]
    assert cached(again) >= prompt - 8  # all but the last page/token of the prompt
    assert cached(other) <= 5  # the template's text before the image at most
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_image_data_without_a_placeholder_is_400_and_leaks_nothing(stack):
    stack = stack[0]
    r = httpx.post(
        stack.base_url + "/generate",
        json={
            "text": "No image token here.",
            "image_data": base64.b64encode(picture(9)).decode(),
            "sampling_params": {"max_new_tokens": 2},
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "do not fit the prompt" in r.json()["error"]["message"]
    wait_idle_and_check_no_leak(stack)
    ok(chat(stack, [image_part(data_url(picture(7, (16, 24)))), QUESTION], max_tokens=2))
