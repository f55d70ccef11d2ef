"""stop_token_count with the real SmolLM2 tokenizer: several tokens decoded in one call (--stream-interval N,
speculative steps) report how many of them it took to reach the stop, which is where token-by-token
decoding stops."""

from __future__ import annotations

import pytest

from radixserve.common.model_files import resolve_model_path
from radixserve.detokenizer.incremental import DecodeState, decode_step
from radixserve.tokenizer.core import load_tokenizer

TEXT = "The capital of France is Paris. Crème brûlée 🤖 is sweet; the end. More text after it."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None))


def one_by_one(tokenizer, ids, stop, stop_regex=()):
    """(tokens fed when token-by-token decoding stopped, the text before the stop)."""
    state, text = DecodeState(), ""
    for count, token in enumerate(ids, 1):
        step = decode_step(tokenizer, state, [token], stop, stop_regex=stop_regex)
        state, text = step.state, text + step.text
        if step.stopped:
            return count, text
    raise AssertionError("never stopped")


@pytest.mark.parametrize(
    "stop,stop_regex",
    [(["Paris"], []), (["brûlée"], []), (["🤖"], []), (["the end"], []), ([], [r"sw\w+t"])],
)
@pytest.mark.parametrize("batch", [2, 3, 4, 8, 64])
def test_batched_decode_stops_at_the_token_where_one_by_one_stops(
    tokenizer, stop, stop_regex, batch
):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stopped_at, expected_text = one_by_one(tokenizer, ids, stop, stop_regex)
    state, text, fed = DecodeState(), "", 0
    while True:
        chunk = ids[fed : fed + batch]
        step = decode_step(tokenizer, state, chunk, stop, stop_regex=stop_regex)
        state, text = step.state, text + step.text
        if step.stopped:
            assert fed + step.stop_token_count == stopped_at
            assert 1 <= step.stop_token_count <= len(chunk)
            break
        assert step.stop_token_count == 0
        fed += len(chunk)
    assert text == expected_text


def test_no_stop_no_count(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    step = decode_step(tokenizer, DecodeState(), ids, ["not in it"], final=True)
    assert not step.stopped and step.stop_token_count == 0
