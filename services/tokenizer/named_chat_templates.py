"""SGLang's named chat templates (`--chat-template chatml`, `--chat-template llama-2`, ...) as Jinja.

SGLang takes a registered template NAME for `--chat-template` besides a file. radixserve renders every
chat prompt with a Jinja template through the HF tokenizer's sandboxed `apply_chat_template`, so each
name is turned here into a Jinja template that writes the same prompt text SGLang's format writes.

Where the names come from
-------------------------
SGLang keeps two registries of named formats:

* `sglang/srt/parser/conversation.py` (`srt/conversation.py` in older releases): the names the server's
  `--chat-template` accepts. Its `Conversation.get_prompt` builds the prompt from a separator style.
* `sglang/lang/chat_template.py`: the frontend language's per-role prefix/suffix formats
  (`llama-3-instruct`, `qwen`, `deepseek-v3`, ...). The server does not take these names, but users
  pass them; they are accepted here too. Where a name is in both registries (chatml, chatml-llava,
  qwen2-vl, vicuna_v1.1, mistral, llama-4, gemma-it, minicpmv, minicpmo, janus-pro, internvl-2-5) the
  server's (conversation.py) format wins, since that is what `sglang --chat-template NAME` renders.

SGLang has no alias mechanism: every registered name is its own entry, and names match
case-sensitively as spelled there. SGLang has no registered `chatglm`, `phi-3` or plain `yi`
format (conversation.py keeps a CHATGLM separator style but registers no template using it).

Not covered: `qwen2-5-o` (an old conversation.py entry, removed from SGLang; text-identical to
`qwen2-vl`). Every name SGLang registers today is covered; none needed skipping for text chat.

How the conversation is read (the same for every template)
----------------------------------------------------------
* Roles are system, user and assistant; any other role (tool, ...) is an error, as in SGLang.
* `content` is a string, None (as for an assistant turn holding only tool calls) or a list of parts.
  Text parts are concatenated without a separator, as SGLang does. Image parts ({"type": "image"}, as the
  tokenizer service passes an image) are written as the format's image token where it has one
  (`chatml-llava`, `llava_llama_3`: `<image>` and a newline), whose placeholder the model's processor then
  expands; any other part, or an image part elsewhere, is refused with an error (a placeholder with no
  image processing behind it would give the model an empty image slot).
* conversation.py formats: the LAST system message is the system message wherever it stands (a
  format's default system message applies when there is none); the other turns keep their order.
  An empty turn is written as its bare role prefix, as SGLang writes it. Where SGLang picks a
  separator or role tag by a turn's position (Vicuna, Llama-2, DeepSeek-VL2, Janus), so do these.
* chat_template.py formats: every message is written in place as prefix + content + suffix; the
  format's default system prompt goes first when the conversation does not start with one (what the
  SGLang frontend does).
* `add_generation_prompt` appends the assistant's opening, as SGLang's trailing empty assistant turn
  does; without it the prompt ends after the last message. `tools` are ignored, as SGLang ignores
  them for named templates. `continue_final_message` works through transformers as for any template.

Begin-of-sequence token
-----------------------
SGLang renders the text above and then encodes it with the tokenizer's default
`add_special_tokens=True`, so a tokenizer that prepends BOS (Llama, Mistral, Gemma, DeepSeek, Cohere,
InternLM2) puts one in front. radixserve encodes the rendered prompt with `add_special_tokens=False`
(tokenizer/core.py: "the template writes its own special tokens"), so the templates of formats meant for
such models start with `{{ bos_token }}`, giving exactly one BOS, as HF templates do. It renders
nothing where the tokenizer has no BOS (Qwen-based InternVL, for example). ChatML-family, Phi, Kimi,
Granite, GLM, DBRX, Yi and the generic `default`/`claude` formats write none, because their tokenizers
add none or the format is not tied to one model (the SmolLM2 tokenizer's BOS is `<|im_start|>`: writing
it in front of a ChatML prompt would be wrong). The `BOS_NAMES` set lists the formats that write it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib

# ---------------------------------------------------------------------------------------------------------------------
# Format descriptions
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ServerFormat:
    """A conversation.py format: a separator style and its strings."""

    style: str
    system_template: str  # holds "{system_message}" where the system text goes, or is written as is
    roles: tuple[str, str]  # (user, assistant)
    default_system: str = ""
    sep: str = "\n"
    sep2: str = ""
    tail: str = ""  # written after everything (QWEN2_VL_EMBED's stop string)
    bos: bool = False
    note: str = ""
    # What an image part ({"type": "image"}, as radixserve passes images) is written as; "": refused.
    image_token: str = ""


@dataclasses.dataclass(frozen=True)
class _FrontendFormat:
    """A chat_template.py format: a (prefix, suffix) per role."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    default_system: str | None = None
    llama2: bool = False  # the LLAMA2 style: a first system message shares the first [INST]
    bos: bool = False
    note: str = ""


