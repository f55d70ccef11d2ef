"""Images and LoRA adapters on every route of the gateway (issues 22 and 23), over fake backends: a
tokenizer that decodes each image with the real decoder and puts it in the prompt as one placeholder
token (its bytes as the image's tensor), and a scheduler that lists the adapter "alpha". An image of
/v1/chat/completions, /v1/responses (input_image), /v1/messages (image blocks) and the gRPC API reaches
the scheduler's request the same way; an adapter named by `model` reaches it as lora_name, and the
response names the model as the request did (streamed too). Bad input is the same 400 on every route
(OpenAI's or Anthropic's error body), an unknown adapter 404 model_not_found; nothing reaches the
scheduler then."""

from __future__ import annotations

import base64
import io
import json

import grpc
import httpx
import pytest
from PIL import Image

from radixserve.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    tokenizer_pb2,
)
from radixserve.tokenizer.images import NO_IMAGE_INPUTS, decode_image
from tests.gateway.fakes import (
    MODEL,
    FakeBackends,
    FakeTokenizer,
    RunningGateway,
    encode,
    render_chat,
)
from tests.gateway.image_server import ImageServer

PLACEHOLDER = "▣"  # the fake tokenizer's token for one image
ADAPTER = "alpha"
MAX_IMAGES = 2
MAX_IMAGE_BYTES = 2000


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(out, format="PNG")
    return out.getvalue()


PNG = png(200)
PNG_B64 = base64.b64encode(PNG).decode()
DATA_URL = "data:image/png;base64," + PNG_B64


class ImageTokenizer(FakeTokenizer):
    """Each image part or image becomes one PLACEHOLDER token; its PromptImage carries the file's bytes.
    Undecodable images and, for a text-only model, any image are INVALID_ARGUMENT as the real
    tokenizer answers."""

    def __init__(self, takes_images: bool):
        self.takes_images = takes_images

    def _images(self, files, offsets, context) -> list[common_pb2.PromptImage]:
        if files and not self.takes_images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_IMAGE_INPUTS)
        for i, data in enumerate(files):
            try:
                decode_image(data, i)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return [
            common_pb2.PromptImage(
                tensors=common_pb2.ImageTensors(
                    pixel_values=common_pb2.TensorData(dtype="uint8", shape=[len(d)], data=d)
                ),
                offset=offset,
                length=1,
                hash=hash(d) & 0xFFFFFFFF,
            )
            for d, offset in zip(files, offsets)
        ]

    def ApplyChatTemplate(self, request, context):
        results = []
        for conv in request.conversations:
            flat = common_pb2.ChatConversation()
            flat.CopyFrom(conv)
            files = []
            for m in flat.messages:
                if m.content_parts:
                    files += [p.image for p in m.content_parts if p.WhichOneof("part") == "image"]
                    m.content = "".join(
                        PLACEHOLDER if p.WhichOneof("part") == "image" else p.text
                        for p in m.content_parts
                    )
                    del m.content_parts[:]
            prompt = render_chat(flat)
            offsets = [i for i, c in enumerate(prompt) if c == PLACEHOLDER]
            images = self._images(files, offsets, context)
            results.append(
                tokenizer_pb2.TokenizerChatResult(prompt=prompt, ids=encode(prompt), images=images)
            )
        return tokenizer_pb2.TokenizerChatResponse(results=results)

    def Encode(self, request, context):
        response = super().Encode(request, context)
        for text, images in zip(request.texts, request.images):
            offsets = [i for i, c in enumerate(text) if c == PLACEHOLDER]
            response.multimodal.append(
                tokenizer_pb2.TokenizerChatResult(
                    ids=encode(text), images=self._images(list(images.images), offsets, context)
                )
            )
        return response


def start(takes_images: bool):
    backends = FakeBackends(tokenizer=ImageTokenizer(takes_images), adapters=[ADAPTER])
    gw = RunningGateway(
        backends, max_images_per_request=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES
    )
    return backends, gw


@pytest.fixture(scope="module")
def vision():
    backends, gw = start(True)
    yield backends, gw
    gw.close()
    backends.stop()


@pytest.fixture(scope="module")
def text_only():
    backends, gw = start(False)
    yield backends, gw
    gw.close()
    backends.stop()


# ---- one request with images, per route ----


