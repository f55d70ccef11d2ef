"""Incremental detokenization and stop strings with the real SmolLM2 tokenizer, and the gRPC service."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.v1 import detokenizer_pb2, detokenizer_pb2_grpc
from radixserve.common import grpc_util
from radixserve.common.model_files import resolve_model_path
from radixserve.detokenizer.incremental import DecodeState, decode_step
from radixserve.detokenizer.server import INLINE_DECODE_MAX_ITEMS, decodes_inline, start_server
from radixserve.tokenizer.core import load_tokenizer

TEXTS = [
    "Hello, world! This is plain ASCII.",
    "Crème brûlée, naïve façade, Ærøskøbing, Ångström.",
    "中文分词测试，日本語のテキスト、한국어 문장.",
    "Emoji: 🤖🎉👩‍👩‍👧‍👦 🇫🇷 and 🏳️‍🌈 flags.",
    "mixed  spaces\n\nnew\tlines 你好 🌍 café\n  end ",
    "   ",
    "\ufffd a real replacement character \ufffd",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and ancient 𓀀𓀁",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None))


def stream(tokenizer, ids, chunk_sizes=None, stop=(), skip_special_tokens=True):
    """Feed ids in chunks, then a final call; returns the emitted pieces and all steps."""
    state, pieces, steps, pos = DecodeState(), [], [], 0
    sizes = iter(chunk_sizes or [])
    while pos < len(ids):
        size = next(sizes, 1)
        step = decode_step(tokenizer, state, ids[pos : pos + size], stop, skip_special_tokens)
        pos += size
        pieces.append(step.text)
        steps.append(step)
        state = step.state
        if step.stopped:
            return pieces, steps
    step = decode_step(tokenizer, state, [], stop, skip_special_tokens, final=True)
    return pieces + [step.text], steps + [step]


def assert_streams_like_full_decode(tokenizer, ids, chunk_sizes=None):
    for skip in (True, False):
        pieces, steps = stream(tokenizer, ids, chunk_sizes, skip_special_tokens=skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        # A character is never split: only the final flush may end in an incomplete one.
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), pieces
        # U+FFFD only where the text itself has it. (SmolLM2's vocabulary lacks a few bytes, e.g. 0xF1
        # for U+40000..U+7FFFF, so some texts decode with U+FFFD even in one piece.)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), pieces
        assert steps[-1].state.emitted_chars == len(full)


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert_streams_like_full_decode(tokenizer, ids)


@pytest.mark.parametrize("seed", range(4))
def test_random_chunk_sizes(tokenizer, seed):
    rng = random.Random(seed)
    text = "".join(rng.sample(TEXTS, len(TEXTS)))
    ids = tokenizer.encode(text, add_special_tokens=False)
    sizes = [rng.randint(1, 6) for _ in ids]
    assert_streams_like_full_decode(tokenizer, ids, sizes)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo 🌍"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = (
        list(ids)
        + tokenizer.encode("Bonjour 🌍!", add_special_tokens=False)
        + [tokenizer.eos_token_id]
    )
    assert_streams_like_full_decode(tokenizer, ids)
    kept = "".join(stream(tokenizer, ids, skip_special_tokens=False)[0])
    assert kept.startswith("<|im_start|>system") and kept.endswith("<|im_end|>")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(min_size=1, max_size=40), data=st.data())
def test_hypothesis_unicode(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)))
    assert_streams_like_full_decode(tokenizer, ids, sizes)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(min_size=2, max_size=40), data=st.data())
def test_hypothesis_stop_strings(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : data.draw(st.integers(start + 1, len(full)))]
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)))
    pieces, steps = stream(tokenizer, ids, sizes, stop=[stop])
    assert "".join(pieces) == full[: full.index(stop)]
    assert steps[-1].stopped and steps[-1].matched_stop == stop


def test_stop_string_spanning_tokens(tokenizer):
    text = "The answer is forty-two, final answer. Then more text."
    stop = "final answer"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokenizer.encode(stop, add_special_tokens=False)) > 1
    pieces, steps = stream(tokenizer, ids, stop=[stop, "never matches"])
    emitted = "".join(pieces)
    assert emitted == text[: text.index(stop)]
    assert steps[-1].stopped and steps[-1].matched_stop == stop
    assert not any(s.stopped for s in steps[:-1])
    assert "final" not in emitted


def test_earliest_stop_wins(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = decode_step(tokenizer, DecodeState(), ids, ["delta", "beta"])
    assert (step.text, step.stopped, step.matched_stop) == ("alpha ", True, "beta")


def test_stop_inside_one_token_and_across_calls(tokenizer):
    text = "Hello world<|stop|>rest"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, steps = stream(tokenizer, ids, stop=["<|stop|>"])
    assert "".join(pieces) == "Hello world" and steps[-1].matched_stop == "<|stop|>"


def test_partial_stop_held_then_flushed_on_final(tokenizer):
    text = "The result is final ans"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, steps = stream(tokenizer, ids, stop=["final answer"])
    before_final = "".join(pieces[:-1])
    assert before_final == "The result is "  # "final ans" may still become the stop string
    assert pieces[-1] == "final ans"
    assert not steps[-1].stopped and steps[-1].state.held_text == ""
    assert "".join(pieces) == text


def test_partial_stop_released_when_it_diverges(tokenizer):
    text = "final answers differ: final anchor"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, steps = stream(tokenizer, ids, stop=["final answer!"])
    assert "".join(pieces) == text
    assert not any(s.stopped for s in steps)


def test_empty_stop_strings_are_ignored(tokenizer):
    ids = tokenizer.encode("abc", add_special_tokens=False)
    step = decode_step(tokenizer, DecodeState(), ids, [""], final=True)
    assert step.text == "abc" and not step.stopped


def test_window_stays_bounded(tokenizer):
    paragraph = "Streaming text with accents é, CJK 中文, emoji 🤖 and spaces.\n"
    ids = tokenizer.encode(paragraph * 60, add_special_tokens=False)[:500]
    assert len(ids) == 500
    state, longest = DecodeState(), 0
    for token in ids:
        state = decode_step(tokenizer, state, [token]).state
        longest = max(longest, len(state.window_ids))
    assert longest <= 8


def test_window_bounded_through_skipped_special_tokens(tokenizer):
    state = DecodeState()
    for token in tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id] * 500:
        step = decode_step(tokenizer, state, [token], skip_special_tokens=True)
        state = step.state
    assert len(state.window_ids) <= 2
    assert step.state.emitted_chars == 2


async def _grpc_scenario(tokenizer) -> None:
    server, port = await start_server(tokenizer, "127.0.0.1:0")
    texts = {"a": "Bonjour, le monde 🌍 中文!", "b": "stop here STOP not this"}
    ids = {rid: tokenizer.encode(t, add_special_tokens=False) for rid, t in texts.items()}
    try:
        async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
            stub = detokenizer_pb2_grpc.DetokenizerStub(channel)
            states = {rid: detokenizer_pb2.DetokenizerState() for rid in texts}
            out = {rid: "" for rid in texts}
            stopped = {}
            longest = max(len(v) for v in ids.values())
            for pos in range(longest + 1):
                active = [rid for rid in texts if rid not in stopped]
                request = detokenizer_pb2.DetokenizerDecodeRequest(
                    items=[
                        detokenizer_pb2.DetokenizerDecodeItem(
                            request_id=rid,
                            state=states[rid],
                            new_token_ids=ids[rid][pos : pos + 1],
                            stop=["STOP"],
                            skip_special_tokens=True,
                            final=pos >= len(ids[rid]),
                        )
                        for rid in active
                    ]
                )
                response = await stub.Decode(request)
                assert [r.request_id for r in response.results] == active
                for result in response.results:
                    out[result.request_id] += result.text
                    states[result.request_id] = result.state
                    if result.stopped:
                        stopped[result.request_id] = result.matched_stop
            assert out == {"a": texts["a"], "b": "stop here "}
            assert stopped == {"b": "STOP"}

            bad_id = detokenizer_pb2.DetokenizerDecodeItem(request_id="x", new_token_ids=[10**9])
            bad_state = detokenizer_pb2.DetokenizerDecodeItem(
                request_id="y",
                state=detokenizer_pb2.DetokenizerState(window_ids=[1], read_offset=5),
            )
            for item in (bad_id, bad_state):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Decode(detokenizer_pb2.DetokenizerDecodeRequest(items=[item]))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)


def test_grpc_batch_decode_in_process(tokenizer):
    asyncio.run(_grpc_scenario(tokenizer))


def test_small_batches_decode_on_the_loop_large_ones_on_a_thread_with_the_same_results(tokenizer):
    def batch(n: int) -> detokenizer_pb2.DetokenizerDecodeRequest:
        ids = tokenizer.encode("Crème brûlée 🌍 STOP", add_special_tokens=False)
        return detokenizer_pb2.DetokenizerDecodeRequest(
            items=[
                detokenizer_pb2.DetokenizerDecodeItem(
                    request_id=str(i), new_token_ids=ids, stop=["STOP"], final=True
                )
                for i in range(n)
            ]
        )

    small, large = batch(INLINE_DECODE_MAX_ITEMS), batch(INLINE_DECODE_MAX_ITEMS + 1)
    assert decodes_inline(small) and not decodes_inline(large)

    async def decode_both():
        server, port = await start_server(tokenizer, "127.0.0.1:0")
        try:
            async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
                stub = detokenizer_pb2_grpc.DetokenizerStub(channel)
                bad = detokenizer_pb2.DetokenizerDecodeItem(request_id="x", new_token_ids=[10**9])
                large_bad = detokenizer_pb2.DetokenizerDecodeRequest(items=[*large.items, bad])
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Decode(large_bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                return await stub.Decode(small), await stub.Decode(large)
        finally:
            await server.stop(None)

    small_out, large_out = asyncio.run(decode_both())
    assert [(r.text, r.stopped) for r in small_out.results] == [("Crème brûlée 🌍 ", True)] * len(
        small.items
    )
    assert list(large_out.results)[: len(small.items)] == list(small_out.results)
    assert len(large_out.results) == len(large.items)
