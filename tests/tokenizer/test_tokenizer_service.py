"""The tokenizer service with the real SmolLM2 tokenizer: encoding, chat templates, gRPC."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from transformers import AutoTokenizer

from radixserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from radixserve.common import grpc_util
from radixserve.common.model_files import resolve_model_path
from radixserve.tokenizer.conversation import Conversation, conversation_from_proto
from radixserve.tokenizer.core import TokenizerCore
from radixserve.tokenizer.named_chat_templates import resolve_chat_template
from radixserve.tokenizer.server import start_server

SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEXTS = [
    "Hello, world!",
    "  leading spaces\nand newlines\n\n",
    "café ünïcödé",
    "中文分词测试",
    "emoji 🤖🎉",
    "",
]
ROLE_TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def folder():
    return resolve_model_path(None)


@pytest.fixture(scope="module")
def core(folder):
    return TokenizerCore(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return AutoTokenizer.from_pretrained(str(folder))


def user_chat(content: str = "What is 2+2?") -> Conversation:
    return Conversation([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_autotokenizer(core, hf, add_special_tokens):
    expected = [hf.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS]
    assert core.encode(TEXTS, add_special_tokens) == expected


def test_encode_empty_batch(core):
    assert core.encode([]) == []


def test_chat_matches_transformers(core, hf):
    [rendered] = core.apply_chat_template([user_chat()])
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert rendered.ids == list(expected)
    assert rendered.prompt == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.prompt.endswith("<|im_start|>assistant\n")


def test_default_system_prompt_only_without_system_message(core):
    [plain] = core.apply_chat_template([user_chat()])
    assert SMOL_SYSTEM_PROMPT in plain.prompt
    with_system = Conversation(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    [custom] = core.apply_chat_template([with_system])
    assert SMOL_SYSTEM_PROMPT not in custom.prompt
    assert custom.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_continue_final_message_leaves_assistant_open(core):
    conv = Conversation(
        [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two,"},
        ],
        continue_final_message=True,
    )
    [rendered] = core.apply_chat_template([conv])
    assert rendered.prompt.endswith("<|im_start|>assistant\nOne, two,")
    assert rendered.ids == core.encode([rendered.prompt])[0]


def test_chat_template_override_literal(folder):
    core = TokenizerCore(folder, chat_template=ROLE_TEMPLATE)
    [rendered] = core.apply_chat_template([user_chat("hi")])
    assert rendered.prompt == "[user]hi"
    assert core.info().chat_template == ROLE_TEMPLATE


def test_chat_template_override_file(folder, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(ROLE_TEMPLATE + "<|im_end|>")
    core = TokenizerCore(folder, chat_template=str(path))
    [rendered] = core.apply_chat_template([user_chat("hi")])
    assert rendered.prompt == "[user]hi<|im_end|>"
    assert rendered.ids[-1] == 2  # the template's special token is encoded as one id


def test_chat_template_flag_neither_file_nor_template():
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        resolve_chat_template("/no/such/template.jinja")


def test_missing_chat_template_is_a_clear_error(folder):
    core = TokenizerCore(folder)
    core.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        core.apply_chat_template([user_chat()])
    assert core.info().chat_template == ""


def test_template_exception_becomes_value_error(folder):
    core = TokenizerCore(folder, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        core.apply_chat_template([user_chat()])


def test_template_runs_sandboxed(folder):
    core = TokenizerCore(folder, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        core.apply_chat_template([user_chat()])


def test_tools_and_tool_calls_reach_the_template(folder):
    template = (
        "{{ tools | map(attribute='function.name') | join(',') }}|"
        "{% for m in messages %}{{ m.role }}:{% if m.tool_calls is defined %}"
        "{{ m.tool_calls[0].function.name }}{% endif %}"
        "{% if m.tool_call_id is defined %}#{{ m.tool_call_id }}{% endif %}"
        "{% if m.name is defined %}@{{ m.name }}{% endif %};{% endfor %}"
    )
    core = TokenizerCore(folder, chat_template=template)
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    conv = common_pb2.ChatConversation(
        tools_json=json.dumps([tool]),
        messages=[
            common_pb2.ChatMessage(role="user", content="weather?", name="ann"),
            common_pb2.ChatMessage(
                role="assistant", content="", tool_calls_json=json.dumps([call])
            ),
            common_pb2.ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
        ],
    )
    [rendered] = core.apply_chat_template([conversation_from_proto(conv)])
    assert rendered.prompt == "get_weather|user:@ann;assistant:get_weather;tool:#c1;"


@pytest.mark.parametrize("field", ["tools_json", "tool_calls_json"])
def test_bad_json_is_a_value_error(field):
    conv = common_pb2.ChatConversation(messages=[common_pb2.ChatMessage(role="user", content="x")])
    if field == "tools_json":
        conv.tools_json = "{not json"
    else:
        conv.messages[0].tool_calls_json = '{"not": "a list"}'
    with pytest.raises(ValueError, match=field):
        conversation_from_proto(conv)


def test_info(core):
    info = core.info()
    assert info.vocab_size == 49152
    assert info.eos_token_ids == [2]
    assert info.bos_token_id == 1
    assert SMOL_SYSTEM_PROMPT in info.chat_template


async def _grpc_scenario(core: TokenizerCore) -> None:
    server, port = await start_server(core, "127.0.0.1:0")
    try:
        async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            encoded = await stub.Encode(tokenizer_pb2.TokenizerEncodeRequest(texts=TEXTS))
            assert [list(r.ids) for r in encoded.results] == core.encode(TEXTS)

            user = common_pb2.ChatMessage(role="user", content="hi")
            chats = await stub.ApplyChatTemplate(
                tokenizer_pb2.TokenizerChatRequest(
                    conversations=[
                        common_pb2.ChatConversation(messages=[user], add_generation_prompt=True),
                        common_pb2.ChatConversation(messages=[user]),
                    ]
                )
            )
            assert len(chats.results) == 2
            assert chats.results[0].prompt.endswith("<|im_start|>assistant\n")
            assert not chats.results[1].prompt.endswith("<|im_start|>assistant\n")
            assert list(chats.results[0].ids) == core.encode([chats.results[0].prompt])[0]

            info = await stub.GetInfo(tokenizer_pb2.TokenizerInfoRequest())
            assert (info.vocab_size, list(info.eos_token_ids), info.bos_token_id) == (49152, [2], 1)
            assert info.tokenizer_path == str(core.folder)

            bad = common_pb2.ChatConversation(messages=[user], tools_json="[oops")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ApplyChatTemplate(
                    tokenizer_pb2.TokenizerChatRequest(conversations=[bad])
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "tools_json" in err.value.details()
    finally:
        await server.stop(None)


def test_grpc_batch_rpcs_in_process(core):
    asyncio.run(_grpc_scenario(core))


def test_chat_template_kwargs_reach_the_template(folder):
    template = "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    core = TokenizerCore(folder, chat_template=ROLE_TEMPLATE + template)
    conv = common_pb2.ChatConversation(
        messages=[common_pb2.ChatMessage(role="user", content="hi")],
        template_kwargs_json=json.dumps({"enable_thinking": False}),
    )
    [rendered] = core.apply_chat_template([conversation_from_proto(conv)])
    assert rendered.prompt == "[user]hi<no-think>"
    [rendered] = core.apply_chat_template([user_chat("hi")])
    assert rendered.prompt == "[user]hi"


@pytest.mark.parametrize(
    "kwargs_json, error",
    [
        ('{"tokenize": true, "add_generation_prompt": false}', "may not set add_generation_prompt"),
        ("[1]", "must be an object"),
        ("{", "not valid JSON"),
    ],
)
def test_chat_template_kwargs_may_not_replace_the_templates_own_arguments(kwargs_json, error):
    conv = common_pb2.ChatConversation(template_kwargs_json=kwargs_json)
    with pytest.raises(ValueError, match=error):
        conversation_from_proto(conv)
