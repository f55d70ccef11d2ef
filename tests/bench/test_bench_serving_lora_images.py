"""`radixserve bench serving --lora-name` and `--dataset image`: the image dataset itself, which field each
backend carries the adapter and the pictures in (a recording fake server), and the real stacks: the tiny
Llama with two dummy adapters (an unknown name fails at once, naming it), and the tiny LLaVA, where requests
with pictures count more prompt tokens than the same requests without. No timing asserts."""

from __future__ import annotations

import base64
import collections
import io
import json

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from PIL import Image

from radixserve.bench import serving
from radixserve.bench.images import image_requests, parse_resolution
from tests.bench.test_bench_serving import FAKE_VOCAB, FakeServer, run_bench, serving_app

ADAPTERS = ("alpha", "beta")


# ---- the image dataset ----


@pytest.mark.parametrize(
    "value, expected",
    [("384x384", (384, 384)), ("640x360", (640, 360)), ("720p", (1280, 720)), ("4K", (3840, 2160))],
)
def test_resolutions(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["384", "0x10", "axb", "10x99999", "720"])
def test_bad_resolutions_are_refused(value):
    with pytest.raises(ValueError, match="image"):
        parse_resolution(value)


def test_bad_resolution_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving.main(["--dataset", "image", "--image-resolution", "big"])
    assert exit_info.value.code == 2
    assert "WxH" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smol_tokenizer():
    return serving.load_tokenizer(None)


def decode(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    return Image.open(io.BytesIO(base64.b64decode(payload))), header


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_image_requests(smol_tokenizer, image_format):
    def make(count, seed=3):
        return image_requests(
            num_prompts=4,
            input_len=20,
            output_len=5,
            range_ratio=1.0,
            tokenizer=smol_tokenizer,
            seed=seed,
            image_count=count,
            resolution=(40, 24),
            image_format=image_format,
        )

    two, again, none = make(2), make(2), make(0)
    assert two == again  # seeded
    assert [r.prompt for r in two] == [r.prompt for r in none]  # the same text without pictures
    assert all(r.images == [] for r in none)
    urls = [url for r in two for url in r.images]
    assert len(urls) == 8 and len(set(urls)) == 8  # every picture new
    image, header = decode(urls[0])
    assert header == f"data:image/{image_format};base64"
    assert image.size == (40, 24) and image.format == image_format.upper()
    assert make(2, seed=4)[0].images != two[0].images


# ---- which field carries what (a recording fake server) ----


class RecordingServer(FakeServer):
    """FakeServer's streams on /generate, /v1/completions and /v1/chat/completions; records every body.
    /v1/models lists the base model and ADAPTERS."""

    def build_app(self) -> FastAPI:
        self.bodies: dict[str, list[dict]] = collections.defaultdict(list)
        app = FastAPI()

        @app.get("/get_model_info")
        async def model_info():
            return {"model_path": None, "tokenizer_path": None, "vocab_size": FAKE_VOCAB}

        @app.get("/v1/models")
        async def models():
            return {"data": [{"id": name} for name in ("fake-model", *ADAPTERS)]}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.bodies["generate"].append(body)
            self.in_flight += 1
            stream = self.native_stream(body["sampling_params"]["max_new_tokens"])
            return StreamingResponse(stream, media_type="text/event-stream")

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def openai(request: Request):
            body = await request.json()
            self.bodies[request.url.path].append(body)
            self.in_flight += 1
            return StreamingResponse(
                self.openai_stream(body["max_tokens"]), media_type="text/event-stream"
            )

        return app


SMALL = ("--random-input-len", "8", "--random-output-len", "3", "--random-range-ratio", "1.0")


@pytest.mark.parametrize(
    "backend, route, field",
    [
        ("openai-completions", "/v1/completions", "model"),
        ("radixserve", "generate", "lora_path"),
        ("sglang-native", "generate", "lora_path"),
    ],
)
def test_lora_names_round_robin_by_request_index(capsys, backend, route, field):
    fake = RecordingServer()
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys,
            "--base-url",
            url,
            "--backend",
            backend,
            "--dataset",
            "random-ids",
            *SMALL,
            "--num-prompts",
            "5",
            "--lora-name",
            *ADAPTERS,
        )
    assert code == 0 and summary["completed"] == 5
    assert summary["lora_names"] == list(ADAPTERS)
    bodies = fake.bodies[route]
    # the warmup repeats request 0 (alpha); then requests 0..4: alpha beta alpha beta alpha
    assert collections.Counter(b[field] for b in bodies) == {"alpha": 4, "beta": 2}
    by_prompt = {json.dumps(b.get("input_ids") or b.get("prompt")): b[field] for b in bodies}
    requests = serving.random_ids_requests(
        num_prompts=5, input_len=8, output_len=3, range_ratio=1.0, vocab_size=FAKE_VOCAB, seed=1
    )
    assert [by_prompt[json.dumps(r.prompt)] for r in requests] == [
        "alpha",
        "beta",
        "alpha",
        "beta",
        "alpha",
    ]


def test_without_lora_names_no_adapter_is_named(capsys):
    fake = RecordingServer()
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys, "--base-url", url, "--dataset", "random-ids", *SMALL, "--num-prompts", "2"
        )
    assert code == 0 and summary["lora_names"] is None
    assert all("lora_path" not in b for b in fake.bodies["generate"])