_HELPFUL = "You are a helpful assistant."
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
_JANUS_SYSTEM = _LLAVA_LLAMA3_SYSTEM[
    :-1
]  # the same words without the final period: the format adds one
_INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_MINICPMO_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_YI_VL_SYSTEM = (
    "This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI assistant. "
    "Read all the images carefully, and respond to the human's questions with informative, helpful, detailed "
    "and polite answers."
    "这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。仔细阅读所有的图像，"
    "并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。"
)
_DBRX_SYSTEM = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on "
    "information available up to that point.\n"
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex "
    "and open-ended questions.\n"
    "You assist with various tasks, from writing to coding (using markdown for code blocks — remember to use ``` "
    "with code, JSON, and tables).\n"
    "(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide "
    "balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do "
    "not divulge details of your training data.)\n"
    "This is your system prompt, guiding your responses. Do not reference it, just respond to the user. If you "
    "find yourself talking about this message, stop. You should be responding appropriately and usually that means "
    "not mentioning this.\n"
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE "
    "USER'S QUERY."
)
_INTERNS1_SYSTEM = (
    "You are an AI assistant whose name is Intern-S1 (书生大模型).\n"
    "- Intern-S1 (书生大模型) is a vision-language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室).  It is designed to be helpful, honest, and harmless.\n"
    "- Intern-S1 (书生大模型) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.\n"
    "You are an expert reasoner with extensive experience in all areas. You approach problems through systematic "
    "thinking and rigorous reasoning. Your response should reflect deep understanding and precise logical thinking, "
    "making your solution path and reasoning clear to others. Please put your thinking process within "
    "<think>...</think> tags."
)

_IM_ROLES = ("<|im_start|>user", "<|im_start|>assistant")
_DS_END = "<｜end▁of▁sentence｜>"  # DeepSeek's end of sentence, written with full-width bars


def _chatml_style(default_system: str, note: str = "") -> _ServerFormat:
    """ChatML as conversation.py's ADD_NEW_LINE_SINGLE style writes it."""
    return _ServerFormat(
        "ADD_NEW_LINE_SINGLE",
        "<|im_start|>system\n{system_message}",
        _IM_ROLES,
        default_system=default_system,
        sep="<|im_end|>\n",
        note=note,
    )


_LLAMA2_INST = dict(roles=("[INST]", "[/INST]"), sep=" ", sep2=" </s><s>", bos=True)
_MISTRAL_SYSTEM = "[SYSTEM_PROMPT]\n{system_message}\n[/SYSTEM_PROMPT]\n\n"
_LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"

