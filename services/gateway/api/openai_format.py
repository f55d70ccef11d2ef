"""OpenAI response objects: chat and text completions, chunks, usage and logprobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from radixserve.v1 import common_pb2
from radixserve.gateway.pipeline.generation import Finish


@dataclass
class ResponseMeta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats

    def envelope(self, object_name: str) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


def usage(finish: Finish) -> dict:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
    }


def matched_stop(finish: Finish) -> str | int | None:
    return finish.matched if finish.reason == "stop" else None


# ---- chat ----


def chat_choice(
    index: int,
    text: str | None,
    finish: Finish,
    logprobs: dict | None,
    tool_calls: list[dict] | None = None,
    reasoning: str | None = None,
) -> dict:
    return {
        "index": index,
        "message": {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "tool_calls": tool_calls or None,
            # SGLang's and DeepSeek's name, and vLLM's
            "reasoning_content": reasoning,
            "reasoning": reasoning,
        },
        "logprobs": logprobs,
        "finish_reason": chat_finish_reason(finish.reason, bool(tool_calls)),
        "matched_stop": matched_stop(finish),
    }


def reasoning_delta(text: str) -> dict:
    return {"reasoning_content": text, "reasoning": text}


def chat_finish_reason(reason: str, made_tool_calls: bool) -> str:
    """ "tool_calls" for an answer that ended with its calls; one cut short by max_tokens (even in
    the middle of a call's arguments) or aborted keeps "length" or "abort", as OpenAI."""
    return "tool_calls" if made_tool_calls and reason == "stop" else reason


def chat_response(meta: ResponseMeta, choices: list[dict], total: Finish) -> dict:
    return {**meta.envelope("chat.completion"), "choices": choices, "usage": usage(total)}


def chat_chunk(
    meta: ResponseMeta,
    delta: dict,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    index: int = 0,
    running: Finish | None = None,
) -> dict:
    chunk = {
        **meta.envelope("chat.completion.chunk"),
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    return _with_usage_field(meta, chunk, running)


def _with_usage_field(meta: ResponseMeta, chunk: dict, running: Finish | None) -> dict:
    """include_usage: null on every chunk but the last; continuous_usage_stats: the counts so far."""
    if meta.continuous_usage and running is not None:
        chunk["usage"] = usage(running)
    elif meta.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(meta: ResponseMeta, object_name: str, finish: Finish) -> dict:
    return {**meta.envelope(object_name), "choices": [], "usage": usage(finish)}


def chat_logprobs(
    entries: list[common_pb2.TokenLogprob], texts: dict[int, str], with_top: bool
) -> dict:
    def token(token_id: int, logprob: float) -> dict:
        text = texts.get(token_id, "")
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for entry in entries:
        item = token(entry.token_id, entry.logprob)
        item["top_logprobs"] = [token(t.token_id, t.logprob) for t in entry.top] if with_top else []
        content.append(item)
    return {"content": content, "refusal": None}


# ---- text completions ----


def completion_choice(index: int, text: str, finish: Finish, logprobs: dict | None) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish.reason,
        "matched_stop": matched_stop(finish),
    }


def completion_response(meta: ResponseMeta, choices: list[dict], total: Finish) -> dict:
    return {**meta.envelope("text_completion"), "choices": choices, "usage": usage(total)}


def completion_chunk(
    meta: ResponseMeta,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    index: int = 0,
    running: Finish | None = None,
) -> dict:
    chunk = {
        **meta.envelope("text_completion"),
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    return _with_usage_field(meta, chunk, running)


def completion_logprobs(
    entries: list[common_pb2.TokenLogprob],
    texts: dict[int, str],
    text_offset: int = 0,
    top: int | None = None,
) -> dict:
    """choices[].logprobs of tokens whose text starts at text_offset; top: at most this many
    alternatives per token (None: all the entries carry)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        text = texts.get(entry.token_id, "")
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        # As OpenAI documents (and vLLM does): the sampled token is always among the top
        # entries, so logprobs=0 gives one-entry dicts and logprobs=k up to k+1 entries.
        alternatives = {texts.get(t.token_id, ""): t.logprob for t in entry.top[:top]}
        alternatives.setdefault(text, entry.logprob)
        tops.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def logprob_token_ids(entries: list[common_pb2.TokenLogprob]) -> list[int]:
    return [i for e in entries for i in (e.token_id, *(t.token_id for t in e.top))]


# ---- prompt logprobs ----


def prompt_logprob_token_ids(
    prompt_ids: list[int], entries: list[common_pb2.TokenLogprob]
) -> list[int]:
    """The ids whose text the prompt's logprobs show (its first token has no entry)."""
    return prompt_ids[:1] + logprob_token_ids(entries)


def echo_logprobs(
    prompt_ids: list[int], entries: list[common_pb2.TokenLogprob], texts: dict[int, str], top: int
) -> dict:
    """choices[].logprobs of an echoed prompt: its first token has no logprob (null), the others are
    entries (the prompt's logprobs from its second token on)."""
    first = texts.get(prompt_ids[0], "")
    rest = completion_logprobs(entries, texts, len(first), top)
    head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    return join_completion_logprobs(head, rest)


def join_completion_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(
    entries: list[common_pb2.TokenLogprob], texts: dict[int, str], top: int
) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then for each token a dict of it and
    its top alternatives, token id -> {logprob, rank, decoded_token}."""
    out: list[dict | None] = [None]
    for entry in entries:
        item = {
            entry.token_id: {
                "logprob": entry.logprob,
                "rank": entry.rank or None,
                "decoded_token": texts.get(entry.token_id, ""),
            }
        }
        for rank, alt in enumerate(entry.top[:top], 1):
            item.setdefault(
                alt.token_id,
                {
                    "logprob": alt.logprob,
                    "rank": rank,
                    "decoded_token": texts.get(alt.token_id, ""),
                },
            )
        out.append(item)
    return out
