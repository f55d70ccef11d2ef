"""Run radixserve's conformance cases against a running server: the API behaviours SGLang's OpenAI-server
tests and vLLM's tests/entrypoints/openai check (issue 18's numbered items), model quality left out.
Prints PASS / FAIL per case; exit status 1 when one failed. Not part of CI (docs/api-conformance.md).

Usage: python scripts/conformance.py --base-url http://127.0.0.1:30000 [--api-key KEY] [-k tokenize]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import httpx

CASES: list[tuple[str, str, Callable]] = []  # (item, name, check)


def case(item: str):
    def register(check: Callable) -> Callable:
        CASES.append((item, check.__name__.removeprefix("check_"), check))
        return check

    return register


@dataclass
class Server:
    http: httpx.Client
    model: str

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json={"model": self.model, **body})

    def ok(self, path: str, body: dict) -> dict:
        r = self.post(path, body)
        assert r.status_code == 200, f"{path}: HTTP {r.status_code}: {r.text[:300]}"
        return r.json()

    def refused(self, path: str, body: dict, status: int = 400) -> dict:
        r = self.post(path, body)
        assert r.status_code == status, (
            f"{path}: want HTTP {status}, got {r.status_code}: {r.text[:300]}"
        )
        error = r.json().get("error")
        assert isinstance(error, dict) and {"message", "type"} <= set(error), r.text[:300]
        return error

    def stream(self, path: str, body: dict) -> list[dict]:
        chunks = []
        with self.http.stream(
            "POST", path, json={"model": self.model, **body, "stream": True}
        ) as r:
            assert r.status_code == 200, f"{path}: HTTP {r.status_code}"
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[len("data: ") :]))
        return chunks


CHAT = [{"role": "user", "content": "Count from one to twenty."}]
PYDANTIC_TOOL = {  # parameters as pydantic writes them: $defs and $ref
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "$defs": {
                "City": {
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                    "type": "object",
                }
            },
            "properties": {"city": {"$ref": "#/$defs/City"}},
            "required": ["city"],
            "type": "object",
        },
    },
}


# ---- 1. prompt logprobs ----


@case("1")
def check_echo_with_logprobs(s: Server):
    body = s.ok(
        "/v1/completions", {"prompt": "Hello world", "max_tokens": 2, "echo": True, "logprobs": 1}
    )
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None, "the first prompt token has no logprob"
    assert len(logprobs["tokens"]) > 2, "echo covers the prompt's tokens too"


@case("1")
def check_prompt_logprobs(s: Server):
    body = s.ok("/v1/completions", {"prompt": "Hello world", "max_tokens": 1, "prompt_logprobs": 1})
    entries = body["choices"][0].get("prompt_logprobs") or body.get("prompt_logprobs")
    assert entries and entries[0] is None, (
        "vLLM's prompt_logprobs: None for the first token, then dicts"
    )


# ---- 2. streamed finish ----


@case("2")
def check_stream_finish_rides_on_the_last_token(s: Server):
    chunks = s.stream(
        "/v1/completions",
        {"prompt": "Once", "max_tokens": 10, "ignore_eos": True, "temperature": 0},
    )
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    assert len(choices) == 10, f"{len(choices)} chunks for 10 tokens"
    assert choices[-1]["finish_reason"] == "length" and choices[-1]["text"], choices[-1]


# ---- 3. tools ----


@case("3")
def check_required_tool_choice_with_defs(s: Server):
    body = s.ok(
        "/v1/chat/completions",
        {"messages": CHAT, "tools": [PYDANTIC_TOOL], "tool_choice": "required", "max_tokens": 200},
    )
    calls = body["choices"][0]["message"]["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "book"


@case("3")
def check_cut_off_tool_call_is_still_a_tool_call(s: Server):
    body = s.ok(
        "/v1/chat/completions",
        # Enough tokens for the call's name and the start of its arguments, not for all of them.
        {"messages": CHAT, "tools": [PYDANTIC_TOOL], "tool_choice": "required", "max_tokens": 25},
    )
    choice = body["choices"][0]
    assert choice["message"]["tool_calls"] is not None, (
        "a tool call cut off by max_tokens is still tool_calls"
    )
    assert choice["finish_reason"] == "length", choice["finish_reason"]


@case("3")
def check_tool_arguments_stream_incrementally(s: Server):
    chunks = s.stream(
        "/v1/chat/completions",
        {"messages": CHAT, "tools": [PYDANTIC_TOOL], "tool_choice": "required", "max_tokens": 200},
    )
    pieces = [
        call["function"].get("arguments")
        for c in chunks
        for call in (c["choices"][0]["delta"].get("tool_calls") or [] if c.get("choices") else [])
        if call.get("function", {}).get("arguments")
    ]
    assert len(pieces) > 1, f"arguments came in {len(pieces)} chunk(s)"


# ---- 4. validation ----


@case("4")
def check_stream_options_without_stream(s: Server):
    s.refused("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}})


@case("4")
def check_seed_outside_int64(s: Server):
    s.refused("/v1/chat/completions", {"messages": CHAT, "seed": 2**64})


@case("4")
def check_logprobs_zero_gives_one_entry_dicts(s: Server):
    body = s.ok("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "logprobs": 0})
    tops = body["choices"][0]["logprobs"]["top_logprobs"]
    assert all(isinstance(t, dict) and len(t) == 1 for t in tops), tops


@case("4")
def check_null_content_is_refused(s: Server):
    s.refused("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]})
    s.refused("/v1/chat/completions", {"messages": [{"role": "user"}]})


# ---- 5. defaults ----


@case("5")
def check_completions_default_to_16_tokens(s: Server):
    """16 unless the server sets max_new_tokens (--preferred-sampling-params, ...): then that."""
    defaults = s.http.get("/get_server_info").json().get("sampling_defaults") or {}
    want = defaults.get("max_new_tokens") or 16
    body = s.ok("/v1/completions", {"prompt": "Once upon a time", "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == want, (want, body["usage"])


@case("5")
def check_server_info_shows_sampling_defaults(s: Server):
    info = s.http.get("/get_server_info").json()
    assert "sampling_defaults" in info, "GET /get_server_info has no sampling_defaults"


# ---- 6. extensions ----


@case("6")
def check_unknown_field_is_refused(s: Server):
    s.refused("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "no_such_field": 1})


@case("6")
def check_tokenize_and_detokenize(s: Server):
    body = s.ok("/tokenize", {"prompt": "Hello world"})
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    back = s.ok("/detokenize", {"tokens": body["tokens"]})
    assert "Hello world" in back["prompt"]
    chat = s.ok("/tokenize", {"messages": CHAT})
    assert chat["count"] > body["count"]


@case("6")
def check_version(s: Server):
    assert isinstance(s.http.get("/version").json().get("version"), str)


@case("6")
def check_model_card_root_is_the_served_name(s: Server):
    card = s.http.get("/v1/models").json()["data"][0]
    assert card["root"] == card["id"], card


@case("6")
def check_stop_regex(s: Server):
    body = s.ok(
        "/v1/completions",
        {"prompt": "1, 2, 3,", "max_tokens": 30, "temperature": 0, "stop_regex": r"\d"},
    )
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any(ch.isdigit() for ch in body["choices"][0]["text"])
    s.refused("/v1/completions", {"prompt": "x", "stop_regex": "("})


@case("6")
def check_structured_outputs_choice(s: Server):
    body = s.ok(
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 5, "structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert body["choices"][0]["message"]["content"] in ("yes", "no")


@case("6")
def check_return_token_ids(s: Server):
    body = s.ok("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "return_token_ids": True})
    choice = body["choices"][0]
    assert (
        choice["prompt_token_ids"]
        and len(choice["token_ids"]) == body["usage"]["completion_tokens"]
    )


@case("6")
def check_truncate_prompt_tokens(s: Server):
    body = s.ok(
        "/v1/completions",
        {"prompt": "one two three four five six", "max_tokens": 1, "truncate_prompt_tokens": 2},
    )
    assert body["usage"]["prompt_tokens"] == 2


@case("6")
def check_continuous_usage_stats(s: Server):
    chunks = s.stream(
        "/v1/completions",
        {
            "prompt": "Hi",
            "max_tokens": 4,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    counts = [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")]
    assert (
        counts
        and counts == sorted(counts)
        and counts[-1] == chunks[-1]["usage"]["completion_tokens"]
    )


@case("6")
def check_score(s: Server):
    body = s.ok(
        "/v1/score", {"query": "Is it sunny?", "items": ["yes", "no"], "label_token_ids": [1, 2]}
    )
    assert len(body["scores"]) == 2 and all(len(row) == 2 for row in body["scores"])
    assert all(0 <= p <= 1 for row in body["scores"] for p in row)
    assert body["object"] == "scoring"


# ---- the agent APIs ----


@case("agents")
def check_responses_api(s: Server):
    body = s.ok("/v1/responses", {"input": "Say hi", "max_output_tokens": 8})
    assert body["object"] == "response" and body["output"]


@case("agents")
def check_anthropic_messages(s: Server):
    body = s.ok("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    assert body["type"] == "message" and body["content"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument(
        "-k", dest="pattern", default="", help="only cases whose name contains this"
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout) as http:
        model = args.model or http.get("/v1/models").json()["data"][0]["id"]
        server = Server(http, model)
        failed = 0
        for item, name, check in CASES:
            if args.pattern not in name:
                continue
            try:
                check(server)
                print(f"PASS  [{item}] {name}")
            except Exception as e:  # a failed case, whatever broke, is reported and the run goes on
                failed += 1
                print(f"FAIL  [{item}] {name}: {type(e).__name__}: {e}")
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