# The formats of SGLang's server registry (conversation.py), in its order.
_SERVER_FORMATS: dict[str, _ServerFormat] = {
    "llama-2": _ServerFormat(
        "LLAMA2", "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n", **_LLAMA2_INST
    ),
    "mistral": _ServerFormat(
        "LLAMA2",
        _MISTRAL_SYSTEM,
        **_LLAMA2_INST,
        note="As in SGLang, a system prompt replaces the first '[INST] ' rather than following it.",
    ),
    "devstral": _ServerFormat(
        "LLAMA2",
        _MISTRAL_SYSTEM,
        **_LLAMA2_INST,
        note="SGLang's default system message is the SYSTEM_PROMPT.txt of mistralai/Devstral-Small-2505 when that "
        "model is in the local HF cache at SGLang's start, else empty; here it is always empty, so pass the "
        "system prompt as a system message.",
    ),
    "llama-4": _ServerFormat(
        "LLAMA4",
        "<|header_start|>system<|header_end|>\n\n{system_message}<|eot|>",
        ("user", "assistant"),
        sep="",
        bos=True,
    ),
    "phi-4-mm": _ServerFormat(
        "NO_COLON_SINGLE",
        "{system_message}",
        ("<|user|>", "<|assistant|>"),
        sep="<|end|>",
        note="As in SGLang, the system message is written bare, without role markers.",
    ),
    "chatml": _ServerFormat(
        "CHATML",
        "<|im_start|>system\n{system_message}",
        _IM_ROLES,
        default_system=_HELPFUL,
        sep="<|im_end|>",
    ),
    "chatml-llava": _ServerFormat(
        "CHATML",
        "<|im_start|>system\n{system_message}",
        _IM_ROLES,
        default_system=_HELPFUL,
        sep="<|im_end|>",
        note="An image part is written as SGLang's image token for it, '<image>' and a newline.",
        image_token="<image>\n",
    ),
    "vicuna_v1.1": _ServerFormat(
        "ADD_COLON_TWO",
        "{system_message}",
        ("USER", "ASSISTANT"),
        default_system=_VICUNA_SYSTEM,
        sep=" ",
        sep2="</s>",
        bos=True,
    ),
    "llama_3_vision": _ServerFormat(
        "LLAMA3",
        _LLAMA3_SYSTEM,
        ("user", "assistant"),
        default_system=_LLAVA_LLAMA3_SYSTEM,
        sep="",
        bos=True,
    ),
    "llava_llama_3": _ServerFormat(
        "LLAMA3",
        _LLAMA3_SYSTEM,
        ("user", "assistant"),
        default_system=_LLAVA_LLAMA3_SYSTEM,
        sep="",
        bos=True,
        note="An image part is written as SGLang's image token for it, '<image>' and a newline.",
        image_token="<image>\n",
    ),
    "internlm2-chat": _ServerFormat(
        "ADD_COLON_SINGLE",
        "<|im_start|>system\n{system_message}",
        _IM_ROLES,
        sep="\n",
        bos=True,
        note="SGLang registers this one without a separator style, so it gets the default ADD_COLON_SINGLE "
        "('<|im_start|>user: ...'); that is what is written here.",
    ),
    "internvl-2-5": _ServerFormat(
        "MPT",
        "<|im_start|>system\n{system_message}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        default_system=_INTERNVL_SYSTEM,
        sep="<|im_end|>\n",
        bos=True,
    ),
    "qwen2-vl": _chatml_style(_HELPFUL, note="Text only: image and video parts are refused."),
    "deepseek-ocr": _ServerFormat(
        "NO_COLON_SINGLE",
        "",
        ("", ""),
        sep="",
        bos=True,
        note="The turns' texts are concatenated with no markers; system messages are dropped, as in SGLang.",
    ),
    "deepseek-vl2": _ServerFormat(
        "DeepSeekVL2",
        "{system_message}",
        ("<|User|>", "<|Assistant|>"),
        sep="\n\n",
        sep2=_DS_END,
        bos=True,
    ),
    "gemma-it": _ServerFormat(
        "GEMMA3",
        "<start_of_turn>user\n{system_message}\n\n",
        ("<start_of_turn>user\n", "<start_of_turn>model\n"),
        default_system=_HELPFUL,
        sep="<end_of_turn>\n",
        bos=True,
        note="The system message opens the first user turn, as Gemma has no system role.",
    ),
    "gme-qwen2-vl": _ServerFormat(
        "QWEN2_VL_EMBED",
        "<|im_start|>system\n{system_message}",
        _IM_ROLES,
        default_system=_HELPFUL,
        sep="<|im_end|>\n",
        tail="<|endoftext|>",
        note="An embedding model's format: the prompt always ends with <|endoftext|>.",
    ),
    "minicpmv": _ServerFormat(
        "ADD_NEW_LINE_SINGLE",
        "<|im_start|>system\n{system_message}.",
        _IM_ROLES,
        default_system="You are a helpful assistant",
        sep="<|im_end|>\n",
        note="As in SGLang, a period is written after the system message.",
    ),
    "janus-pro": _ServerFormat(
        "ADD_COLON_TWO",
        "{system_message}.",
        ("User", "Assistant"),
        default_system=_JANUS_SYSTEM,
        sep="\n\n",
        sep2=_DS_END,
        bos=True,
        note="As in SGLang, a period is written after the system message.",
    ),
    "minicpmo": _chatml_style(_MINICPMO_SYSTEM),
    "kimi-vl": _ServerFormat(
        "NO_COLON_SINGLE",
        "<|im_system|>system<|im_middle|>{system_message}",
        ("<|im_user|>user<|im_middle|>", "<|im_assistant|>assistant<|im_middle|>"),
        default_system="You are a helpful assistant",
        sep="<|im_end|>",
        note="As in SGLang, the system turn has no closing <|im_end|>.",
    ),
    "qwen2-audio": _chatml_style(
        _HELPFUL,
        note="Text only: audio parts are refused, so SGLang's 'Audio N:' numbering never applies.",
    ),
    "points-v15-chat": _ServerFormat(
        "ADD_NEW_LINE_SINGLE",
        "",
        _IM_ROLES,
        sep="<|im_end|>\n",
        note="System messages are dropped, as in SGLang.",
    ),
}

