"""SGLang's named chat templates: each name renders the prompt text SGLang's format writes.

Conversations go through radixserve's own path: TokenizerCore (an HF fast tokenizer with `chat_template`
set, `apply_chat_template(tokenize=False)`), then encoding without special tokens. The expected prompts
are written out literally, from SGLang's conversation.py / lang/chat_template.py formats. The tokenizer is a
tiny llama-like one built here (BOS `<s>`, prepended on encode with special tokens, as Llama's is).
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from radixserve.common.model_files import resolve_model_path
from radixserve.tokenizer.conversation import Conversation
from radixserve.tokenizer.core import TokenizerCore
from radixserve.tokenizer.named_chat_templates import (
    BOS_NAMES,
    NAMED_TEMPLATES,
    SKIPPED_NAMES,
    help_text,
    resolve_chat_template,
    template_names,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = "<s>[SYSTEM_PROMPT]\nBe brief.\n[/SYSTEM_PROMPT]\n\nHi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]"

# CONVERSATION with add_generation_prompt, for every name.
EXPECTED = {
    # SGLang's server registry (conversation.py)
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]",
    "mistral": MISTRAL,
    "devstral": MISTRAL,
    "llama-4": (
        "<s><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    ),
    "phi-4-mm": "Be brief.<|user|>Hi!<|end|><|assistant|>Hello.<|end|><|user|>What is 2+2?<|end|><|assistant|>",
    "chatml": CHATML,
    "chatml-llava": CHATML,
    "vicuna_v1.1": "<s>Be brief. USER: Hi! ASSISTANT: Hello.</s>USER: What is 2+2? ASSISTANT:",
    "llama_3_vision": LLAMA3,
    "llava_llama_3": LLAMA3,
    "internlm2-chat": (
        "<s><|im_start|>system\nBe brief.\n<|im_start|>user: Hi!\n<|im_start|>assistant: Hello.\n"
        "<|im_start|>user: What is 2+2?\n<|im_start|>assistant:"
    ),
    "internvl-2-5": "<s>" + CHATML,
    "qwen2-vl": CHATML,
    "deepseek-ocr": "<s>Hi!Hello.What is 2+2?",
    "deepseek-vl2": (
        "<s>Be brief.\n\n<|User|>: Hi!\n\n<|Assistant|>: Hello.<｜end▁of▁sentence｜>"
        "<|User|>: What is 2+2?\n\n<|Assistant|>:"
    ),
    "gemma-it": (
        "<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    ),
    "gme-qwen2-vl": CHATML + "<|endoftext|>",
    "minicpmv": CHATML.replace("Be brief.", "Be brief.."),
    "janus-pro": "<s>Be brief..\n\nUser: Hi!\n\nAssistant: Hello.<｜end▁of▁sentence｜>User: What is 2+2?\n\nAssistant:",
    "minicpmo": CHATML,
    "kimi-vl": (
        "<|im_system|>system<|im_middle|>Be brief.<|im_user|>user<|im_middle|>Hi!<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Hello.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 2+2?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    ),
    "qwen2-audio": CHATML,
    "points-v15-chat": (
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ),
    # SGLang's frontend registry (lang/chat_template.py)
    "default": "SYSTEM:Be brief.\nUSER:Hi!\nASSISTANT:Hello.\nUSER:What is 2+2?\nASSISTANT:",
    "claude": "Be brief.\n\nHuman: Hi!\n\nAssistant:Hello.\n\nHuman: What is 2+2?\n\nAssistant:",
    "qwen": CHATML,
    "llama-2-chat": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST]Hello. </s><s>[INST] What is 2+2? [/INST]",
    "llama-3-instruct": LLAMA3,
    "janus": "<s>Be brief.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>",
    "llama-3-instruct-llava": LLAMA3,
    "yi-1.5": (
        "Be brief.<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "yi-vl": "Be brief.\n\n### Human:Hi!\n### Assistant:Hello.\n### Human:What is 2+2?\n### Assistant:",
    "dbrx-instruct": CHATML,
    "c4ai-command-r": (
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi!<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is 2+2?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    "interns1": CHATML,
    "granite-3-instruct": (
        "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>"
        "<|start_of_role|>user<|end_of_role|>Hi!<|end_of_text|>"
        "<|start_of_role|>assistant<|end_of_role|>Hello.<|end_of_text|>"
        "<|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>"
        "<|start_of_role|>assistant<|end_of_role|>"
    ),
    "deepseek-v3": "<s>Be brief.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>",
    "glm-4v": "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n",
}

HELPFUL_CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# A lone user "Hi!" with add_generation_prompt: the formats' default system messages.
EXPECTED_NO_SYSTEM = {
    "chatml": HELPFUL_CHATML,
    "qwen2-vl": HELPFUL_CHATML,
    "qwen": HELPFUL_CHATML,
    "minicpmv": HELPFUL_CHATML,  # "You are a helpful assistant" + the format's period
    "minicpmo": HELPFUL_CHATML.replace(
        "You are a", "You are Qwen, created by Alibaba Cloud. You are a"
    ),
    "points-v15-chat": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<s>[INST] Hi! [/INST]",
    "llama-2-chat": "<s>[INST] Hi! [/INST]",
    "mistral": "<s>[INST] Hi! [/INST]",
    "devstral": "<s>[INST] Hi! [/INST]",
    "llama-3-instruct": (
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-4": "<s><|header_start|>user<|header_end|>\n\nHi!<|eot|><|header_start|>assistant<|header_end|>\n\n",
    "llava_llama_3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist "
        "the user with a variety of tasks using natural language.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma-it": (
        "<s><start_of_turn>user\nYou are a helpful assistant.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "vicuna_v1.1": (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi! ASSISTANT:"
    ),
    "janus-pro": (
        "<s>You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language.\n\n"
        "User: Hi!\n\nAssistant:"
    ),
    "internvl-2-5": (
        "<s><|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合"
        "开发的多模态大语言模型。<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ),
    "internlm2-chat": "<s><|im_start|>system\n\n<|im_start|>user: Hi!\n<|im_start|>assistant:",
    "kimi-vl": (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_user|>user<|im_middle|>Hi!<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    ),
    "phi-4-mm": "<|user|>Hi!<|end|><|assistant|>",
    "deepseek-vl2": "<s><|User|>: Hi!\n\n<|Assistant|>:",
    "deepseek-v3": "<s><｜User｜>Hi!<｜Assistant｜>",
    "default": "USER:Hi!\nASSISTANT:",
    "yi-1.5": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
}

# system + user + assistant, no generation prompt: the prompt ends after the answer.
EXPECTED_NO_GENERATION = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    ),
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>",
    "vicuna_v1.1": "<s>Be brief. USER: Hi! ASSISTANT: Hello.</s>",
    "gemma-it": "<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n",
    "gme-qwen2-vl": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|endoftext|>"
    ),
    "dbrx-instruct": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>"
    ),
    "deepseek-v3": "<s>Be brief.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜>",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama-like fast tokenizer: BOS <s>, which encoding with special tokens prepends."""
    tok = Tokenizer(
        models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "Hi": 3, "!": 4}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(folder):
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def cores(folder):
    made: dict[str, TokenizerCore] = {}

    def get(name: str) -> TokenizerCore:
        if name not in made:
            made[name] = TokenizerCore(folder, chat_template=resolve_chat_template(name))
        return made[name]

    return get


