"""`radixserve bench serving`: datasets, metrics, the load against a fake SSE server, the real
five-process stack (e2e), and the HF transformers baseline on a tiny random Llama. No timing asserts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixserve.bench import serving
from radixserve.bench.datasets import (
    random_ids_requests,
    random_text_requests,
    safe_id_range,
    sample_lengths,
)
from radixserve.bench.serving import RequestResult, TokenClock, compute_metrics
from tests.stack import free_ports

FAKE_VOCAB = 5000


# ---- datasets ----


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_lengths_stay_within_sglang_bounds(ratio):
    import numpy as np

    lengths = sample_lengths(100, ratio, 500, np.random.RandomState(0))
    low = max(int(100 * ratio), 1)
    assert all(low <= n <= 100 for n in lengths)
    if ratio == 1.0:
        assert set(lengths) == {100}
    else:
        assert len(set(lengths)) > 1


def test_random_ids_are_deterministic_and_within_the_vocab():
    def make(seed):
        return random_ids_requests(
            num_prompts=50,
            input_len=64,
            output_len=16,
            range_ratio=0.5,
            vocab_size=FAKE_VOCAB,
            seed=seed,
        )

    first, again, other = make(1), make(1), make(2)
    assert first == again
    assert first != other
    low, high = safe_id_range(FAKE_VOCAB)
    for r in first:
        assert len(r.prompt) == r.prompt_len and 32 <= r.prompt_len <= 64
        assert 8 <= r.output_len <= 16
        assert all(low <= t < high for t in r.prompt)


def test_random_ids_of_a_tiny_vocab():
    requests = random_ids_requests(
        num_prompts=20, input_len=8, output_len=4, range_ratio=0.0, vocab_size=256, seed=3
    )
    assert all(0 <= t < 256 for r in requests for t in r.prompt)


def test_random_text_has_the_length_it_claims():
    tokenizer = serving.load_tokenizer(None)  # the embedded SmolLM2's

    def make():
        return random_text_requests(
            num_prompts=12,
            input_len=40,
            output_len=10,
            range_ratio=0.5,
            tokenizer=tokenizer,
            seed=7,
        )

    requests = make()
    assert requests == make()
    for r in requests:
        assert isinstance(r.prompt, str)
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 20 <= r.prompt_len <= 40 and 5 <= r.output_len <= 10


# ---- metrics ----


def test_token_clock_splits_multi_token_chunks_like_sglang():
    clock = TokenClock(start=10.0)
    clock.tokens_arrived(10.5, 1)
    clock.tokens_arrived(10.6, 1)
    clock.tokens_arrived(10.9, 3)  # 0.3 s for 3 tokens: three latencies of 0.1 s
    clock.tokens_arrived(11.0, 0)  # a chunk with no new token changes nothing
    assert clock.ttft == pytest.approx(0.5)
    assert clock.itl == pytest.approx([0.1] * 4)
    assert clock.tokens == 5

    first_chunk_brings_three = TokenClock(start=0.0)
    first_chunk_brings_three.tokens_arrived(0.2, 3)
    assert (
        first_chunk_brings_three.ttft == pytest.approx(0.2) and first_chunk_brings_three.itl == []
    )


def test_metrics_of_known_records():
    results = [
        RequestResult(10, True, 4, ttft=0.1, itl=[0.02, 0.03, 0.05], e2e=0.2),
        RequestResult(20, True, 1, ttft=0.3, itl=[], e2e=0.3),
        RequestResult(30, True, 3, ttft=0.2, itl=[0.1, 0.1], e2e=0.4),
        RequestResult(40, False, error="HTTP 400"),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (
        3,
        1,
        60,
        8,
    )
    expected = {
        "request_throughput": 1.5,
        "input_throughput": 30.0,
        "output_throughput": 4.0,
        "total_throughput": 34.0,
        "mean_ttft_ms": 200.0,
        "median_ttft_ms": 200.0,
        "p99_ttft_ms": 298.0,
        # TPOT: (0.2 - 0.1) / 3 and (0.4 - 0.2) / 2; the one-token request has none
        "mean_tpot_ms": 200 / 3,
        "median_tpot_ms": 200 / 3,
        "p99_tpot_ms": 100 / 3 + 0.99 * 200 / 3,
        "mean_itl_ms": 60.0,
        "median_itl_ms": 50.0,
        "p95_itl_ms": 100.0,
        "p99_itl_ms": 100.0,
        "max_itl_ms": 100.0,
        "mean_e2e_latency_ms": 300.0,
        "median_e2e_latency_ms": 300.0,
        "p99_e2e_latency_ms": 398.0,
        "concurrency": 0.45,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key


def test_metrics_without_successes_have_no_latencies():
    m = compute_metrics([RequestResult(5, False, error="x")], duration_s=1.0)
    assert m["completed"] == 0 and m["total_output_tokens"] == 0
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None and m["concurrency"] == 0.0


# ---- against a fake SGLang-style server ----


class FakeServer:
    """Streams /generate (SGLang format, `tokens_per_chunk` ids per chunk) and /v1/completions;
    records how many requests were in flight at most; answers 400 to every `fail_every`-th request."""

    def __init__(
        self, fail_every: int = 0, tokens_per_chunk: int = 1, token_delay_s: float = 0.005
    ):
        self.fail_every = fail_every
        self.tokens_per_chunk = tokens_per_chunk
        self.token_delay_s = token_delay_s
        self.received = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []  # every request body received
        self.app = self.build_app()

    def admit(self) -> bool:
        self.received += 1
        if self.fail_every and self.received % self.fail_every == 0:
            return False
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return True

    async def native_stream(self, max_new_tokens: int):
        ids = []
        while len(ids) < max_new_tokens:
            await asyncio.sleep(self.token_delay_s)
            ids += [7] * min(self.tokens_per_chunk, max_new_tokens - len(ids))
            done = len(ids) == max_new_tokens
            meta = {
                "id": "x",
                "finish_reason": {"type": "length"} if done else None,
                "prompt_tokens": 3,
                "completion_tokens": len(ids),
            }
            yield f"data: {json.dumps({'text': 'a' * len(ids), 'output_ids': ids, 'meta_info': meta})}\n\n"
        self.in_flight -= 1  # before [DONE], so the client cannot start its next request first
        yield "data: [DONE]\n\n"

    async def openai_stream(self, max_tokens: int):
        for _ in range(max_tokens):
            await asyncio.sleep(self.token_delay_s)
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'b', 'finish_reason': None}]})}\n\n"
        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": max_tokens,
            "total_tokens": max_tokens + 3,
        }
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        self.in_flight -= 1
        yield "data: [DONE]\n\n"

    def build_app(self) -> FastAPI:
        app = FastAPI()
        rejected = JSONResponse(
            {"error": {"message": "rejected by the fake server"}}, status_code=400
        )

        @app.get("/get_model_info")
        async def model_info():
            return {"model_path": "fake", "tokenizer_path": "fake", "vocab_size": FAKE_VOCAB}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model"}]}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.bodies.append(body)
            assert body["stream"] and body["sampling_params"]["ignore_eos"] and "input_ids" in body
            if not self.admit():
                return rejected
            return StreamingResponse(
                self.native_stream(body["sampling_params"]["max_new_tokens"]),
                media_type="text/event-stream",
            )

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            assert body["model"] == "fake-model" and body["ignore_eos"]
            if not self.admit():
                return rejected
            return StreamingResponse(
                self.openai_stream(body["max_tokens"]), media_type="text/event-stream"
            )

        return app


@contextlib.contextmanager
def serving_app(app: FastAPI):
    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def run_bench(capsys, *flags: str) -> tuple[int, dict, str]:
    """main() in process: (exit code, the JSON of the last stdout line, all of stdout)."""
    code = serving.main([*flags, "--disable-tqdm"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def requested_output_tokens(
    num_prompts: int, input_len: int, output_len: int, ratio: float, vocab: int
) -> int:
    requests = random_ids_requests(
        num_prompts=num_prompts,
        input_len=input_len,
        output_len=output_len,
        range_ratio=ratio,
        vocab_size=vocab,
        seed=1,
    )
    return sum(r.output_len for r in requests)


def test_counts_requests_and_tokens_and_respects_max_concurrency(capsys, tmp_path):
    fake = FakeServer(tokens_per_chunk=2, token_delay_s=0.01)
    results_file = tmp_path / "results.jsonl"
    with serving_app(fake.app) as url:
        code, summary, out = run_bench(
            capsys,
            "--base-url",
            url,
            "--backend",
            "sglang-native",
            "--dataset",
            "random-ids",
            "--random-input-len",
            "16",
            "--random-output-len",
            "9",
            "--random-range-ratio",
            "0.5",
            "--num-prompts",
            "12",
            "--max-concurrency",
            "3",
            "--output-file",
            str(results_file),
        )
    assert code == 0
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == requested_output_tokens(12, 16, 9, 0.5, FAKE_VOCAB)
    assert fake.max_in_flight == 3
    assert fake.received == 13  # one warmup request
    assert (
        "============ Serving Benchmark Result ============" in out
        and "Successful requests:" in out
    )
    assert json.loads(results_file.read_text().splitlines()[-1]) == summary
    for key in ("mean_ttft_ms", "p99_itl_ms", "mean_tpot_ms", "p99_e2e_latency_ms", "concurrency"):
        assert summary[key] is not None and summary[key] > 0


def test_poisson_arrivals_at_a_finite_rate(capsys):
    fake = FakeServer()
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys,
            "--base-url",
            url,
            "--dataset",
            "random-ids",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--num-prompts",
            "6",
            "--request-rate",
            "200",
            "--warmup-requests",
            "0",
        )
    assert code == 0 and summary["completed"] == 6 and summary["request_rate"] == 200.0


def test_openai_completions_backend(capsys):
    fake = FakeServer()
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys,
            "--base-url",
            url,
            "--backend",
            "openai-completions",
            "--dataset",
            "random-ids",
            "--random-input-len",
            "8",
            "--random-output-len",
            "6",
            "--num-prompts",
            "5",
        )
    assert code == 0 and summary["completed"] == 5
    assert summary["total_output_tokens"] == requested_output_tokens(5, 8, 6, 0.0, FAKE_VOCAB)


@pytest.mark.parametrize("backend", ["radixserve", "openai-completions"])
def test_extra_request_body_reaches_every_request(capsys, backend):
    fake = FakeServer()
    extra = {"temperature": 0.7, "top_p": 0.9}
    with serving_app(fake.app) as url:
        code, summary, _ = run_bench(
            capsys,
            "--base-url",
            url,
            "--backend",
            backend,
            "--dataset",
            "random-ids",
            "--random-input-len",
            "8",
            "--random-output-len",
            "3",
            "--num-prompts",
            "3",
            "--extra-request-body",
            json.dumps(extra),
        )
    assert code == 0 and summary["completed"] == 3 and summary["extra_request_body"] == extra
    assert len(fake.bodies) == 4  # the warmup too
    for body in fake.bodies:
        params = body["sampling_params"] if backend == "radixserve" else body
        assert params["temperature"] == 0.7 and params["top_p"] == 0.9
        assert params["ignore_eos"] is True and body["stream"] is True


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_extra_request_body_must_be_a_json_object(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        serving.main(["--base-url", "http://127.0.0.1:9", "--extra-request-body", bad])
    assert exc.value.code == 2
    assert "--extra-request-body" in capsys.readouterr().err


def test_failed_requests_are_counted_and_reported(capsys):
    fake = FakeServer(fail_every=3)
    with serving_app(fake.app) as url:
        code, summary, out = run_bench(
            capsys,
            "--base-url",
            url,
            "--dataset",
            "random-ids",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "1.0",
            "--num-prompts",
            "9",
            "--warmup-requests",
            "0",
        )
    assert code == 0
    assert summary["completed"] == 6 and summary["failed"] == 3
    assert summary["total_output_tokens"] == 6 * 4
    assert (
        "3 of 9 requests failed" in out
        and "HTTP 400" in out
        and "rejected by the fake server" in out
    )


def test_a_failed_warmup_stops_the_run(capsys):
    fake = FakeServer(fail_every=1)
    with serving_app(fake.app) as url:
        code = serving.main(
            ["--base-url", url, "--dataset", "random-ids", "--num-prompts", "2", "--disable-tqdm"]
        )
    assert code == 1
    assert "warmup request failed" in capsys.readouterr().err


def test_unreachable_server_fails_every_request(capsys):
    port = free_ports(1)[0]
    code, summary, out = run_bench(
        capsys,
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--dataset",
        "random-ids",
        "--vocab-size",
        "1000",
        "--num-prompts",
        "3",
        "--warmup-requests",
        "0",
    )
    assert code == 1 and summary["completed"] == 0 and summary["failed"] == 3
    assert "ClientConnectorError" in out  # the error names the failure


def test_cli_dispatches_to_the_benchmark(capsys):
    from radixserve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "serving", "--help"])
    assert exit_info.value.code == 0
    assert "--max-concurrency" in capsys.readouterr().out


# ---- the real stack ----


@pytest.mark.e2e
def test_against_the_real_stack(capsys, tmp_path, default_stack):
    results_file = tmp_path / "results.jsonl"
    stack = default_stack
    vocab = httpx.get(stack.base_url + "/get_model_info", timeout=30).json()["vocab_size"]
    common = ("--base-url", stack.base_url, "--output-file", str(results_file))

    code, ids_run, _ = run_bench(
        capsys,
        *common,
        "--backend",
        "radixserve",
        "--dataset",
        "random-ids",
        "--random-input-len",
        "32",
        "--random-output-len",
        "8",
        "--num-prompts",
        "8",
        "--max-concurrency",
        "4",
    )
    assert code == 0 and ids_run["completed"] == 8
    assert ids_run["total_output_tokens"] == requested_output_tokens(8, 32, 8, 0.0, vocab)
    assert ids_run["mean_itl_ms"] is not None  # tokens were streamed one chunk at a time

    code, text_run, _ = run_bench(
        capsys,
        *common,
        "--backend",
        "sglang-native",
        "--dataset",
        "random",
        "--random-input-len",
        "24",
        "--random-output-len",
        "6",
        "--random-range-ratio",
        "1.0",
        "--num-prompts",
        "4",
    )
    assert code == 0 and text_run["completed"] == 4 and text_run["total_output_tokens"] == 4 * 6

    code, openai_run, _ = run_bench(
        capsys,
        *common,
        "--backend",
        "openai-completions",
        "--dataset",
        "random-ids",
        "--random-input-len",
        "16",
        "--random-output-len",
        "5",
        "--random-range-ratio",
        "1.0",
        "--num-prompts",
        "4",
    )
    assert code == 0 and openai_run["completed"] == 4 and openai_run["total_output_tokens"] == 4 * 5
    assert len(results_file.read_text().splitlines()) == 3


# ---- the HF transformers baseline ----


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        folder
    )
    return str(folder)


HF_SMALL_CACHE = ("--dtype", "float32", "--hf-num-blocks", "16", "--hf-max-batch-tokens", "256")


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_hf_transformers_baseline(capsys, tiny_llama, load_format):
    code, summary, out = run_bench(
        capsys,
        "--backend",
        "hf-transformers",
        "--model-path",
        tiny_llama,
        "--load-format",
        load_format,
        *HF_SMALL_CACHE,
        "--dataset",
        "random-ids",
        "--random-input-len",
        "16",
        "--random-output-len",
        "6",
        "--random-range-ratio",
        "1.0",
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
    )
    assert code == 0
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 4 * 16 and summary["total_output_tokens"] == 4 * 6
    assert summary["backend"] == "hf-transformers" and summary["device"] in ("cpu", "cuda")
    assert "Output token throughput (tok/s):" in out


def test_hf_baseline_generates_the_longest_drawn_length_for_all(capsys, tiny_llama):
    code, summary, _ = run_bench(
        capsys,
        "--backend",
        "hf-transformers",
        "--model-path",
        tiny_llama,
        *HF_SMALL_CACHE,
        "--dataset",
        "random-ids",
        "--random-input-len",
        "12",
        "--random-output-len",
        "8",
        "--random-range-ratio",
        "0.25",
        "--num-prompts",
        "5",
        "--warmup-requests",
        "0",
    )
    longest = max(
        r.output_len
        for r in random_ids_requests(
            num_prompts=5, input_len=12, output_len=8, range_ratio=0.25, vocab_size=256, seed=1
        )
    )
    assert code == 0 and summary["hf_max_new_tokens"] == longest
    assert summary["total_output_tokens"] == 5 * longest