def chat_body(urls: list[str], model: str = MODEL, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    content = [{"type": "text", "text": "Look:"}] + parts + [{"type": "text", "text": "What?"}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def responses_body(urls: list[str], model: str = MODEL, **extra) -> dict:
    parts = [{"type": "input_image", "image_url": u, "detail": "low"} for u in urls]
    content = [{"type": "input_text", "text": "Look:"}] + parts
    content += [{"type": "input_text", "text": "What?"}]
    return {"model": model, "input": [{"role": "user", "content": content}], **extra}


def anthropic_source(url: str) -> dict:
    if url.startswith("data:image/png;base64,"):
        return {"type": "base64", "media_type": "image/png", "data": url.split(",", 1)[1]}
    return {"type": "url", "url": url}


def messages_body(urls: list[str], model: str = MODEL, **extra) -> dict:
    parts = [{"type": "image", "source": anthropic_source(u)} for u in urls]
    content = [{"type": "text", "text": "Look:"}] + parts + [{"type": "text", "text": "What?"}]
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
    return {**body, **extra}


ROUTES = {
    "chat": ("/v1/chat/completions", chat_body),
    "responses": ("/v1/responses", responses_body),
    "messages": ("/v1/messages", messages_body),
}


def post(gw: RunningGateway, route: str, urls: list[str], **extra) -> httpx.Response:
    path, body = ROUTES[route]
    return httpx.post(gw.base_url + path, json=body(urls, **extra), timeout=30)


def new_requests(backends, before: set[str]) -> list[scheduler_pb2.SchedulerGenerateRequest]:
    with backends.scheduler.lock:
        return [r for rid, r in backends.scheduler.requests.items() if rid not in before]


def seen(backends) -> set[str]:
    with backends.scheduler.lock:
        return set(backends.scheduler.requests)


def prompt_text(request) -> str:
    return "".join(map(chr, request.input_ids))


@pytest.mark.parametrize("route", ROUTES)
def test_images_reach_the_scheduler_from_every_route(vision, route):
    backends, gw = vision
    before = seen(backends)
    r = post(gw, route, [DATA_URL, "data:image/png;base64," + base64.b64encode(png(9)).decode()])
    assert r.status_code == 200, r.text
    [request] = new_requests(backends, before)
    text = prompt_text(request)
    assert "Look:" in text and "What?" in text  # the parts in order around the two images
    assert text.index("Look:") < text.index(PLACEHOLDER + PLACEHOLDER) < text.index("What?")
    assert [i.tensors.pixel_values.data for i in request.images] == [PNG, png(9)]
    assert [i.offset for i in request.images] == [text.index(PLACEHOLDER) + k for k in (0, 1)]
    assert request.lora_name == ""


def test_http_images_of_every_route_come_over_one_kept_connection(vision):
    """The routes fetch with the app's one client: the images of three requests (one per route)
    come over one keep-alive connection, and no cookie goes back."""
    backends, gw = vision
    with ImageServer(PNG) as server:
        for route in ROUTES:
            before = seen(backends)
            r = post(gw, route, [f"{server.url}/{route}.png"])
            assert r.status_code == 200, r.text
            [request] = new_requests(backends, before)
            assert [i.tensors.pixel_values.data for i in request.images] == [PNG]
        assert server.connections == 1 and server.cookies == [None] * len(ROUTES)


def test_responses_images_come_back_with_previous_response_id(vision):
    backends, gw = vision
    first = post(gw, "responses", [DATA_URL], max_output_tokens=4)
    assert first.status_code == 200, first.text
    before = seen(backends)
    r = httpx.post(
        gw.base_url + "/v1/responses",
        json={"input": "And now?", "previous_response_id": first.json()["id"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    [request] = new_requests(backends, before)
    assert [i.tensors.pixel_values.data for i in request.images] == [PNG]
    assert "And now?" in prompt_text(request)


def test_anthropic_count_tokens_counts_the_image(vision):
    _, gw = vision
    count = {k: v for k, v in messages_body([DATA_URL]).items() if k != "max_tokens"}
    r = httpx.post(gw.base_url + "/v1/messages/count_tokens", json=count, timeout=30)
    assert r.status_code == 200, r.text
    without = {**count, "messages": [{"role": "user", "content": "Look:What?"}]}
    plain = httpx.post(gw.base_url + "/v1/messages/count_tokens", json=without, timeout=30)
    assert r.json()["input_tokens"] == plain.json()["input_tokens"] + 1  # the one placeholder


# ---- bad images: the same 400 on every route, nothing reaches the scheduler ----

TOO_LARGE = "data:image/png;base64," + base64.b64encode(bytes(MAX_IMAGE_BYTES + 1)).decode()
NOT_A_PICTURE = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
BAD = {
    "undecodable": ([NOT_A_PICTURE], "image 0 could not be decoded"),
    "bad-base64": (["data:image/png;base64,@@@"], "base64 data is invalid"),
    "too-large": ([TOO_LARGE], f"over the limit of {MAX_IMAGE_BYTES}"),
    "too-many": ([DATA_URL] * (MAX_IMAGES + 1), f"at most {MAX_IMAGES}"),
    "unreachable": (["http://127.0.0.1:9/cat.png"], "could not be fetched"),
    "local-file-not-allowed": (["file:///etc/hostname"], "local image files are not allowed"),
}


def error_message(route: str, r: httpx.Response) -> str:
    """The error's message, checking the body is the route's API's shape."""
    body = r.json()
    if route == "messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert set(body["error"]) == {"type", "message"}
    else:
        assert body["error"]["type"] == "invalid_request_error", body
        assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def assert_nothing_reached_the_scheduler(backends, before: set[str]) -> None:
    assert new_requests(backends, before) == []
    with backends.scheduler.lock:
        assert not backends.scheduler.active


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", BAD)
def test_bad_images_are_the_same_400_on_every_route(vision, route, case):
    backends, gw = vision
    urls, needle = BAD[case]
    before = seen(backends)
    r = post(gw, route, urls)
    assert r.status_code == 400, r.text
    assert needle in error_message(route, r)
    assert_nothing_reached_the_scheduler(backends, before)
    assert post(gw, route, [DATA_URL]).status_code == 200  # and the gateway serves on


@pytest.mark.parametrize("route", ROUTES)
def test_an_image_for_a_text_only_model_is_400(text_only, route):
    backends, gw = text_only
    before = seen(backends)
    r = post(gw, route, [DATA_URL])
    assert r.status_code == 400, r.text
    assert NO_IMAGE_INPUTS in error_message(route, r)
    assert_nothing_reached_the_scheduler(backends, before)
    text = {"chat": chat_body, "responses": responses_body, "messages": messages_body}[route]([])
    assert httpx.post(gw.base_url + ROUTES[route][0], json=text, timeout=30).status_code == 200


@pytest.mark.parametrize(
    "part, param, needle",
    [
        ({"type": "input_image", "file_id": "file-1"}, "input.0.content.0", "file_id"),
        ({"type": "input_image"}, "input.0.content.0", "needs image_url"),
        ({"type": "input_image", "image_url": DATA_URL, "detail": "huge"}, "input", "'auto'"),
        ({"type": "input_file", "file_id": "file-1"}, "input", "'input_file'"),
    ],
)
def test_responses_refuses_other_image_forms(vision, part, param, needle):
    backends, gw = vision
    before = seen(backends)
    body = {"input": [{"role": "user", "content": [part]}]}
    r = httpx.post(gw.base_url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and needle in error["message"], error
    assert_nothing_reached_the_scheduler(backends, before)


@pytest.mark.parametrize(
    "content, needle",
    [
        ([{"type": "image", "source": {"type": "file", "file_id": "f"}}], "'file'"),
        ([{"type": "image", "source": {"type": "base64", "data": PNG_B64}}], "media_type"),
        ([{"type": "image", "source": {"type": "url"}}], "url"),
        (
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "text/plain", "data": ""},
                }
            ],
            "image/png",
        ),
        (
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "a",
                    "content": [{"type": "image", "source": anthropic_source(DATA_URL)}],
                }
            ],
            "tool_result",
        ),
    ],
)
def test_messages_refuses_other_image_forms(vision, content, needle):
    backends, gw = vision
    before = seen(backends)
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    r = httpx.post(gw.base_url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in error_message("messages", r)
    assert_nothing_reached_the_scheduler(backends, before)


def test_messages_images_only_in_user_messages(vision):
    _, gw = vision
    body = messages_body([])
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "image", "source": anthropic_source(DATA_URL)}]}
    ]
    r = httpx.post(gw.base_url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400 and "user messages" in error_message("messages", r)


# ---- LoRA adapters by `model`, and the model each response names ----


def sse_data(r: httpx.Response) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in r.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


LORA_ROUTES = {
    "chat": ("/v1/chat/completions", lambda m: {**chat_body([], m), "max_tokens": 4}),
    "completions": ("/v1/completions", lambda m: {"model": m, "prompt": "Hi", "max_tokens": 4}),
    "responses": ("/v1/responses", lambda m: {**responses_body([], m), "max_output_tokens": 4}),
    "messages": ("/v1/messages", lambda m: messages_body([], m)),
}


def named_model(route: str, body: dict) -> str:
    if route == "responses" and "response" in body:  # a stream event
        return body["response"]["model"]
    if route == "messages" and "message" in body:
        return body["message"]["model"]
    return body["model"]


@pytest.mark.parametrize("route", LORA_ROUTES)
@pytest.mark.parametrize("model", [ADAPTER, f"{MODEL}:{ADAPTER}", MODEL, None])
def test_adapter_by_model_reaches_the_scheduler_and_is_echoed(vision, route, model):
    backends, gw = vision
    path, make = LORA_ROUTES[route]
    body = make(model)
    if model is None:
        body.pop("model")
        if route == "messages":
            pytest.skip("Anthropic's model is required")
    want_lora = ADAPTER if model and ADAPTER in model else ""
    shown = model if want_lora else MODEL
    before = seen(backends)
    r = httpx.post(gw.base_url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert named_model(route, r.json()) == shown
    [request] = new_requests(backends, before)
    assert request.lora_name == want_lora
    # Streamed: every event that names the model names it so.
    before = seen(backends)
    r = httpx.post(gw.base_url + path, json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200, r.text
    events = [e for e in sse_data(r) if "model" in e or "response" in e or "message" in e]
    assert events and {named_model(route, e) for e in events} == {shown}
    [request] = new_requests(backends, before)
    assert request.lora_name == want_lora


@pytest.mark.parametrize("route", LORA_ROUTES)
def test_unknown_adapter_is_404_model_not_found(vision, route):
    backends, gw = vision
    path, make = LORA_ROUTES[route]
    before = seen(backends)
    for model in ("beta", f"{MODEL}:beta"):
        r = httpx.post(gw.base_url + path, json=make(model), timeout=30)
        assert r.status_code == 404, r.text
        if route == "messages":
            assert r.json()["error"]["type"] == "not_found_error"
        else:
            error = r.json()["error"]
            assert error["code"] == "model_not_found" and error["param"] == "model", error
            assert model in error["message"]
    assert_nothing_reached_the_scheduler(backends, before)


def test_messages_count_tokens_takes_an_adapter(vision):
    _, gw = vision
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    counts = [
        httpx.post(gw.base_url + "/v1/messages/count_tokens", json={**body, "model": m}, timeout=30)
        for m in (MODEL, ADAPTER, "beta")
    ]
    assert [r.status_code for r in counts] == [200, 200, 404]
    assert counts[0].json() == counts[1].json()


def test_embeddings_name_adapters_as_chat_does_and_refuse_them(vision):
    _, gw = vision
    url = gw.base_url + "/v1/embeddings"
    r = httpx.post(url, json={"model": "beta", "input": "Hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, json={"model": f"{MODEL}:{ADAPTER}", "input": "Hi"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "not_supported" and ADAPTER in error["message"], error


# ---- the gRPC API ----


def grpc_generate(gw: RunningGateway, **fields) -> list[gateway_pb2.GatewayGenerateResponse]:
    sampling = common_pb2.SamplingParams(temperature=0.0)
    stopping = common_pb2.StoppingCriteria(max_new_tokens=3)
    with grpc.insecure_channel(gw.grpc_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GatewayGenerateRequest(sampling=sampling, stopping=stopping, **fields)
        return list(stub.Generate(request, timeout=30))


def image_chat(files: list[bytes]) -> common_pb2.ChatConversation:
    parts = [common_pb2.ChatContentPart(text="Look:")]
    parts += [common_pb2.ChatContentPart(image=f) for f in files]
    message = common_pb2.ChatMessage(role="user", content_parts=parts)
    return common_pb2.ChatConversation(messages=[message], add_generation_prompt=True)


def test_grpc_images_of_a_text_prompt_and_a_chat_reach_the_scheduler(vision):
    backends, gw = vision
    before = seen(backends)
    out = grpc_generate(gw, text=f"Look: {PLACEHOLDER} What?", images=[PNG], lora_name=ADAPTER)
    assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    [request] = new_requests(backends, before)
    assert [i.tensors.pixel_values.data for i in request.images] == [PNG]
    assert request.images[0].offset == prompt_text(request).index(PLACEHOLDER)
    assert request.lora_name == ADAPTER
    before = seen(backends)
    grpc_generate(gw, chat=image_chat([PNG, png(9)]))
    [request] = new_requests(backends, before)
    assert [i.tensors.pixel_values.data for i in request.images] == [PNG, png(9)]


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"text": "x", "images": [PNG] * (MAX_IMAGES + 1)}, f"at most {MAX_IMAGES}"),
        ({"chat": image_chat([PNG] * (MAX_IMAGES + 1))}, f"at most {MAX_IMAGES}"),
        ({"text": "x", "images": [bytes(MAX_IMAGE_BYTES + 1)]}, "over the limit"),
        ({"chat": image_chat([bytes(MAX_IMAGE_BYTES + 1)])}, "over the limit"),
        ({"chat": image_chat([]), "images": [PNG]}, "text prompt"),
        ({"input_ids": common_pb2.TokenIds(ids=[1, 2]), "images": [PNG]}, "text prompt"),
        ({"text": f"{PLACEHOLDER}", "images": [b"not a picture"]}, "could not be decoded"),
        ({"text": "x", "model": "beta"}, "does not exist"),
    ],
)
def test_grpc_bad_images_are_invalid_argument(vision, fields, needle):
    backends, gw = vision
    before = seen(backends)
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(gw, **fields)
    want = grpc.StatusCode.NOT_FOUND if "model" in fields else grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.code() == want and needle in err.value.details(), err.value.details()
    assert_nothing_reached_the_scheduler(backends, before)