def render(core: TokenizerCore, messages, add_generation_prompt=True, **kw) -> str:
    return core.render_chat(
        Conversation(messages, add_generation_prompt=add_generation_prompt, **kw)
    )


def test_every_name_has_an_expectation():
    assert set(EXPECTED) == set(NAMED_TEMPLATES)
    assert template_names() == list(NAMED_TEMPLATES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_conversation_renders_as_sglang(cores, name):
    assert render(cores(name), CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name", list(EXPECTED_NO_SYSTEM))
def test_default_system_message(cores, name):
    assert render(cores(name), [{"role": "user", "content": "Hi!"}]) == EXPECTED_NO_SYSTEM[name]


@pytest.mark.parametrize("name", list(EXPECTED_NO_GENERATION))
def test_without_generation_prompt(cores, name):
    got = render(cores(name), CONVERSATION[:3], add_generation_prompt=False)
    assert got == EXPECTED_NO_GENERATION[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exactly_one_bos_and_same_ids_as_sglang(cores, hf, name):
    """SGLang encodes its text with special tokens (the tokenizer prepends BOS); radixserve encodes the
    rendered prompt without, so the templates for BOS-prepending models write BOS themselves, once."""
    core = cores(name)
    [rendered] = core.apply_chat_template([Conversation(CONVERSATION, add_generation_prompt=True)])
    if name in BOS_NAMES:
        assert rendered.prompt.startswith("<s>") and not rendered.prompt.startswith("<s><s>")
        sglang_text = rendered.prompt[len("<s>") :]
        assert rendered.ids == hf(sglang_text, add_special_tokens=True)["input_ids"]
        assert rendered.ids[0] == hf.bos_token_id != rendered.ids[1]
    else:
        assert not rendered.prompt.startswith("<s>")
        assert rendered.ids == hf(rendered.prompt, add_special_tokens=False)["input_ids"]


def test_text_parts_are_concatenated(cores):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
    ]
    for name in ("chatml", "llama-2", "vicuna_v1.1", "qwen", "deepseek-v3", "llama-3-instruct"):
        assert render(cores(name), messages) == EXPECTED[name], name


@pytest.mark.parametrize("name", ["chatml-llava", "qwen2-vl", "llama-3-instruct-llava"])
def test_image_parts_are_refused(cores, name):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            ],
        }
    ]
    with pytest.raises(ValueError, match="renders text only.*image_url"):
        render(cores(name), messages)


@pytest.mark.parametrize("name", ["chatml", "llama-3-instruct"])
def test_other_roles_are_refused(cores, name):
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    with pytest.raises(ValueError, match="system, user and assistant messages, not tool"):
        render(cores(name), messages)


