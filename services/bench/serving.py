"""`radixserve bench serving`: an online serving benchmark with sglang.bench_serving's semantics.

Random prompts (see services/bench/datasets.py) go to a running server as streaming requests,
arriving as a Poisson process at --request-rate (inf: all at once), at most --max-concurrency in
flight, each with ignore_eos and max_new_tokens = its output length. Per request it measures TTFT
(the first chunk that carries a token), inter-token latencies, E2E latency and the output token
count the server reports; then prints SGLang's result table and, as the last stdout line, one JSON
object with SGLang's metric keys (also appended to --output-file).

Backends:
  radixserve, sglang-native  POST /generate (`input_ids` for random-ids, `text` for random; the image
                             dataset's text through the model's chat template, pictures as image_data)
  openai-completions         POST /v1/completions
  openai-chat                POST /v1/chat/completions (the random and image datasets; pictures as
                             image_url parts)
  hf-transformers            no server: transformers' continuous batching (services/bench/hf_baseline.py)

--lora-name A B ...: request i names adapter i mod N (round-robin by request index, the same every run):
`model` on the OpenAI backends, `lora_path` on /generate.

--dataset image (services/bench/images.py): random text plus --image-count random pictures per request;
--image-count 0 sends the same text alone. Against a tiny LLaVA server:

    radixserve bench serving --backend openai-chat --dataset image --image-count 1 \\
        --image-resolution 720p --image-format jpeg --random-input-len 128 --random-output-len 128 \\
        --num-prompts 64

Example (server: `radixserve serve --skip-tokenizer-init`):

    radixserve bench serving --base-url http://127.0.0.1:30000 --backend radixserve \\
        --dataset random-ids --random-input-len 512 --random-output-len 256 --random-range-ratio 1.0 \\
        --num-prompts 200 --max-concurrency 32 --output-file results.jsonl

The same prompts through HF transformers, for a side-by-side baseline:

    radixserve bench serving --backend hf-transformers --model-path /models/Llama-3.2-1B \\
        --dataset random-ids --random-input-len 512 --random-output-len 256 --random-range-ratio 1.0 \\
        --num-prompts 200 --output-file results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np

from radixserve.common.lifecycle import run_event_loop
from radixserve.bench import images
from radixserve.bench.datasets import BenchRequest, random_ids_requests, random_text_requests

NATIVE_BACKENDS = ("radixserve", "sglang-native")
SERVER_BACKENDS = (*NATIVE_BACKENDS, "openai-completions", "openai-chat")
HF_BACKEND = "hf-transformers"
DATASETS = ("random", "random-ids", "image")
CONNECT_TIMEOUT_S = 30.0
INFO_TIMEOUT_S = 30.0
ERROR_TEXT_LIMIT = 500


# ---- one request ----


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_len: int = 0
    ttft: float | None = None  # seconds; None when no chunk carried a token
    itl: list[float] = field(default_factory=list)  # seconds between tokens
    e2e: float = 0.0  # seconds
    error: str = ""
    server_prompt_len: int | None = None  # the prompt tokens the server reported (images included)


class TokenClock:
    """TTFT and inter-token latencies from the arrival times of token-carrying chunks.

    A chunk that brings k > 1 tokens after the first one adds k latencies of gap / k each, as
    sglang.bench_serving does; the tokens that arrive with the first chunk add none."""

    def __init__(self, start: float):
        self.start = start
        self.last = start
        self.tokens = 0
        self.ttft: float | None = None
        self.itl: list[float] = []

    def tokens_arrived(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last) / count] * count)
        self.last = now
        self.tokens += count


# Reads one parsed SSE chunk: (tokens it brings, the completion token total it reports or None).
ChunkReader = Callable[[dict, int], tuple[int, int | None]]


def read_native_chunk(data: dict, seen: int) -> tuple[int, int | None]:
    """/generate chunks carry cumulative text and output_ids, and meta_info.completion_tokens."""
    meta = data.get("meta_info") or {}
    total = meta.get("completion_tokens")
    if total is None:
        total = len(data.get("output_ids") or [])
    return total - seen, total


def read_openai_chunk(data: dict, seen: int) -> tuple[int, int | None]:
    """A text chunk (completions' text, chat's delta content) counts as one token unless it reports
    usage (continuous usage stats); the usage chunk at the end only reports the total."""
    reported = (data.get("usage") or {}).get("completion_tokens")
    choices = data.get("choices") or []
    if not (choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))):
        return 0, reported
    if reported is not None:
        return reported - seen, reported
    return 1, None


def reported_prompt_tokens(data: dict) -> int | None:
    """The prompt token count a chunk reports: OpenAI's usage, /generate's meta_info."""
    for section in ("usage", "meta_info"):
        count = (data.get(section) or {}).get("prompt_tokens")
        if count is not None:
            return int(count)
    return None


def native_error(data: dict) -> str:
    if "error" in data:
        return f"error event: {json.dumps(data['error'])[:ERROR_TEXT_LIMIT]}"
    finish = (data.get("meta_info") or {}).get("finish_reason") or {}
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return f"aborted by the server: {json.dumps(finish)[:ERROR_TEXT_LIMIT]}"
    return ""


def openai_error(data: dict) -> str:
    return f"error event: {json.dumps(data['error'])[:ERROR_TEXT_LIMIT]}" if "error" in data else ""


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, dict]]:
    """(arrival time, parsed payload) for each `data:` line, up to `data: [DONE]`."""
    async for line in response.content:
        now = time.perf_counter()
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        yield now, json.loads(payload)


async def stream_request(
    client,
    url: str,
    payload: dict,
    prompt_len: int,
    read_chunk: ChunkReader,
    chunk_error: Callable[[dict], str],
) -> RequestResult:
    result = RequestResult(prompt_len)
    start = time.perf_counter()
    clock = TokenClock(start)
    reported_total = None
    try:
        async with client.post(url, json=payload) as response:
            if response.status != 200:
                body = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {body[:ERROR_TEXT_LIMIT]}"
                return result
            async for now, data in sse_events(response):
                error = chunk_error(data)
                if error:
                    result.error = error
                    return result
                new_tokens, total = read_chunk(data, clock.tokens)
                clock.tokens_arrived(now, new_tokens)
                if total is not None:
                    reported_total = total
                prompt_tokens = reported_prompt_tokens(data)
                if prompt_tokens is not None:
                    result.server_prompt_len = prompt_tokens
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:ERROR_TEXT_LIMIT]
        return result
    result.e2e = time.perf_counter() - start
    result.output_len = reported_total if reported_total is not None else clock.tokens
    result.ttft = clock.ttft
    if result.ttft is None and result.output_len > 0:
        result.ttft = result.e2e  # the tokens were only counted by the closing usage report
    result.itl = clock.itl
    result.success = True
    return result


def prompt_field(request: BenchRequest) -> str:
    return "text" if isinstance(request.prompt, str) else "input_ids"


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run carries besides its prompt and length."""

    ignore_eos: bool = True
    # --extra-request-body: merged into /generate's sampling_params, or into an OpenAI body
    extra_body: dict = field(default_factory=dict)


