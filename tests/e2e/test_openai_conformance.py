"""OpenAI API conformance through the official `openai` client against the real stack (SmolLM2),
modelled on SGLang's test_openai_server: choice counts and indices, echo, logprob shapes, stops,
seeds, penalties, usage, structured output, tool calls, errors, and a chat UI's request pattern."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import jsonschema
import openai
import pytest

from radixserve.common.args import ServerArgs
from radixserve.tokenizer.core import load_tokenizer, tokenizer_folder
from tests.stack import openai_client, wait_idle_and_check_no_leak

pytestmark = pytest.mark.e2e
SHORT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def stack(default_stack):
    return default_stack


@pytest.fixture(scope="module")
def client(stack):
    return openai_client(stack)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_folder(ServerArgs()))


def finish_reasons(chunks) -> Counter:
    return Counter(c.index for chunk in chunks for c in chunk.choices if c.finish_reason)


# ---- choices ----


def test_chat_n_choices_and_streamed_choices_each_finish_once(client, model):
    resp = client.chat.completions.create(
        model=model, messages=SHORT, n=3, max_tokens=6, temperature=1.0, seed=3
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = client.chat.completions.create(
        model=model, messages=SHORT, max_tokens=6, temperature=1.0, seed=3
    )
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert 3 <= resp.usage.completion_tokens <= 18
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=SHORT,
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert finish_reasons(chunks) == Counter({0: 1, 1: 1})
    roles = Counter(
        c.index for chunk in chunks for c in chunk.choices if c.delta.role == "assistant"
    )
    assert roles == Counter({0: 1, 1: 1})
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10


def test_seeded_choices_are_reproducible_and_differ(stack, client, model):
    def sample(seed, n=2):
        # The model runs in bf16, where a cached prefix gives slightly different logits than a full
        # prefill: the same request is reproducible from the same cache state.
        httpx.post(stack.base_url + "/flush_cache", timeout=30).raise_for_status()
        resp = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=seed, n=n
        )
        return [c.text for c in resp.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1]  # choice i draws with seed + i


def test_completions_batch_of_prompts_and_echo(client, model):
    resp = client.completions.create(
        model=model, prompt=["The sky is", "Two plus two"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text and c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 16
    plain = client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=model, prompt="The sky is", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith("The sky is") and len(echoed.choices[0].text) > len(
        "The sky is"
    )
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens == 4
    chunks = list(
        client.completions.create(
            model=model, prompt="The sky is", max_tokens=4, temperature=0, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text == "The sky is"
    assert "".join(c.choices[0].text for c in chunks).startswith("The sky is")


# ---- logprobs ----


def test_completion_logprobs_shape(client, model):
    resp = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3
    )
    lp = resp.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    )
    assert all(isinstance(t, str) for t in lp.tokens)
    assert all(isinstance(top, dict) and 1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_logprobs_shape_streamed_and_not(client, model):
    resp = client.chat.completions.create(
        model=model, messages=SHORT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 4
    for item in content:
        assert (
            isinstance(item.token, str)
            and item.logprob <= 0
            and item.bytes == list(item.token.encode())
        )
        assert (
            len(item.top_logprobs) == 2
            and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=SHORT,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
    )
    streamed = [
        item for chunk in chunks for c in chunk.choices if c.logprobs for item in c.logprobs.content
    ]
    assert [i.token for i in streamed] == [i.token for i in content]


# ---- stopping ----


def test_stop_strings_and_stop_token_ids(client, model, tokenizer):
    free = client.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0
    ).choices[0]
    word = free.text.strip().split(",")[0].strip() or free.text.strip()[:1]
    for stop in (word, [word, "zzz"]):
        stopped = client.completions.create(
            model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=stop
        ).choices[0]
        assert stopped.finish_reason == "stop" and word not in stopped.text
        assert free.text.startswith(stopped.text)
    first_id = tokenizer.encode(free.text, add_special_tokens=False)[0]
    by_id = client.completions.create(
        model=model,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [first_id]},
    )
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens == 1


def test_min_tokens_logit_bias_and_ignore_eos(client, model, tokenizer):
    eos = tokenizer.eos_token_id
    forced_eos = {"logit_bias": {str(eos): 100}}
    assert (
        client.completions.create(
            model=model, prompt="Hi", max_tokens=10, temperature=0, **forced_eos
        ).usage.completion_tokens
        == 1
    )
    held = client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=10,
        temperature=0,
        **forced_eos,
        extra_body={"min_tokens": 4},
    )
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    ignored = client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=6,
        temperature=0,
        **forced_eos,
        extra_body={"ignore_eos": True},
    )
    assert ignored.usage.completion_tokens == 6 and ignored.choices[0].finish_reason == "length"
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(
        model=model, prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert tokenizer.encode(forced.choices[0].text, add_special_tokens=False) == [token] * 3


def test_penalties_change_greedy_output_and_are_validated(stack, client, model):
    prompt = "Repeat after me: la la la la la la la la"
    httpx.post(stack.base_url + "/flush_cache", timeout=30).raise_for_status()
    plain = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=0
    )
    for option in ({"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        penalised = client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, **option
        )
        assert penalised.choices[0].text != plain.choices[0].text, option
    # A presence penalty of 2 does not break this loop, but lowers the repeated tokens' logprobs
    # (they are reported from the logits sampled from, after the penalty).
    httpx.post(stack.base_url + "/flush_cache", timeout=30).raise_for_status()
    present = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=0, presence_penalty=2.0
    )
    assert present.choices[0].text == plain.choices[0].text
    penalised_lp = present.choices[0].logprobs.token_logprobs
    plain_lp = plain.choices[0].logprobs.token_logprobs
    assert penalised_lp[0] == pytest.approx(
        plain_lp[0], abs=1e-4
    )  # nothing generated yet to penalise
    assert sum(penalised_lp[1:]) < sum(plain_lp[1:])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=prompt, max_tokens=4, frequency_penalty=3.0)
    assert err.value.body["param"] == "frequency_penalty"


def test_max_completion_tokens(client, model):
    resp = client.chat.completions.create(
        model=model, messages=SHORT, max_completion_tokens=3, temperature=0
    )
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


# ---- usage ----


def test_prompt_tokens_match_the_tokenizer_and_cached_tokens(client, model, tokenizer):
    prompt = "A long shared prefix for the cache: " + "lorem ipsum dolor sit amet " * 20
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == len(tokenizer.encode(prompt))
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2
    chat = client.chat.completions.create(model=model, messages=SHORT, max_tokens=2)
    assert chat.usage.prompt_tokens == len(
        tokenizer.apply_chat_template(
            SHORT, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_assistant_prefill_continues_the_final_message(client, model, tokenizer):
    messages = [*SHORT, {"role": "assistant", "content": "The three colors are"}]
    resp = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=5,
        temperature=0,
        extra_body={"continue_final_message": True},
    )
    expected = tokenizer.apply_chat_template(
        messages, continue_final_message=True, tokenize=True, return_dict=False
    )
    assert resp.usage.prompt_tokens == len(expected)
    assert resp.choices[0].message.content


# ---- structured output and tools ----

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_json_schema_and_json_object_outputs_validate(client, model):
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA},
        },
    )
    jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"regex": None},
    )
    assert obj.choices[0].message.content.startswith("{")
    regex = client.completions.create(
        model=model,
        prompt="Phone:",
        max_tokens=20,
        temperature=0,
        extra_body={"regex": r"\d{3}-\d{4}"},
    )
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_gives_parseable_calls(client, model, stream):
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments, c.id) for c in choice.message.tool_calls]
        finish = choice.finish_reason
    else:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        by_index: dict[int, list] = {}
        for chunk in chunks:
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    entry = by_index.setdefault(d.index, [None, "", None])
                    if d.function.name:
                        entry[0], entry[2] = d.function.name, d.id
                    entry[1] += d.function.arguments or ""
        calls = [tuple(by_index[i]) for i in sorted(by_index)]
        finish = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason][0]
        assert finish_reasons(chunks) == Counter({0: 1})
    assert calls and finish == "tool_calls"
    for name, arguments, call_id in calls:
        assert name in ("get_weather", "get_time") and call_id.startswith("call_")
        tool = WEATHER if name == "get_weather" else TIME
        jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_named_tool_choice_and_none(client, model):
    named = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Time in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
        temperature=0,
    )
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and "zone" in json.loads(call.function.arguments)
    plain = client.chat.completions.create(
        model=model,
        messages=SHORT,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=5,
        temperature=0,
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model,
            messages=SHORT,
            tools=[WEATHER],
            max_tokens=5,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert err.value.body["param"] == "tool_choice"


def test_responses_api_tool_round_trip_and_structured_text(client, model):
    weather = {"type": "function", **WEATHER["function"]}  # Responses' flat function tool
    first = client.responses.create(
        model=model,
        input="What's the weather in Paris?",
        tools=[weather],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), weather["parameters"])
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        max_output_tokens=12,
        temperature=0,
    )
    assert second.output_text and second.usage.input_tokens > first.usage.input_tokens
    events = list(
        client.responses.create(
            model=model,
            input="Invent a person.",
            text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA}},
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    assert events[-1].type == "response.completed"
    jsonschema.validate(json.loads(events[-1].response.output_text), SCHEMA)


# ---- errors ----


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 0}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
    ],
)
def test_bad_options_get_400_with_openais_body(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=SHORT, max_tokens=2, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_the_server_keeps_serving(stack, client, model):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=SHORT, max_tokens=2)
    assert client.models.retrieve(model).id == model
    wait_idle_and_check_no_leak(stack)


# ---- a chat UI's request pattern (Open WebUI) ----


def test_chat_ui_pattern_models_polling_and_streaming_with_usage(stack, client, model):
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        for _ in range(3):
            models = http.get("/v1/models", headers={"Authorization": "Bearer unused"}).json()
            assert models["object"] == "list" and models["data"][0]["id"] == model
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
            ],
            "max_tokens": 8,
            "temperature": 0.7,
        }
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["usage"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert sum(1 for e in events for c in e["choices"] if c["finish_reason"]) == 1
    wait_idle_and_check_no_leak(stack)
