"""Reasoning parsers: whole-text splits per format, and streamed splits equal to them wherever the
deltas are cut (inside a marker too)."""

import pytest

from radixserve.gateway.pipeline.reasoning_parsers import (
    REASONING_PARSER_NAMES,
    ReasoningSplit,
    get_reasoning_parser,
)

HARMONY_CALL = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)

# (parser, model text, reasoning, content)
CASES = [
    (
        "qwen3",
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "Let me think.",
        "The answer is 4.",
    ),
    ("qwen3", "The answer is 4.", None, "The answer is 4."),  # enable_thinking=false: no block
    ("qwen3", "<think>\nCut off by max_tok", "Cut off by max_tok", ""),
    ("qwen3", "  <think>a < b </thin", "a < b </thin", ""),
    ("qwen3", "Say <think> here", None, "Say <think> here"),
    ("qwen3", "<think></think>\n\nplain", None, "plain"),
    ("qwen3", "<think>x</think>keep  trailing\n", "x", "keep  trailing\n"),
    ("qwen3-thinking", "Step 1, step 2.\n</think>\n\nDone", "Step 1, step 2.", "Done"),
    ("deepseek-r1", "Hmm.\n\nWait.\n</think>\n\n42", "Hmm.\n\nWait.", "42"),
    ("deepseek-r1", "<think>\nrepeated opener\n</think>42", "repeated opener", "42"),
    ("deepseek-r1", "no end marker at all", "no end marker at all", ""),
    ("deepseek_r1", "r</think>c", "r", "c"),
    ("glm45", "<think>plan</think>reply", "plan", "reply"),
    ("kimi", "◁think▷ponder◁/think▷answer", "ponder", "answer"),
    ("kimi", "answer only", None, "answer only"),
    (
        "gpt-oss",
        "<|channel|>analysis<|message|>User wants 2+2.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>",
        "User wants 2+2.",
        "4",
    ),
    ("gpt-oss", "<|channel|>analysis<|message|>cut off", "cut off", ""),
    (
        "openai_gptoss",
        "<|channel|>analysis<|message|>Need weather.<|end|>" + HARMONY_CALL,
        "Need weather.",
        HARMONY_CALL,
    ),
    ("gpt-oss", "plain text, no harmony", None, "plain text, no harmony"),
]


def streamed(name: str, deltas: list[str]) -> ReasoningSplit:
    splitter = get_reasoning_parser(name).splitter()
    reasoning, content = "", ""
    for delta in deltas:
        r, c = splitter.feed(delta)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return ReasoningSplit(reasoning + r or None, content + c)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_whole_text_is_split_into_reasoning_and_content(name, text, reasoning, content):
    assert get_reasoning_parser(name).parse(text) == ReasoningSplit(reasoning, content)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_a_stream_cut_at_every_character_splits_as_the_whole_text(name, text, reasoning, content):
    whole = ReasoningSplit(reasoning, content)
    for i in range(len(text) + 1):
        assert streamed(name, [text[:i], text[i:]]) == whole, i
    assert streamed(name, list(text)) == whole


def test_reasoning_streams_before_the_end_marker_arrives():
    splitter = get_reasoning_parser("qwen3").splitter()
    assert splitter.feed("<think>\nfirst ") == ("first", "")
    assert splitter.feed("second </th") == (" second", "")
    assert splitter.feed("ink>\n\nhello") == ("", "hello")
    assert splitter.finish() == ("", "")


def test_every_name_resolves_and_an_unknown_one_lists_the_known():
    for name in REASONING_PARSER_NAMES:
        assert get_reasoning_parser(name).parse("x") is not None
    assert {"deepseek-r1", "qwen3", "qwen3-thinking", "glm45", "kimi", "gpt-oss"} <= set(
        REASONING_PARSER_NAMES
    )
    with pytest.raises(ValueError, match="choose one of .*deepseek-r1"):
        get_reasoning_parser("nope")