async def send_native(
    client, base_url: str, request: BenchRequest, options: RequestOptions
) -> RequestResult:
    payload = {
        prompt_field(request): request.prompt,
        "stream": True,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": request.output_len,
            "ignore_eos": options.ignore_eos,
            **options.extra_body,
        },
    }
    if request.images:
        payload["image_data"] = request.images
    if request.lora_name:
        payload["lora_path"] = request.lora_name
    return await stream_request(
        client, base_url + "/generate", payload, request.prompt_len, read_native_chunk, native_error
    )


def _openai_payload(
    request: BenchRequest, options: RequestOptions, model: str | None, **inputs
) -> dict:
    """An OpenAI streaming body for request (its adapter, if any, as the model) around inputs."""
    payload = {
        **inputs,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": options.ignore_eos,
        **options.extra_body,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    model = request.lora_name or model
    if model:
        payload["model"] = model
    return payload


async def send_openai_completion(
    client, base_url: str, request: BenchRequest, options: RequestOptions, model: str | None
) -> RequestResult:
    payload = _openai_payload(request, options, model, prompt=request.prompt)
    return await stream_request(
        client,
        base_url + "/v1/completions",
        payload,
        request.prompt_len,
        read_openai_chunk,
        openai_error,
    )


async def send_openai_chat(
    client, base_url: str, request: BenchRequest, options: RequestOptions, model: str | None
) -> RequestResult:
    messages = [{"role": "user", "content": images.chat_content(request)}]
    payload = _openai_payload(request, options, model, messages=messages)
    return await stream_request(
        client,
        base_url + "/v1/chat/completions",
        payload,
        request.prompt_len,
        read_openai_chunk,
        openai_error,
    )


Sender = Callable[[object, BenchRequest], Awaitable[RequestResult]]


def make_sender(backend: str, base_url: str, options: RequestOptions, model: str | None) -> Sender:
    base_url = base_url.rstrip("/")
    if backend == "openai-completions":
        return lambda client, request: send_openai_completion(
            client, base_url, request, options, model
        )
    if backend == "openai-chat":
        return lambda client, request: send_openai_chat(client, base_url, request, options, model)
    return lambda client, request: send_native(client, base_url, request, options)


# ---- the load ----


class WarmupFailed(RuntimeError):
    pass


async def arrivals(
    requests: list[BenchRequest], request_rate: float, rng: np.random.RandomState
) -> AsyncIterator[BenchRequest]:
    """The requests, spaced by exponential gaps (a Poisson process); all at once for rate inf."""
    for request in requests:
        yield request
        if not math.isinf(request_rate):
            await asyncio.sleep(rng.exponential(1.0 / request_rate))


def http_client() -> aiohttp.ClientSession:
    """aiohttp, as sglang.bench_serving uses: at thousands of SSE lines a second its parsing costs
    the client far less CPU than httpx's, so the client does not become the bottleneck."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        read_bufsize=1 << 20,
    )


async def warm_up(client, send: Sender, request: BenchRequest, count: int) -> None:
    results = await asyncio.gather(*(send(client, request) for _ in range(count)))
    failed = [r for r in results if not r.success]
    if failed:
        raise WarmupFailed(failed[0].error)


async def run_load(
    send: Sender,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    warmup_requests: int = 1,
    flush_url: str | None = None,
    show_progress: bool = False,
) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results in request order and the duration in seconds."""
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = progress_bar(len(requests), show_progress)

    async def limited(client, request: BenchRequest) -> RequestResult:
        if semaphore is None:
            result = await send(client, request)
        else:
            async with semaphore:
                result = await send(client, request)
        progress.update(1)
        return result

    async with http_client() as client:
        if warmup_requests > 0 and requests:
            await warm_up(client, send, requests[0], warmup_requests)
        if flush_url:
            async with client.post(flush_url) as response:
                await response.read()
        rng = np.random.RandomState(seed)
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(limited(client, r))
            async for r in arrivals(requests, request_rate, rng)
        ]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, desc="requests")


