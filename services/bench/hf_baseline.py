"""The HF transformers baseline of `radixserve bench serving`: the same prompts through
transformers' own continuous batching (`model.generate_batch`), with no server.

--model-path is loaded with transformers (from_pretrained, or random weights from its config with
--load-format dummy) in --dtype, on cuda when there is one; every prompt goes to generate_batch at
once (request rate inf), and --max-concurrency becomes ContinuousBatchingConfig.max_requests_per_batch.

Differences from a server run, to keep in mind when comparing:
- generate_batch takes one max_new_tokens for all requests, so every request generates the longest
  output length drawn: use --random-range-ratio 1.0 to give both runs the same work.
  total_output_tokens counts the tokens actually generated; prompt lengths are those of the ids
  generate_batch was given (including a BOS the tokenizer adds to random text).
- TTFT, ITL and E2E come from transformers' per-token timestamps (record_timestamps), measured
  from when the request was queued, inside the process: no HTTP, no detokenization. `duration`
  runs from the first request queued to the last one finished; it leaves out loading, the KV cache
  allocation and transformers' warmup (CUDA graph capture), which `hf_generate_batch_wall_s` includes.
  With --max-concurrency every request still starts its clock when generate_batch queues it, so its
  TTFT and E2E include the wait for a batch slot (a server run starts the clock once the request
  got a concurrency slot): compare throughputs, not latencies, in that case.
Only API present in transformers 5.17 through 5.23 is used.

Example:

    radixserve bench serving --backend hf-transformers --model-path /models/Llama-3.2-1B --dtype bfloat16 \\
        --dataset random-ids --random-input-len 512 --random-output-len 256 --random-range-ratio 1.0 \\
        --num-prompts 200 --output-file results.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from radixserve.bench.datasets import BenchRequest
from radixserve.bench.serving import RequestResult, build_requests


def pick_device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str, config):
    import torch

    if name == "auto":
        return getattr(config, "dtype", None) or torch.float32
    return getattr(torch, name)


def load_model(folder: str, config, dtype: str, load_format: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    if load_format == "dummy":
        torch.manual_seed(0)
        # Built (and randomly initialised) on the target device: on the CPU an 8B init takes minutes.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype, config))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype, config))
    return model.to(device).eval()


def vocab_size_of(config) -> int:
    return config.get_text_config().vocab_size


def prompt_token_ids(requests: list[BenchRequest], tokenizer_path: str) -> list[list[int]]:
    """Text prompts are tokenized as the server tokenizes them (special tokens added)."""
    if all(isinstance(r.prompt, list) for r in requests):
        return [list(r.prompt) for r in requests]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return [
        r.prompt if isinstance(r.prompt, list) else tokenizer(r.prompt)["input_ids"]
        for r in requests
    ]


def generation_config(model, max_new_tokens: int, ignore_eos: bool):
    from transformers import GenerationConfig

    eos = None
    if not ignore_eos:
        eos = model.generation_config.eos_token_id
        eos = model.config.eos_token_id if eos is None else eos
    # -1: no EOS (None would make generate_batch fall back to the model's EOS)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1 if eos is None else eos
    )


def batching_config(args: argparse.Namespace):
    from transformers import ContinuousBatchingConfig

    options = {
        "num_blocks": args.hf_num_blocks,
        "max_batch_tokens": args.hf_max_batch_tokens,
        "max_requests_per_batch": args.max_concurrency,
        "scheduler_type": args.hf_scheduler,
    }
    return ContinuousBatchingConfig(**{k: v for k, v in options.items() if v is not None})


def end_time(output) -> float:
    if output.lifespan[1] > 0:
        return output.lifespan[1]
    return output.timestamps[-1] if output.timestamps else output.created_time


def result_of(output) -> RequestResult:
    """A RequestResult from one of generate_batch's GenerationOutput."""
    result = RequestResult(len(output.prompt_ids))
    if output.error is not None:
        result.error = str(output.error)
        return result
    stamps = output.timestamps or []
    result.output_len = len(output.generated_tokens)
    result.e2e = end_time(output) - output.created_time
    if stamps:
        result.ttft = stamps[0] - output.created_time
        result.itl = [float(gap) for gap in np.diff(stamps)]
    result.success = True
    return result


def request_span(outputs) -> float:
    """From the first request queued to the last one finished, in seconds."""
    return max(end_time(o) for o in outputs) - min(o.created_time for o in outputs)


def generate(
    model, inputs: list[list[int]], max_new_tokens: int, args: argparse.Namespace, timestamps: bool
):
    return model.generate_batch(
        inputs=inputs,
        generation_config=generation_config(model, max_new_tokens, not args.disable_ignore_eos),
        continuous_batching_config=batching_config(args),
        record_timestamps=timestamps,
        progress_bar=timestamps and not args.disable_tqdm,
    )


def run_hf_baseline(args: argparse.Namespace) -> tuple[list[RequestResult], float, dict]:
    """Returns the results, the duration in seconds and extra keys for the JSON report."""
    import transformers
    from transformers import AutoConfig

    from radixserve.common.model_files import resolve_model_path

    folder = str(
        resolve_model_path(
            args.model_path,
            revision=args.revision,
            download_dir=args.download_dir,
            weights=args.load_format != "dummy",
        )
    )
    config = AutoConfig.from_pretrained(folder)
    requests = build_requests(args, vocab_size_of(config), folder)
    tokenizer = folder
    if args.tokenizer:
        tokenizer = str(
            resolve_model_path(args.tokenizer, download_dir=args.download_dir, weights=False)
        )
    inputs = prompt_token_ids(requests, tokenizer)
    max_new_tokens = max(r.output_len for r in requests)
    if len({r.output_len for r in requests}) > 1:
        print(
            f"note: generate_batch takes one max_new_tokens; every request generates up to {max_new_tokens} "
            "tokens (use --random-range-ratio 1.0 for the same work as a server run)",
            file=sys.stderr,
        )
    if not math.isinf(args.request_rate):
        print(
            "note: hf-transformers queues every request at once; --request-rate is ignored",
            file=sys.stderr,
        )
    device = pick_device(args.device)
    model = load_model(folder, config, args.dtype, args.load_format, device)
    if args.warmup_requests > 0:
        generate(model, inputs[:1] * args.warmup_requests, max_new_tokens, args, timestamps=False)
    started = time.perf_counter()
    outputs = list(generate(model, inputs, max_new_tokens, args, timestamps=True).values())
    wall = time.perf_counter() - started
    missing = len(inputs) - len(outputs)
    results = [result_of(o) for o in outputs]
    results += [
        RequestResult(0, error="missing from generate_batch's results") for _ in range(missing)
    ]
    extra = {
        "model_path": folder,
        "device": device,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "transformers_version": transformers.__version__,
        "hf_max_new_tokens": max_new_tokens,
        "hf_generate_batch_wall_s": wall,
    }
    return results, request_span(outputs) if outputs else wall, extra