def test_server_formats_take_the_last_system_message_frontend_formats_keep_order(cores):
    messages = [
        {"role": "system", "content": "First."},
        {"role": "user", "content": "Hi!"},
        {"role": "system", "content": "Second."},
    ]
    assert render(cores("chatml"), messages) == (
        "<|im_start|>system\nSecond.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(cores("qwen"), messages) == (
        "<|im_start|>system\nFirst.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>system\nSecond.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_empty_turn_is_its_bare_role_prefix(cores):
    """conversation.py writes a turn with empty content as its role prefix alone, with no separator."""
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": ""}]
    assert render(cores("chatml"), messages, add_generation_prompt=False) == HELPFUL_CHATML
    assert (
        render(
            cores("vicuna_v1.1"),
            messages + [{"role": "user", "content": "Hm?"}],
            add_generation_prompt=False,
        )
        == EXPECTED_NO_SYSTEM["vicuna_v1.1"] + "USER: Hm? "
    )


def test_llama3_server_formats_strip_text_frontend_format_does_not(cores):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "  Hi! \n"}]
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    tail = "<|eot_id|>" + header.format("assistant")
    assert (
        render(cores("llava_llama_3"), messages)
        == "<s>" + header.format("system") + "S<|eot_id|>" + header.format("user") + "Hi!" + tail
    )
    assert (
        render(cores("llama-3-instruct"), messages)
        == "<s>"
        + header.format("system")
        + "S<|eot_id|>"
        + header.format("user")
        + "  Hi! \n"
        + tail
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("chatml", HELPFUL_CHATML + "One, two,"),
        ("llava_llama_3", EXPECTED_NO_SYSTEM["llava_llama_3"] + "One, two,"),
        ("llama-2", "<s>[INST] Hi! [/INST] One, two,"),
    ],
)
def test_continue_final_message(cores, name, expected):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "One, two,"}]
    assert (
        render(cores(name), messages, add_generation_prompt=False, continue_final_message=True)
        == expected
    )


def test_tools_are_ignored(cores):
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert render(cores("chatml"), CONVERSATION, tools=tools) == CHATML


def test_real_chatml_tokenizer_gets_no_bos():
    """SmolLM2's BOS is <|im_start|>: ChatML formats must not write it in front."""
    core = TokenizerCore(resolve_model_path(None), chat_template=resolve_chat_template("chatml"))
    [rendered] = core.apply_chat_template([Conversation(CONVERSATION, add_generation_prompt=True)])
    assert rendered.prompt == CHATML
    assert rendered.ids == core.encode([CHATML])[0]
    assert core.info().chat_template == NAMED_TEMPLATES["chatml"]


def test_lone_system_message_renders_for_every_name(cores):
    for name in NAMED_TEMPLATES:
        assert isinstance(render(cores(name), [{"role": "system", "content": "S"}]), str)


# ---- resolution of --chat-template ----


def test_resolve_name():
    for name in (
        "chatml",
        "chatml-llava",
        "llama-2",
        "llama-3-instruct",
        "qwen",
        "qwen2-vl",
        "vicuna_v1.1",
        "llama-4",
        "mistral",
        "gemma-it",
        "deepseek-v3",
        "yi-1.5",
    ):
        assert resolve_chat_template(name) == NAMED_TEMPLATES[name]
        assert "{%" in NAMED_TEMPLATES[name]


def test_resolve_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}\n")
    assert resolve_chat_template(str(path)) == "{{ messages[0].content }}\n"


def test_resolve_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "chatml").write_text("{{ 'from the file' }}")
    monkeypatch.chdir(tmp_path)
    assert resolve_chat_template("chatml") == NAMED_TEMPLATES["chatml"]
    assert resolve_chat_template("./chatml") == "{{ 'from the file' }}"


def test_resolve_literal_template():
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert resolve_chat_template(template) == template
    assert resolve_chat_template("{{ 'x' }}") == "{{ 'x' }}"


@pytest.mark.parametrize("value", ["no-such-template", "chatglm", "phi-3", "llama3"])
def test_resolve_unknown_name_lists_names(value):
    with pytest.raises(ValueError, match="not a known chat template name") as info:
        resolve_chat_template(value)
    assert (
        "Known names: " in str(info.value)
        and "chatml" in str(info.value)
        and "llama-3-instruct" in str(info.value)
    )


def test_resolve_names_are_case_sensitive_with_a_hint():
    with pytest.raises(ValueError, match="did you mean 'chatml'"):
        resolve_chat_template("ChatML")


def test_resolve_skipped_name_says_why():
    assert "qwen2-5-o" in SKIPPED_NAMES
    with pytest.raises(ValueError, match="removed from SGLang"):
        resolve_chat_template("qwen2-5-o")


@pytest.mark.parametrize("value", ["/no/such/template.jinja", "not a template at all"])
def test_resolve_missing_file_or_plain_text(value):
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        resolve_chat_template(value)


def test_help_text_lists_names():
    text = help_text()
    assert all(name in text for name in NAMED_TEMPLATES)