# ---- metrics ----


def latency_stats(name: str, values_s: list[float], stats: tuple[str, ...]) -> dict:
    """{"mean_<name>_ms": ..., "p99_<name>_ms": ...}; None where there are no values."""
    out = {}
    for stat in stats:
        key = f"{stat}_{name}_ms"
        if not values_s:
            out[key] = None
        elif stat == "mean":
            out[key] = float(np.mean(values_s)) * 1000
        elif stat == "median":
            out[key] = float(np.median(values_s)) * 1000
        elif stat == "max":
            out[key] = float(np.max(values_s)) * 1000
        else:  # pNN
            out[key] = float(np.percentile(values_s, float(stat[1:]))) * 1000
    return out


def per_second(amount: float, duration_s: float) -> float:
    return amount / duration_s if duration_s > 0 else 0.0


def tpot(result: RequestResult) -> float:
    """Time per output token after the first."""
    return (result.e2e - result.ttft) / (result.output_len - 1)


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict:
    """SGLang's BenchmarkMetrics over the successful requests (same keys, same formulas)."""
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    e2e = [r.e2e for r in done]
    metrics = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": per_second(len(done), duration_s),
        "input_throughput": per_second(total_input, duration_s),
        "output_throughput": per_second(total_output, duration_s),
        "total_throughput": per_second(total_input + total_output, duration_s),
    }
    metrics.update(
        latency_stats(
            "ttft", [r.ttft for r in done if r.ttft is not None], ("mean", "median", "p99")
        )
    )
    metrics.update(
        latency_stats(
            "tpot",
            [tpot(r) for r in done if r.output_len > 1 and r.ttft is not None],
            ("mean", "median", "p99"),
        )
    )
    metrics.update(
        latency_stats(
            "itl", [x for r in done for x in r.itl], ("mean", "median", "p95", "p99", "max")
        )
    )
    metrics.update(latency_stats("e2e_latency", e2e, ("mean", "median", "p99")))
    metrics["concurrency"] = per_second(sum(e2e), duration_s)
    reported = [r.server_prompt_len for r in done if r.server_prompt_len is not None]
    # what the server counted (image placeholders included); None when it reported nothing
    metrics["server_input_tokens"] = sum(reported) if reported else None
    return metrics