def test_an_unknown_adapter_stops_the_run_before_any_request(capsys):
    fake = RecordingServer()
    with serving_app(fake.app) as url, pytest.raises(SystemExit) as exit_info:
        serving.main(["--base-url", url, "--dataset", "random-ids", "--lora-name", "alpha", "nope"])
    message = str(exit_info.value.code)
    assert "no LoRA adapter named nope" in message and "alpha" in message
    assert not fake.bodies


def test_chat_backend_sends_pictures_as_image_url_parts(capsys):
    fake = RecordingServer()
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys,
            "--base-url",
            url,
            "--backend",
            "openai-chat",
            "--dataset",
            "image",
            "--image-count",
            "2",
            "--image-resolution",
            "32x16",
            "--image-format",
            "jpeg",
            *SMALL,
            "--num-prompts",
            "3",
            "--lora-name",
            "beta",
        )
    assert code == 0 and summary["completed"] == 3
    assert (summary["image_count"], summary["image_resolution"], summary["image_format"]) == (
        2,
        "32x16",
        "jpeg",
    )
    body = fake.bodies["/v1/chat/completions"][-1]
    assert body["model"] == "beta" and body["max_tokens"] == 3 and body["stream"]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    image, _ = decode(parts[0]["image_url"]["url"])
    assert image.size == (32, 16)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--dataset", "image", "--backend", "openai-completions"), "carries pictures"),
        (("--dataset", "random-ids", "--backend", "openai-chat"), "sends text"),
        (("--dataset", "image", "--image-count", "-1"), "at least 0"),
        (("--backend", "hf-transformers", "--lora-name", "a"), "server backend"),
    ],
)
def test_usage_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        serving.main(list(flags))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---- the real stacks ----


@pytest.mark.e2e
def test_lora_names_against_the_tiny_stack_with_two_adapters(capsys, tmp_path, monkeypatch):
    from radixserve.executor.lora.dummy import make_dummy_adapters
    from tests.stack import stop_stack, wait_idle_and_check_no_leak
    from tests.tiny_stack import start_tiny_stack, tiny_model

    config = json.loads((tiny_model(tmp_path / "model") / "config.json").read_text())
    folders = make_dummy_adapters(config, tmp_path / "loras", 2, 4, dtype=torch.float32)
    names = list(folders)
    lora_paths = [f"{name}={folder}" for name, folder in folders.items()]
    stack = start_tiny_stack(
        tmp_path,
        "--lora-paths",
        *lora_paths,
        "--max-loras-per-batch",
        "2",
        "--lora-backend",
        "torch",
    )
    try:
        for backend in ("openai-completions", "radixserve"):
            code, summary, out = run_bench(
                capsys,
                "--base-url",
                stack.base_url,
                "--backend",
                backend,
                "--dataset",
                "random-ids",
                *SMALL,
                "--num-prompts",
                "6",
                "--lora-name",
                *names,
            )
            assert code == 0 and summary["completed"] == 6 and summary["failed"] == 0, out
            assert summary["lora_names"] == names
        with pytest.raises(SystemExit) as exit_info:
            serving.main(["--base-url", stack.base_url, "--lora-name", names[0], "missing"])
        assert "no LoRA adapter named missing" in str(exit_info.value.code)
        # past the check (a server without /v1/models), the server's 404 fails the warmup at once
        monkeypatch.setattr(serving, "check_adapters", lambda *args: None)
        for backend in ("openai-completions", "radixserve"):
            code = serving.main(
                ["--base-url", stack.base_url, "--backend", backend, "--dataset", "random-ids"]
                + [*SMALL, "--num-prompts", "2", "--disable-tqdm", "--lora-name", "missing"]
            )
            err = capsys.readouterr().err
            assert code == 1 and "warmup request failed: HTTP 404" in err, err
        wait_idle_and_check_no_leak(stack)
    finally:
        stop_stack(stack)


@pytest.mark.e2e
def test_image_dataset_against_the_tiny_llava_stack(capsys, tmp_path):
    from tests.executor.tiny_llava import build_tiny_llava
    from tests.stack import start_stack, stop_stack, wait_idle_and_check_no_leak

    build_tiny_llava("llava", tmp_path / "model")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "0")
        stack = start_stack(
            "--model-path",
            str(tmp_path / "model"),
            "--max-total-tokens",
            "4096",
            log_path=str(tmp_path / "serve.log"),
            timeout=180,
        )
    try:
        runs = {}
        for backend in ("openai-chat", "radixserve"):
            for count in ("2", "0"):
                code, summary, out = run_bench(
                    capsys,
                    "--base-url",
                    stack.base_url,
                    "--backend",
                    backend,
                    "--dataset",
                    "image",
                    "--image-count",
                    count,
                    "--image-resolution",
                    "64x48",
                    *SMALL,
                    "--num-prompts",
                    "3",
                )
                assert code == 0 and summary["completed"] == 3 and summary["failed"] == 0, out
                assert summary["total_output_tokens"] == 3 * 3
                runs[backend, count] = summary
        for backend in ("openai-chat", "radixserve"):
            with_images, without = runs[backend, "2"], runs[backend, "0"]
            assert with_images["image_count"] == 2 and with_images["image_resolution"] == "64x48"
            # the same text; each picture's placeholder expands to its rows of the prompt
            assert with_images["total_input_tokens"] == without["total_input_tokens"]
            assert with_images["server_input_tokens"] >= without["server_input_tokens"] + 3 * 2 * 2
        wait_idle_and_check_no_leak(stack)
    finally:
        stop_stack(stack)