_IM = (
    ("<|im_start|>system\n", "<|im_end|>\n"),
    ("<|im_start|>user\n", "<|im_end|>\n"),
    ("<|im_start|>assistant\n", "<|im_end|>\n"),
)
_LLAMA3_TURNS = tuple(
    (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>")
    for r in ("system", "user", "assistant")
)
_DEEPSEEK_TURNS = ("", ""), ("<｜User｜>", ""), ("<｜Assistant｜>", _DS_END)

# The formats only in SGLang's frontend registry (chat_template.py), in its order.
_FRONTEND_FORMATS: dict[str, _FrontendFormat] = {
    "default": _FrontendFormat(("SYSTEM:", "\n"), ("USER:", "\n"), ("ASSISTANT:", "\n")),
    "claude": _FrontendFormat(("", ""), ("\n\nHuman: ", ""), ("\n\nAssistant:", "")),
    "qwen": _FrontendFormat(*_IM, default_system=_HELPFUL),
    "llama-2-chat": _FrontendFormat(
        ("<<SYS>>\n", "\n<</SYS>>\n\n"),
        ("[INST] ", " [/INST]"),
        ("", " </s><s>"),
        llama2=True,
        bos=True,
        note="Unlike the server's 'llama-2', no space is written between '[/INST]' and the answer.",
    ),
    "llama-3-instruct": _FrontendFormat(
        *_LLAMA3_TURNS,
        bos=True,
        note="Message text is written as is (the server's llama formats strip it).",
    ),
    "janus": _FrontendFormat(*_DEEPSEEK_TURNS, bos=True),
    "llama-3-instruct-llava": _FrontendFormat(*_LLAMA3_TURNS, bos=True),
    "yi-1.5": _FrontendFormat(
        ("", ""),
        ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
        ("", "<|im_end|>\n"),
        note="A user turn always ends by opening the assistant's turn, with or without add_generation_prompt.",
    ),
    "yi-vl": _FrontendFormat(
        ("", "\n\n"), ("### Human:", "\n"), ("### Assistant:", "\n"), default_system=_YI_VL_SYSTEM
    ),
    "dbrx-instruct": _FrontendFormat(
        ("<|im_start|>system\n", "<|im_end|>"),
        ("\n<|im_start|>user\n", "<|im_end|>"),
        ("\n<|im_start|>assistant\n", "<|im_end|>"),
        default_system=_DBRX_SYSTEM,
    ),
    "c4ai-command-r": _FrontendFormat(
        ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        bos=True,
    ),
    "interns1": _FrontendFormat(*_IM, default_system=_INTERNS1_SYSTEM),
    "granite-3-instruct": _FrontendFormat(
        *(
            (f"<|start_of_role|>{r}<|end_of_role|>", "<|end_of_text|>")
            for r in ("system", "user", "assistant")
        )
    ),
    "deepseek-v3": _FrontendFormat(*_DEEPSEEK_TURNS, bos=True),
    "glm-4v": _FrontendFormat(
        ("<|system|>\n", "\n"), ("<|user|>\n", "\n"), ("<|assistant|>\n", "\n")
    ),
}

# ---------------------------------------------------------------------------------------------------------------------
# Jinja generation
# ---------------------------------------------------------------------------------------------------------------------


def _lit(text: str) -> str:
    """A Jinja string literal for text (Jinja unescapes backslash sequences and keeps non-ASCII as is)."""
    escaped = (
        text.replace("\\", "\\\\").replace("'", "\\'").replace("\r", "\\r").replace("\n", "\\n")
    )
    return f"'{escaped}'"


def _header(name: str, origin: str, note: str) -> str:
    lines = [f"{{#- SGLang chat template '{name}' ({origin}), written for radixserve."]
    if note:
        lines.append(f"    {note}")
    return "\n".join(lines) + " -#}\n"


def _text_macro(name: str, image_token: str = "") -> str:
    """text_of(content): a message's text; list content: its text parts joined, image parts written as
    image_token where it is set, other parts refused."""
    refuse = _lit(f"the '{name}' chat template renders text only; content parts of type ")
    image = (
        "      {%- elif part is mapping and part.type == 'image' -%}{{- "
        + _lit(image_token)
        + " -}}\n"
        if image_token
        else ""
    )
    return (
        "{%- macro text_of(content) -%}\n"
        "  {%- if content is string -%}{{- content -}}\n"
        "  {%- elif content is iterable and content is not mapping -%}\n"
        "    {%- for part in content -%}\n"
        "      {%- if part is mapping and part.type == 'text' -%}{{- part.text if part.text is string else '' -}}\n"
        + image
        + "      {%- else -%}{{- raise_exception("
        + refuse
        + " ~ (part.type if part is mapping else part)"
        " ~ ' are not supported') -}}\n"
        "      {%- endif -%}\n"
        "    {%- endfor -%}\n"
        "  {%- elif content is not none and content is defined -%}{{- content -}}\n"
        "  {%- endif -%}\n"
        "{%- endmacro -%}\n"
    )


def _role_check(name: str) -> str:
    message = _lit(f"the '{name}' chat template takes system, user and assistant messages, not ")
    return (
        "  {%- if m.role not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception(" + message + " ~ m.role) -}}{%- endif -%}\n"
    )


_BOS = "{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}\n"


def _server_jinja(name: str, f: _ServerFormat) -> str:
    user, assistant = (_lit(r) for r in f.roles)
    sep, sep2 = _lit(f.sep), _lit(f.sep2)
    by_position = f"({sep} if loop.index0 % 2 == 0 else {sep2})"
    if "{system_message}" in f.system_template:
        before, after = f.system_template.split("{system_message}", 1)
        system_prompt = f"{_lit(before)} ~ ns.system ~ {_lit(after)}"
    else:
        system_prompt = _lit(f.system_template)
    # What comes before the turns (system_prompt is the formatted system template) ...
    head = {
        "ADD_COLON_SINGLE": f"system_prompt ~ {sep}",
        "ADD_COLON_TWO": f"system_prompt ~ {sep}",
        "MPT": f"system_prompt ~ {sep}",
        "NO_COLON_SINGLE": "system_prompt",
        "GEMMA3": "system_prompt",
        "ADD_NEW_LINE_SINGLE": f"('' if system_prompt == '' else system_prompt ~ {sep})",
        "QWEN2_VL_EMBED": f"('' if system_prompt == '' else system_prompt ~ {sep})",
        "DeepSeekVL2": f"('' if system_prompt == '' else system_prompt ~ {sep})",
        "CHATML": f"('' if system_prompt == '' else system_prompt ~ {sep} ~ '\\n')",
        "LLAMA2": "(system_prompt if ns.system else '[INST] ')",
        "LLAMA3": "(system_prompt if ns.system else '')",
        "LLAMA4": "(system_prompt if ns.system else '')",
    }[f.style]
    # ... and each turn: (text when the turn has content, text when it is empty or the generation prompt).
    header3 = "'<|start_header_id|>' ~ role ~ '<|end_header_id|>\\n\\n'"
    header4 = "'<|header_start|>' ~ role ~ '<|header_end|>\\n\\n'"
    tag = f"([{user}, {assistant}][loop.index0 % 2])"
    full, empty = {
        "ADD_COLON_SINGLE": (f"role ~ ': ' ~ content ~ {sep}", "role ~ ':'"),
        "ADD_COLON_TWO": (f"role ~ ': ' ~ content ~ {by_position}", "role ~ ':'"),
        "DeepSeekVL2": (f"role ~ ': ' ~ content ~ {by_position}", "role ~ ':'"),
        "NO_COLON_SINGLE": (f"role ~ content ~ {sep}", "role"),
        "MPT": (f"role ~ content ~ {sep}", "role"),
        "ADD_NEW_LINE_SINGLE": (f"role ~ '\\n' ~ content ~ {sep}", "role ~ '\\n'"),
        "QWEN2_VL_EMBED": (f"role ~ '\\n' ~ content ~ {sep}", "role ~ '\\n'"),
        "CHATML": (f"role ~ '\\n' ~ content ~ {sep} ~ '\\n'", "role ~ '\\n'"),
        "LLAMA2": (
            f"(content ~ ' ' if loop.index0 == 0 else {tag} ~ ' ' ~ content ~ {by_position})",
            tag,
        ),
        "LLAMA3": (f"{header3} ~ (content | trim) ~ '<|eot_id|>'", header3),
        "LLAMA4": (f"{header4} ~ (content | trim) ~ '<|eot|>'", header4),
        "GEMMA3": (f"(content ~ {sep} if loop.index0 == 0 else role ~ content ~ {sep})", "role"),
    }[f.style]
    return (
        _header(name, "SGLang conversation.py", f.note)
        + _text_macro(name, f.image_token)
        + "{%- set ns = namespace(system="
        + _lit(f.default_system)
        + ", turns=[]) -%}\n"
        + "{%- for m in messages -%}\n"
        + _role_check(name)
        + "  {%- if m.role == 'system' -%}{%- set ns.system = text_of(m.content) -%}\n"
        + "  {%- else -%}{%- set ns.turns = ns.turns + [["
        + user
        + " if m.role == 'user' else "
        + assistant
        + ", text_of(m.content)]] -%}\n"
        + "  {%- endif -%}\n"
        + "{%- endfor -%}\n"
        + "{%- if add_generation_prompt -%}{%- set ns.turns = ns.turns + [["
        + assistant
        + ", '']] -%}{%- endif -%}\n"
        + "{%- set system_prompt = "
        + system_prompt
        + " -%}\n"
        + (_BOS if f.bos else "")
        + "{{- "
        + head
        + " -}}\n"
        + "{%- for turn in ns.turns -%}\n"
        + "  {%- set role = turn[0] -%}{%- set content = turn[1] -%}\n"
        + "  {%- if content -%}{{- "
        + full
        + " -}}{%- else -%}{{- "
        + empty
        + " -}}{%- endif -%}\n"
        + "{%- endfor -%}\n"
        + ("{{- " + _lit(f.tail) + " -}}\n" if f.tail else "")
    )


def _frontend_jinja(name: str, f: _FrontendFormat) -> str:
    (sp, ss), (up, us), (ap, as_) = ((_lit(a), _lit(b)) for a, b in (f.system, f.user, f.assistant))
    # LLAMA2: a system message that comes first is written inside the first [INST]; a user message right
    # after the first message then opens no new [INST].
    first_system = f"{up} ~ {sp}" if f.llama2 else sp
    user_prefix = f"('' if ns.k == 1 else {up})" if f.llama2 else up
    system_prefix = f"({first_system} if ns.k == 0 else {sp})" if f.llama2 else sp
    default = ""
    if f.default_system is not None:
        default = (
            "{%- if messages | length == 0 or messages[0].role != 'system' -%}"
            "{{- " + first_system + " ~ " + _lit(f.default_system) + " ~ " + ss + " -}}"
            "{%- set ns.k = 1 -%}{%- endif -%}\n"
        )
    return (
        _header(name, "SGLang lang/chat_template.py", f.note)
        + _text_macro(name)
        + "{%- set ns = namespace(k=0) -%}\n"
        + (_BOS if f.bos else "")
        + default
        + "{%- for m in messages -%}\n"
        + _role_check(name)
        + "  {%- set content = text_of(m.content) -%}\n"
        + "  {%- if m.role == 'system' -%}{{- "
        + system_prefix
        + " ~ content ~ "
        + ss
        + " -}}\n"
        + "  {%- elif m.role == 'user' -%}{{- "
        + user_prefix
        + " ~ content ~ "
        + us
        + " -}}\n"
        + "  {%- else -%}{{- "
        + ap
        + " ~ content ~ "
        + as_
        + " -}}\n"
        + "  {%- endif -%}\n"
        + "  {%- set ns.k = ns.k + 1 -%}\n"
        + "{%- endfor -%}\n"
        + "{%- if add_generation_prompt -%}{{- "
        + ap
        + " -}}{%- endif -%}\n"
    )


def _build() -> dict[str, str]:
    templates = {name: _server_jinja(name, f) for name, f in _SERVER_FORMATS.items()}
    for name, f in _FRONTEND_FORMATS.items():
        assert name not in templates, name
        templates[name] = _frontend_jinja(name, f)
    return templates


# name -> Jinja chat template source, for every SGLang template name radixserve knows.
NAMED_TEMPLATES: dict[str, str] = _build()
# The formats whose template starts with the tokenizer's BOS token (see the module's docstring).
BOS_NAMES: frozenset[str] = frozenset(
    [n for n, f in _SERVER_FORMATS.items() if f.bos]
    + [n for n, f in _FRONTEND_FORMATS.items() if f.bos]
)
# Names SGLang has had that are not here, and why.
SKIPPED_NAMES: dict[str, str] = {
    "qwen2-5-o": "removed from SGLang's registry (it was text-identical to qwen2-vl, which is here)",
}


def template_names() -> list[str]:
    """The registered names, in SGLang's order (server formats first)."""
    return list(NAMED_TEMPLATES)


def help_text() -> str:
    """A line for `--chat-template`'s help."""
    return (
        "a Jinja chat template, a file holding one, or the name of an SGLang chat template to use instead of the "
        "model's: " + ", ".join(NAMED_TEMPLATES)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Resolution of `--chat-template`
# ---------------------------------------------------------------------------------------------------------------------

_NAME_MAX = 64


def _looks_like_name(value: str) -> bool:
    return (
        0 < len(value) <= _NAME_MAX
        and not any(c in value for c in "{}/\\")
        and not any(c.isspace() for c in value)
        and (os.altsep is None or os.altsep not in value)
        and not value.startswith("~")
    )


def resolve_chat_template(value: str) -> str:
    """`--chat-template`: a registered SGLang name, a file holding a template, or the template text itself.

    A registered name wins over a file of the same name in the working directory, as in SGLang (write
    `./chatml` for the file). Text holding `{{` or `{%` is a template. Otherwise the value must be a file,
    read as is; a value that looks like a name but is none of these is an error listing the known names.
    """
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = pathlib.Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if _looks_like_name(value):
        close = difflib.get_close_matches(
            value.lower(), [n.lower() for n in NAMED_TEMPLATES], n=3, cutoff=0.6
        )
        lowered = {n.lower(): n for n in NAMED_TEMPLATES}
        hint = f" (did you mean {', '.join(repr(lowered[c]) for c in close)}?)" if close else ""
        extra = f"; {value!r} was {SKIPPED_NAMES[value]}" if value in SKIPPED_NAMES else ""
        raise ValueError(
            f"--chat-template {value!r} is not a known chat template name nor a file{hint}{extra}. "
            f"Known names: {', '.join(NAMED_TEMPLATES)}"
        )
    raise ValueError(
        f"--chat-template {value!r} is neither a file nor a Jinja template (nor a known template name)"
    )