# ---- report ----

TABLE_WIDTH = 50
TABLE_ROWS = [
    # (label, metric key, or None for a section title)
    ("Successful requests:", "completed"),
    ("Failed requests:", "failed"),
    ("Benchmark duration (s):", "duration"),
    ("Total input tokens:", "total_input_tokens"),
    ("Total generated tokens:", "total_output_tokens"),
    ("Server-counted input tokens:", "server_input_tokens"),
    ("Request throughput (req/s):", "request_throughput"),
    ("Input token throughput (tok/s):", "input_throughput"),
    ("Output token throughput (tok/s):", "output_throughput"),
    ("Total token throughput (tok/s):", "total_throughput"),
    ("Concurrency:", "concurrency"),
    ("End-to-End Latency", None),
    ("Mean E2E Latency (ms):", "mean_e2e_latency_ms"),
    ("Median E2E Latency (ms):", "median_e2e_latency_ms"),
    ("P99 E2E Latency (ms):", "p99_e2e_latency_ms"),
    ("Time to First Token", None),
    ("Mean TTFT (ms):", "mean_ttft_ms"),
    ("Median TTFT (ms):", "median_ttft_ms"),
    ("P99 TTFT (ms):", "p99_ttft_ms"),
    ("Time per Output Token (excl. 1st token)", None),
    ("Mean TPOT (ms):", "mean_tpot_ms"),
    ("Median TPOT (ms):", "median_tpot_ms"),
    ("P99 TPOT (ms):", "p99_tpot_ms"),
    ("Inter-Token Latency", None),
    ("Mean ITL (ms):", "mean_itl_ms"),
    ("Median ITL (ms):", "median_itl_ms"),
    ("P95 ITL (ms):", "p95_itl_ms"),
    ("P99 ITL (ms):", "p99_itl_ms"),
    ("Max ITL (ms):", "max_itl_ms"),
]


def table_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(summary: dict) -> str:
    rate = summary["request_rate"]
    lines = [
        "{:=^{n}}".format(" Serving Benchmark Result ", n=TABLE_WIDTH),
        f"{'Backend:':<40} {summary['backend']}",
        f"{'Traffic request rate:':<40} {rate}",
        f"{'Max request concurrency:':<40} {summary['max_concurrency'] or 'not set'}",
    ]
    for label, key in TABLE_ROWS:
        if key is None:
            lines.append("{:-^{n}}".format(label, n=TABLE_WIDTH))
        else:
            lines.append(f"{label:<40} {table_value(summary[key])}")
    if summary.get("accept_length") is not None:
        lines.append(f"{'Accept length:':<40} {summary['accept_length']:.2f}")
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)


def run_settings(args: argparse.Namespace) -> dict:
    settings = {
        "backend": args.backend,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "seed": args.seed,
        "ignore_eos": not args.disable_ignore_eos,
        "extra_request_body": args.extra_request_body,
        "lora_names": args.lora_name,
    }
    if args.dataset == "image":
        settings["image_count"] = args.image_count
        settings["image_resolution"] = "x".join(map(str, args.image_resolution))
        settings["image_format"] = args.image_format
    return settings


def first_error(results: list[RequestResult]) -> str | None:
    return next((r.error for r in results if not r.success), None)


