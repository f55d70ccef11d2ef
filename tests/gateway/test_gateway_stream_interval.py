"""--stream-interval N end to end: the real scheduler (fake executor) behind the gateway, whose detokenizer
runs the real Decode code (services/detokenizer/server.py) over a one-char-per-id tokenizer. A streamed
response at N = 4 has about a quarter of the events of N = 1 and the same text, stop position, logprobs
and usage."""

from __future__ import annotations

import pytest

from radixserve.detokenizer.server import DetokenizerServicer
from tests.gateway import fakes
from tests.gateway.real_scheduler import MODEL, MESSAGES, VOCAB, gateway_stack, read_stream, run
from tests.gateway.real_scheduler import sse_payloads

MAX_TOKENS = 64
PROMPT = "Once upon a time"


class CharTokenizer:
    """Token id i is chr(i); fakes.EOS_ID is a special token, as the fake detokenizer has it."""

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(
            ("" if skip_special_tokens else "<eos>") if i == fakes.EOS_ID else chr(i) for i in ids
        )


@pytest.fixture(autouse=True)
def real_decode(monkeypatch):
    """The stack's detokenizer decodes with the real service code (stop strings, stop_token_count)."""
    servicer = DetokenizerServicer(CharTokenizer())
    monkeypatch.setattr(fakes, "decode_item", servicer._decode_item)


def completion_body(**extra) -> dict:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def streamed_completion(stack, **extra) -> dict:
    payloads = sse_payloads(
        await read_stream(stack.client, "/v1/completions", completion_body(**extra))
    )
    events = [
        p
        for p in payloads
        if p["choices"] and (p["choices"][0]["text"] or p["choices"][0]["logprobs"])
    ]
    return {
        "text": "".join(p["choices"][0]["text"] for p in payloads if p["choices"]),
        "events": len(events),
        "logprobs": sum(
            len(p["choices"][0]["logprobs"]["tokens"])
            for p in events
            if p["choices"][0]["logprobs"]
        ),
        # Each event's logprobs are those of its own tokens (one char each here, no stop held back).
        "aligned": all(
            len((p["choices"][0]["logprobs"] or {}).get("tokens", []))
            == len(p["choices"][0]["text"])
            for p in events
        ),
        "finish": [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]][-1],
        "usage": [p["usage"] for p in payloads if p.get("usage")][-1],
    }


async def streamed_chat(stack) -> dict:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    payloads = sse_payloads(await read_stream(stack.client, "/v1/chat/completions", body))
    contents = [p["choices"][0]["delta"].get("content") for p in payloads if p["choices"]]
    contents = [c for c in contents if c]
    return {"text": "".join(contents), "events": len(contents)}


async def streamed_native(stack) -> dict:
    body = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0},
    }
    payloads = sse_payloads(await read_stream(stack.client, "/generate", body))
    return {
        "text": payloads[-1]["text"],
        "events": len(payloads),
        "ids": payloads[-1]["output_ids"],
        "completion_tokens": payloads[-1]["meta_info"]["completion_tokens"],
    }


def stop_ending_mid_batch(text: str, interval: int) -> tuple[str, int]:
    """A two-character stop string whose first occurrence ends at a token (1-based: 2 + its index) that
    does not end a batch at this interval (batches end at tokens 1, 1 + N, 1 + 2N, ...), so that the
    batch carrying it holds tokens after it; and the tokens kept (the one completing it included)."""
    for start in range(8, len(text) - 8):
        stop, completing = text[start : start + 2], start + 2
        if text.find(stop) == start and (completing - 1) % interval not in (0, interval - 1):
            return stop, completing
    raise AssertionError(f"no usable stop string in {text!r}")


async def responses(interval: int, tmp_path, stop: str | None = None) -> dict:
    async with gateway_stack(tmp_path / f"i{interval}", stream_interval=interval) as stack:
        out = {
            "completion": await streamed_completion(stack),
            "chat": await streamed_chat(stack),
            "native": await streamed_native(stack),
        }
        if stop is not None:
            out["stopped"] = await streamed_completion(stack, stop=[stop])
        await stack.assert_idle_without_leaks()
        return out


def test_stream_interval_4_sends_a_quarter_of_the_events_with_the_same_output(tmp_path):
    async def main():
        every = await responses(1, tmp_path)
        text = every["completion"]["text"]
        assert len(text) == MAX_TOKENS  # one char per token, no EOS in this run
        stop, kept = stop_ending_mid_batch(text, 4)
        every = await responses(1, tmp_path, stop)
        batched = await responses(4, tmp_path, stop)

        for kind in ("completion", "chat", "native"):
            assert batched[kind]["text"] == every[kind]["text"], kind
        # The first token alone, then 4 at a time: at most 1 + ceil(63 / 4) = 17 events (one more if
        # the finish comes apart from the last tokens). At N = 1 there is an event per step, less the
        # steps whose messages met in one event-loop turn on a loaded machine.
        assert batched["completion"]["events"] <= 18 < every["completion"]["events"]
        assert batched["chat"]["events"] <= 18 < every["chat"]["events"]
        assert batched["native"]["events"] <= 19 < every["native"]["events"]
        assert batched["native"]["ids"] == every["native"]["ids"]
        assert batched["native"]["completion_tokens"] == MAX_TOKENS
        for run_ in (every, batched):
            assert run_["completion"]["logprobs"] == MAX_TOKENS
            assert run_["completion"]["aligned"]
            assert run_["completion"]["usage"]["completion_tokens"] == MAX_TOKENS
            assert run_["completion"]["finish"] == "length"

        # A stop string inside a batch: cut at the same character, the tokens after it dropped.
        cut_every, cut_batched = every["stopped"], batched["stopped"]
        assert cut_every["text"] == text[: kept - 2] == cut_batched["text"]
        assert cut_every["finish"] == cut_batched["finish"] == "stop"
        assert cut_every["usage"]["completion_tokens"] == kept
        assert cut_batched["usage"]["completion_tokens"] == kept
        assert cut_batched["logprobs"] == cut_every["logprobs"] == kept

    run(main(), timeout=120)
