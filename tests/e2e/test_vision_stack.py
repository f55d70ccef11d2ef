"""Vision inputs through the whole stack (`radixserve serve` on a tiny random LLaVA 1.5 with its
processor, prefill chunks of 8 so that images straddle chunks): OpenAI image_url parts (data: URLs,
files under --allowed-local-media-path), SGLang's /generate image_data, streaming, the prefix cache
keyed by the image, and every bad input a 400 with OpenAI's error body and no KV leaked."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.executor.tiny_llava import build_tiny_llava, picture
from tests.stack import start_stack, stop_stack, wait_idle_and_check_no_leak

MODEL = "tiny-llava"
MAX_IMAGE_BYTES = 60_000


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(picture(42))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory, media):
    folder = tmp_path_factory.mktemp("llava")
    build_tiny_llava("llava", folder / "model")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "0")
        running = start_stack(
            "--model-path",
            str(folder / "model"),
            "--served-model-name",
            MODEL,
            "--max-total-tokens",
            "4096",
            "--chunked-prefill-size",
            "8",
            "--allowed-local-media-path",
            str(media),
            "--max-images-per-request",
            "3",
            "--max-image-bytes",
            str(MAX_IMAGE_BYTES),
            "--media-fetch-timeout",
            "2",
            log_path=str(folder / "serve.log"),
            timeout=180,
        )
    yield running
    stop_stack(running)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def chat(stack, parts: list[dict], **fields) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 4,
        "temperature": 0,
        **fields,
    }
    return httpx.post(stack.base_url + "/v1/chat/completions", json=body, timeout=120)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_repeated_image_hits_the_cache_and_another_image_does_not(stack):
    question = {"type": "text", "text": "What is in this picture, in detail?"}
    first = ok(chat(stack, [image_part(data_url(picture(1))), question]))
    again = ok(chat(stack, [image_part(data_url(picture(1))), question]))
    other = ok(chat(stack, [image_part(data_url(picture(2))), question]))
    prompt = first["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens"] == prompt == other["usage"]["prompt_tokens"]
    assert cached(again) >= prompt - 8  # all but the last page/token of the prompt
    # The text before the image may hit; nothing from the image's first placeholder on.
    assert cached(other) <= 3
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_two_images_from_a_data_url_and_a_local_file_stream(stack, media):
    parts = [
        image_part(data_url(picture(3))),
        {"type": "text", "text": "and"},
        image_part(f"file://{media / 'cat.png'}"),
        {"type": "text", "text": "Compare them."},
    ]
    with httpx.stream(
        "POST",
        stack.base_url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(lambda s: httpx.Response(200, content=s[6:]).json(), lines[:-1])
        if c["choices"]
    )
    whole = ok(chat(stack, parts, max_tokens=6))
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == 6


def test_generate_with_image_data(stack):
    png = picture(4)
    body = {
        "text": "USER: <image>\nWhat is this?\nASSISTANT:",
        "image_data": [base64.b64encode(png).decode()],
        "sampling_params": {"temperature": 0, "max_new_tokens": 4},
    }
    r = httpx.post(stack.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["prompt_tokens"] > 10  # the placeholder expanded to the image's rows
    # The same picture by data URL in a second request hits the cache.
    body["image_data"] = data_url(png)
    again = httpx.post(stack.base_url + "/generate", json=body, timeout=120).json()
    assert again["meta_info"]["cached_tokens"] >= meta["prompt_tokens"] - 8


def big_png() -> bytes:
    image = Image.frombytes("RGB", (200, 200), bytes(range(256)) * 468 + bytes(192))
    out = io.BytesIO()
    image.save(out, format="BMP")
    return out.getvalue()


BAD = {
    "undecodable": ([image_part(data_url(b"this is not a picture"))], "could not be decoded"),
    "bad-base64": ([image_part("data:image/png;base64,@@@")], "base64"),
    "too-large": ([image_part(data_url(big_png()))], "over the limit"),
    "too-many": ([image_part(data_url(picture(i))) for i in range(4)], "at most 3"),
    "unreachable-http": ([image_part("http://127.0.0.1:9/cat.png")], "could not be fetched"),
    "outside-allowed-folder": ([image_part("file:///etc/hostname")], "outside"),
    "not-a-url": ([image_part("cat.png")], "must be a data:"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_images_are_400_and_leak_nothing(stack, case):
    parts, message = BAD[case]
    r = chat(stack, parts + [{"type": "text", "text": "What?"}])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    wait_idle_and_check_no_leak(stack)
    ok(chat(stack, [image_part(data_url(picture(7))), {"type": "text", "text": "Still up?"}]))


def test_generate_image_data_without_a_placeholder_is_400(stack):
    body = {
        "text": "No image token here.",
        "image_data": data_url(picture(9)),
        "sampling_params": {"max_new_tokens": 2},
    }
    r = httpx.post(stack.base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "do not fit the prompt" in r.json()["error"]["message"]
    wait_idle_and_check_no_leak(stack)


def test_image_for_a_text_only_model_is_400(tiny_stack):
    r = httpx.post(
        tiny_stack.base_url + "/v1/chat/completions",
        json={
            "model": "tiny-llama",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        image_part(data_url(picture(8))),
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
            "max_tokens": 2,
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "takes no image inputs" in r.json()["error"]["message"]
    wait_idle_and_check_no_leak(tiny_stack)