def report(summary: dict, results: list[RequestResult], output_file: str | None) -> None:
    print(format_table(summary))
    error = first_error(results)
    if error is not None:
        print(f"{summary['failed']} of {len(results)} requests failed; the first error: {error}")
    line = json.dumps(summary)
    if output_file:
        with open(output_file, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


# ---- the server and the prompts ----


def base_url_of(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def get_json(url: str) -> dict:
    """GET a JSON document from the server; {} when it has none."""
    try:
        response = httpx.get(url, timeout=INFO_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    return response.json()


def spec_counters(base_url: str) -> tuple[int, int]:
    """The server's speculative decoding counters since start: (verify steps, accepted drafts);
    zeros when it has none (another server, or speculation off)."""
    scheduler = get_json(base_url + "/get_server_info").get("scheduler") or {}
    return int(scheduler.get("spec_verify_steps") or 0), int(
        scheduler.get("spec_accepted_tokens") or 0
    )


def accept_length(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Average tokens per verify step between two spec_counters() readings (accepted drafts + 1);
    None when no verify step ran."""
    steps, accepted = after[0] - before[0], after[1] - before[1]
    return 1 + accepted / steps if steps > 0 else None


def served_model_name(base_url: str) -> str | None:
    models = get_json(base_url + "/v1/models").get("data") or []
    return models[0].get("id") if models else None


def load_tokenizer(path: str | None, revision: str | None = None, download_dir: str | None = None):
    """An HF tokenizer from a folder, GGUF or hub id (None: the embedded default model)."""
    from transformers import AutoTokenizer

    from radixserve.common.model_files import resolve_model_path

    return AutoTokenizer.from_pretrained(
        str(resolve_model_path(path, revision, download_dir, weights=False))
    )


def build_requests(
    args: argparse.Namespace, vocab_size: int | None, tokenizer_path: str | None
) -> list[BenchRequest]:
    common = dict(
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        seed=args.seed,
    )
    if args.dataset == "random-ids":
        vocab_size = args.vocab_size or vocab_size
        if not vocab_size:
            raise SystemExit(
                "error: random-ids needs the vocabulary size: the server did not report it "
                "(GET /get_model_info); pass --vocab-size"
            )
        return random_ids_requests(vocab_size=vocab_size, **common)
    path = args.tokenizer or tokenizer_path
    revision = args.revision if path == args.model_path else None  # --revision is the model's
    tokenizer = load_tokenizer(path, revision, args.download_dir)
    if args.dataset == "random":
        return random_text_requests(tokenizer=tokenizer, **common)
    requests = images.image_requests(
        tokenizer=tokenizer,
        image_count=args.image_count,
        resolution=args.image_resolution,
        image_format=args.image_format,
        **common,
    )
    if args.backend in NATIVE_BACKENDS:
        # /generate takes text: the chat template's rendering, one placeholder per picture
        for request in requests:
            request.prompt = images.native_prompt(tokenizer, request)
    return requests


def assign_adapters(requests: list[BenchRequest], names: list[str] | None) -> None:
    """Request i names adapter i mod len(names) (round-robin by index: the same on every run)."""
    for i, request in enumerate(requests):
        request.lora_name = names[i % len(names)] if names else None


def check_adapters(base_url: str, names: list[str] | None) -> None:
    """SystemExit naming the adapters the server does not list in /v1/models (when it lists any)."""
    if not names:
        return
    served = {m.get("id") for m in get_json(base_url + "/v1/models").get("data") or []}
    missing = [name for name in names if name not in served]
    if served and missing:
        raise SystemExit(
            f"error: the server has no LoRA adapter named {', '.join(missing)} "
            f"(GET /v1/models lists: {', '.join(sorted(str(m) for m in served))}); "
            "start it with --lora-paths NAME=PATH or load the adapter first"
        )


def run_against_server(args: argparse.Namespace) -> tuple[list[RequestResult], float, dict]:
    base_url = base_url_of(args)
    check_adapters(base_url, args.lora_name)
    info = get_json(base_url + "/get_model_info")
    requests = build_requests(
        args,
        info.get("vocab_size"),
        info.get("tokenizer_path") or info.get("model_path") or args.model_path,
    )
    assign_adapters(requests, args.lora_name)
    model = args.model
    if args.backend in ("openai-completions", "openai-chat") and not model:
        model = served_model_name(base_url)
    options = RequestOptions(not args.disable_ignore_eos, args.extra_request_body)
    send = make_sender(args.backend, base_url, options, model)
    flush_url = base_url + "/flush_cache" if args.flush_cache else None
    spec_before = spec_counters(base_url)  # the warmup requests' verify steps count too
    results, duration = run_event_loop(
        run_load(
            send,
            requests,
            args.request_rate,
            args.max_concurrency,
            args.seed,
            args.warmup_requests,
            flush_url,
            show_progress=not args.disable_tqdm,
        )
    )
    return (
        results,
        duration,
        {
            "base_url": base_url,
            "accept_length": accept_length(spec_before, spec_counters(base_url)),
        },
    )


# ---- command line ----


def resolution_arg(value: str) -> tuple[int, int]:
    try:
        return images.parse_resolution(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def json_object(text: str) -> dict:
    """argparse type: a JSON object (anything else is a usage error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"temperature\": 0.7}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="radixserve bench serving",
        description="Online serving benchmark (sglang.bench_serving semantics).",
    )
    p.add_argument(
        "--backend",
        choices=(*SERVER_BACKENDS, HF_BACKEND),
        default="radixserve",
        help="radixserve and sglang-native: POST /generate; openai-completions: POST /v1/completions; "
        "openai-chat: POST /v1/chat/completions; hf-transformers: no server, transformers' "
        "generate_batch",
    )
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--dataset",
        "--dataset-name",
        dest="dataset",
        choices=DATASETS,
        default="random",
        help="random: random text (needs a tokenizer); random-ids: random token ids sent as input_ids; "
        "image: random text plus --image-count random pictures (openai-chat, radixserve, "
        "sglang-native)",
    )
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths are uniform in [max(int(len * ratio), 1), len]",
    )
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (inf: all at once)",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument(
        "--extra-request-body",
        type=json_object,
        default={},
        metavar="JSON",
        help='a JSON object added to every request, e.g. \'{"temperature": 0.7, "top_p": 0.9}\': '
        "into /generate's sampling_params (radixserve backend), into the body (OpenAI backends)",
    )
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=1,
        help="requests sent (and awaited) before measuring",
    )
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after the warmup")
    p.add_argument(
        "--model", default=None, help="model name for openai-completions (default: GET /v1/models)"
    )
    p.add_argument(
        "--model-path",
        default=None,
        help="hf-transformers: the model folder; random dataset: fallback tokenizer "
        "(default: the embedded SmolLM2)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer for the random dataset (default: the server's tokenizer path)",
    )
    p.add_argument(
        "--revision", default=None, help="for a hub id --model-path: the branch, tag or commit"
    )
    p.add_argument(
        "--download-dir",
        default=None,
        help="for hub ids: the cache folder to read and download into (default: the hub's cache)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="random-ids vocabulary (default: the server's)"
    )
    p.add_argument(
        "--lora-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="LoRA adapters the requests name, round-robin by request index (request i: NAME number "
        "i mod N, the same on every run); `model` on the OpenAI backends, `lora_path` on /generate",
    )
    p.add_argument("--output-file", default=None, help="append the JSON result line to this file")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    image = p.add_argument_group("image dataset")
    image.add_argument(
        "--image-count",
        type=int,
        default=1,
        help="pictures per request (0: the same requests without them)",
    )
    image.add_argument(
        "--image-resolution",
        type=resolution_arg,
        default=images.parse_resolution(images.DEFAULT_RESOLUTION),
        help=f"WxH or one of {', '.join(images.NAMED_RESOLUTIONS)} "
        f"(default {images.DEFAULT_RESOLUTION})",
    )
    image.add_argument(
        "--image-format",
        choices=images.IMAGE_FORMATS,
        default="png",
        help="random-pixel PNGs take ~3 bytes a pixel (a 4k one is over the server's default "
        "--max-image-bytes); JPEG is smaller",
    )
    hf = p.add_argument_group("hf-transformers backend")
    hf.add_argument(
        "--dtype", default="bfloat16", choices=["auto", "bfloat16", "float16", "float32"]
    )
    hf.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights from the model's config",
    )
    hf.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    hf.add_argument(
        "--hf-num-blocks",
        type=int,
        default=None,
        help="KV cache blocks (default: sized from memory)",
    )
    hf.add_argument(
        "--hf-max-batch-tokens", type=int, default=None, help="most tokens per step (default: auto)"
    )
    hf.add_argument("--hf-scheduler", default="fifo", choices=["fifo", "prefill_first"])
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        parser.error("--num-prompts must be at least 1")
    if args.request_rate <= 0:
        parser.error("--request-rate must be positive (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.image_count < 0:
        parser.error("--image-count must be at least 0")
    if args.dataset == "image" and args.backend not in (*NATIVE_BACKENDS, "openai-chat"):
        parser.error(
            f"--dataset image needs a backend that carries pictures (openai-chat, "
            f"{', '.join(NATIVE_BACKENDS)}), not {args.backend}"
        )
    if args.backend == "openai-chat" and args.dataset == "random-ids":
        parser.error("--backend openai-chat sends text: use --dataset random or image")
    if args.lora_name and args.backend == HF_BACKEND:
        parser.error("--lora-name needs a server backend")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.backend == HF_BACKEND:
            from radixserve.bench.hf_baseline import run_hf_baseline

            results, duration, extra = run_hf_baseline(args)
        else:
            results, duration, extra = run_against_server(args)
    except WarmupFailed as e:
        print(f"error: the warmup request failed: {e}", file=sys.stderr)
        return 1
    summary = {**compute_metrics(results, duration), **run_settings(args), **extra}
    report(summary, results, args.output_file)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
