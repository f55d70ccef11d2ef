"""Special tokens in chat output, through the real detokenizer over a tokenizer that has them: the
parsers that read special-token markers (mistral's `[TOOL_CALLS]`) get the text with them, and the
stop token that ended a request (EOS `</s>`) is never shown, with or without such a parser."""

import json
from concurrent import futures

import grpc
import openai
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from radixserve.v1 import detokenizer_pb2_grpc
from radixserve.detokenizer.server import DetokenizerServicer
from radixserve.gateway.pipeline.tool_parsers import get_tool_parser
from radixserve.gateway.pipeline.reasoning_parsers import get_reasoning_parser
from tests.gateway import fakes
from tests.gateway.fakes import EOS_ID, SCRIPT_CLOSE, SCRIPT_OPEN, RunningGateway, SyncDecodeStream

# The fake model's ids are code points; the tokenizer gives each of the first ones its character,
# except EOS (`</s>`) and one id that is the special token `[TOOL_CALLS]`.
TOOL_CALLS_ID = 0x3000
EOS_TEXT = "</s>"
CALL_ARGS = {"city": "Paris"}
TOOL_OUTPUT = (
    "Sure." + chr(TOOL_CALLS_ID) + json.dumps([{"name": "get_weather", "arguments": CALL_ARGS}])
)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


def special_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {chr(i): i for i in range(TOOL_CALLS_ID) if i != EOS_ID}
    vocab[EOS_TEXT] = EOS_ID
    vocab["[TOOL_CALLS]"] = TOOL_CALLS_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TEXT, clean_up_tokenization_spaces=False
    )
    hf.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    return hf


class SyncDetokenizer(SyncDecodeStream, DetokenizerServicer):
    """The real servicer, served by a synchronous gRPC server as the fakes are."""

    def Decode(self, request, context):
        return self._decode_batch(request)


@pytest.fixture(scope="module")
def real_detokenizer_backends(backends):
    tokenizer = special_tokenizer()
    assert tokenizer.decode([EOS_ID, TOOL_CALLS_ID], skip_special_tokens=False) == (
        EOS_TEXT + "[TOOL_CALLS]"
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    detokenizer_pb2_grpc.add_DetokenizerServicer_to_server(SyncDetokenizer(tokenizer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    real = fakes.FakeBackends.__new__(fakes.FakeBackends)
    real.tokenizer_addr, real.scheduler_addr = backends.tokenizer_addr, backends.scheduler_addr
    real.detokenizer_addr = f"127.0.0.1:{port}"
    yield real
    server.stop(0).wait()


def client_of(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


def scripted(text: str) -> list[dict]:
    return [{"role": "user", "content": SCRIPT_OPEN + text + SCRIPT_CLOSE}]


@pytest.fixture(scope="module")
def mistral_gw(real_detokenizer_backends):
    running = RunningGateway(real_detokenizer_backends, tool_call_parser="mistral")
    yield running
    running.close()


@pytest.fixture(scope="module")
def plain_gw(real_detokenizer_backends):
    running = RunningGateway(real_detokenizer_backends)
    yield running
    running.close()


def test_parsers_that_read_special_tokens_say_so():
    needing = {
        n
        for n in ("mistral", "gpt-oss", "kimi_k2", "hermes")
        if get_tool_parser(n).needs_special_tokens
    }
    assert needing == {"mistral", "gpt-oss", "kimi_k2"}
    assert not get_tool_parser("hermes").needs_special_tokens
    assert get_reasoning_parser("gpt-oss").needs_special_tokens
    assert get_reasoning_parser("kimi").needs_special_tokens
    assert not get_reasoning_parser("qwen3").needs_special_tokens


def test_mistral_calls_behind_a_special_token_are_parsed(mistral_gw):
    client = client_of(mistral_gw)
    response = client.chat.completions.create(
        model=fakes.MODEL, messages=scripted(TOOL_OUTPUT), tools=TOOLS, max_tokens=100
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", CALL_ARGS)]
    # EOS is counted but its text is not shown
    assert response.usage.completion_tokens == len(TOOL_OUTPUT) + 1


def test_mistral_calls_stream_and_no_eos_text_leaks(mistral_gw):
    client = client_of(mistral_gw)
    stream = client.chat.completions.create(
        model=fakes.MODEL, messages=scripted(TOOL_OUTPUT), tools=TOOLS, max_tokens=100, stream=True
    )
    content, arguments, names, reasons = "", "", [], []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                names += [call.function.name] if call.function.name else []
                arguments += call.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert content == "Sure." and names == ["get_weather"]
    assert json.loads(arguments) == CALL_ARGS and reasons[-1] == "tool_calls"


def test_a_plain_answer_with_the_special_token_parser_shows_no_eos(mistral_gw):
    client = client_of(mistral_gw)
    for tools in (TOOLS, None):
        extra = {"tools": tools} if tools else {}
        message = client.chat.completions.create(
            model=fakes.MODEL, messages=scripted("Hello there"), max_tokens=50, **extra
        ).choices[0]
        assert message.message.content == "Hello there" and message.finish_reason == "stop"
        streamed = client.chat.completions.create(
            model=fakes.MODEL, messages=scripted("Hello there"), max_tokens=50, stream=True, **extra
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
            "Hello there"
        )


def test_without_such_a_parser_special_tokens_are_skipped_as_before(plain_gw):
    client = client_of(plain_gw)
    message = (
        client.chat.completions.create(
            model=fakes.MODEL, messages=scripted(TOOL_OUTPUT), max_tokens=100
        )
        .choices[0]
        .message
    )
    assert message.content == TOOL_OUTPUT.replace(chr(TOOL_CALLS_ID), "")
    kept = client.chat.completions.create(
        model=fakes.MODEL,
        messages=scripted("Hi"),
        max_tokens=10,
        extra_body={"skip_special_tokens": False},
    )
    assert kept.choices[0].message.content == "Hi"  # the ending EOS is not shown either way
    text = client.completions.create(
        model=fakes.MODEL,
        prompt=SCRIPT_OPEN + "Hi" + chr(TOOL_CALLS_ID) + SCRIPT_CLOSE,
        max_tokens=10,
        extra_body={"skip_special_tokens": False},
    )
    assert text.choices[0].text == "Hi[TOOL_CALLS]"


def test_responses_api_reads_special_token_calls_too(mistral_gw):
    response = client_of(mistral_gw).responses.create(
        model=fakes.MODEL,
        input=SCRIPT_OPEN + TOOL_OUTPUT + SCRIPT_CLOSE,
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    )
    message, call = response.output
    assert response.output_text == "Sure." and message.type == "message"
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == CALL_ARGS
