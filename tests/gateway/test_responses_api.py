"""OpenAI's Responses API (/v1/responses) through the official `openai` client, on the fake backends:
text and item input, streaming events, function tools with previous_response_id, the store."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from radixserve.v1 import common_pb2
from radixserve.gateway.api.responses_protocol import ResponsesRequest
from radixserve.gateway.api.responses_routes import chat_request
from radixserve.gateway.api import responses_format as rfmt
from radixserve.gateway.api.openai_routes import chat_input
from radixserve.gateway.pipeline.generation import Finish
from radixserve.gateway.pipeline.response_store import ResponseStore, stored_size
from tests.gateway.real_scheduler import gateway_stack, read_stream
from tests.gateway.real_scheduler import run as run_stack
from tests.gateway.fakes import (
    CONTEXT_LENGTH,
    FAIL_MARKER,
    MODEL,
    POISON,
    SCRIPT_CLOSE,
    SCRIPT_OPEN,
    FakeBackends,
    RunningGateway,
    expected_output,
    wait_until,
    render_chat,
)

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def script(text: str) -> str:
    """A user message that makes the fake model answer `text`."""
    return SCRIPT_OPEN + text + SCRIPT_CLOSE


def hermes_call(name: str, arguments: dict) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"<tool_call>{call}</tool_call>"


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends, tool_call_parser="hermes")
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


def last_prompt(backends) -> str:
    return "".join(map(chr, backends.scheduler.prompts[-1]))


def conversation(*messages: tuple[str, str]) -> str:
    return render_chat(
        common_pb2.ChatConversation(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            add_generation_prompt=True,
        )
    )


def post(gw, body: dict) -> httpx.Response:
    return httpx.post(gw.base_url + "/v1/responses", json=body, timeout=30)


# ---- one response ----


def test_string_input_cut_by_max_output_tokens_is_incomplete(client, gw, backends):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=10)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == MODEL
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == expected_output(10)
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "incomplete" and message.id.startswith("msg_")
    prompt = conversation(("user", "Hi"))
    assert last_prompt(backends) == prompt
    usage = resp.usage
    assert (usage.input_tokens, usage.output_tokens) == (len(prompt), 10)
    assert usage.total_tokens == len(prompt) + 10
    assert usage.output_tokens_details.reasoning_tokens == 0
    # The raw body validates against the client's own types, as OpenAI's does.
    raw = post(gw, {"input": "Hi", "max_output_tokens": 3, "store": False})
    assert raw.status_code == 200
    assert Response.model_validate(raw.json()).output_text == expected_output(3)


def test_item_input_with_instructions_completes(client, backends):
    resp = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
            {"role": "user", "content": [{"type": "input_text", "text": script("Fine.")}]},
        ],
        temperature=0.5,
        top_p=0.9,
        metadata={"topic": "greeting"},
    )
    assert resp.status == "completed" and resp.incomplete_details is None
    assert resp.output_text == "Fine."
    assert resp.instructions == "Be brief." and resp.metadata == {"topic": "greeting"}
    assert (resp.temperature, resp.top_p) == (0.5, 0.9)
    assert last_prompt(backends) == conversation(
        ("system", "Be brief."), ("user", "Hello"), ("assistant", "Hi!"), ("user", script("Fine."))
    )


# ---- streaming ----


def test_stream_events_in_order_with_sequence_numbers(client, gw):
    events = list(client.responses.create(model=MODEL, input=script("Hello world"), stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "Hello world"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Hello world"
    assert final.usage.output_tokens == len("Hello world") + 1  # and the EOS
    # Stored as streamed.
    assert client.responses.retrieve(final.id).output_text == "Hello world"


def test_stream_frames_name_their_event_and_validate(gw):
    with httpx.stream(
        "POST",
        gw.base_url + "/v1/responses",
        json={"input": "Hi", "stream": True, "max_output_tokens": 4},
        timeout=30,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    frames = body.strip("\n").split("\n\n")
    assert "[DONE]" not in body  # OpenAI's Responses stream has no [DONE] sentinel
    for frame in frames:
        event_line, data_line = frame.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        EVENTS.validate_python(data)
    last = json.loads(frames[-1].split("\n")[1].removeprefix("data: "))
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_failures_before_output_get_their_status_and_later_ones_response_failed(client, gw):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=POISON, stream=True)
    events = list(client.responses.create(model=MODEL, input=FAIL_MARKER, stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert any(e.type == "response.output_text.delta" for e in events)
    with pytest.raises(openai.NotFoundError):  # a failed response is not stored
        client.responses.retrieve(events[-1].response.id)
    with pytest.raises(openai.APIStatusError) as err:
        client.responses.create(model=MODEL, input=FAIL_MARKER)
    assert err.value.status_code == 503


# ---- function tools ----


def test_function_call_round_trip_with_previous_response_id(client, backends):
    call_text = hermes_call("get_weather", {"city": "Paris"})
    first = client.responses.create(model=MODEL, input=script(call_text), tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert first.status == "completed" and first.tools[0].name == "get_weather"

    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": script("Sunny.")}
        ],
        tools=[WEATHER],
    )
    assert second.output_text == "Sunny." and second.previous_response_id == first.id
    # The earlier turn (its input and its call) is prepended to this one's input.
    assert last_prompt(backends) == conversation(
        ("user", script(call_text)), ("assistant", ""), ("tool", script("Sunny."))
    )
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_streamed_function_call_events(client):
    call_text = hermes_call("get_weather", {"city": "Oslo"})
    events = list(
        client.responses.create(
            model=MODEL, input=script("Let me check." + call_text), tools=[WEATHER], stream=True
        )
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Oslo"}
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me check."
    done_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.model_dump() for i in done_items] == [o.model_dump() for o in final.output]


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    short = {"type": "function", "name": "w"}  # prompt and output must fit the fake's context
    calls = hermes_call("w", {"c": "A"}) + hermes_call("w", {"c": "B"})
    both = client.responses.create(model=MODEL, input=script(calls), tools=[short])
    assert [json.loads(o.arguments)["c"] for o in both.output] == ["A", "B"]
    one = client.responses.create(
        model=MODEL, input=script(calls), tools=[short], parallel_tool_calls=False
    )
    assert [json.loads(o.arguments)["c"] for o in one.output] == ["A"]
    assert one.parallel_tool_calls is False


# ---- the store ----


def test_store_retrieve_delete_cancel_and_input_items(client):
    resp = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        max_output_tokens=2,
    )
    assert client.responses.retrieve(resp.id).model_dump() == resp.model_dump()
    items = client.responses.input_items.list(resp.id)
    assert [i.content[0].text for i in items.data] == ["two", "one"]  # newest first
    asc = client.responses.input_items.list(resp.id, order="asc", limit=1)
    assert [i.content[0].text for i in asc.data] == ["one"] and asc.has_more
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.cancel(resp.id)
    assert "background" in err.value.message
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)


def test_store_false_is_not_retrievable(client):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(resp.id)
    assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input="again", max_output_tokens=2, previous_response_id=resp.id
        )
    assert err.value.body["param"] == "previous_response_id"
    assert err.value.body["code"] == "previous_response_not_found"


def test_input_items_page_through_with_after(gw, client):
    resp = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": str(i)} for i in range(5)],
        max_output_tokens=1,
    )
    url = f"{gw.base_url}/v1/responses/{resp.id}/input_items"
    first = ResponseItemList.model_validate(
        httpx.get(url, params={"limit": 2, "order": "asc"}).json()
    )
    rest = httpx.get(url, params={"limit": 10, "order": "asc", "after": first.last_id}).json()
    texts = [i["content"][0]["text"] for i in rest["data"]]
    assert [i.content[0].text for i in first.data] == ["0", "1"] and texts == ["2", "3", "4"]
    assert httpx.get(url, params={"limit": 0}).status_code == 400


# ---- background mode ----


@pytest.fixture(scope="module")
def slow_client():
    """A gateway whose fake model takes 50 ms a step, so a background response can be caught running."""
    backends = FakeBackends(step_delay=0.05)
    running = RunningGateway(backends)
    yield openai.OpenAI(base_url=running.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    running.close()
    backends.stop()


def test_background_response_runs_on_and_can_be_retrieved(slow_client):
    resp = slow_client.responses.create(
        model=MODEL, input="Hi", background=True, max_output_tokens=6
    )
    assert resp.background is True and resp.status == "in_progress" and resp.output == []
    assert slow_client.responses.retrieve(resp.id).status == "in_progress"
    with pytest.raises(openai.BadRequestError):  # not yet a conversation to continue
        slow_client.responses.create(model=MODEL, input="more", previous_response_id=resp.id)
    assert wait_until(lambda: slow_client.responses.retrieve(resp.id).status != "in_progress")
    done = slow_client.responses.retrieve(resp.id)
    assert done.status == "incomplete" and done.output_text == expected_output(6)
    assert [i.content[0].text for i in slow_client.responses.input_items.list(resp.id).data] == [
        "Hi"
    ]
    with pytest.raises(openai.BadRequestError) as err:
        slow_client.responses.cancel(resp.id)
    assert "incomplete" in err.value.message


def test_cancel_a_running_background_response_and_cut_streams_leave_no_leaks(tmp_path):
    """Against the real scheduler (the fake one never reports an abort)."""

    async def main():
        async with gateway_stack(tmp_path) as stack:
            body = {"model": MODEL, "input": "Hello", "max_output_tokens": 2048}
            r = await stack.client.post("/v1/responses", json={**body, "background": True})
            resp = r.json()
            assert r.status_code == 200 and resp["status"] == "in_progress"
            await stack.wait_for(lambda info: info["running_requests"] == 1)
            r = await stack.client.post(f"/v1/responses/{resp['id']}/cancel")
            cancelled = Response.model_validate(r.json())
            assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 2048
            again = await stack.client.post(f"/v1/responses/{resp['id']}/cancel")
            assert again.json()["status"] == "cancelled"  # cancelling twice answers it as it ended
            await stack.assert_idle_without_leaks()
            lines = await read_stream(
                stack.client,
                "/v1/responses",
                {**body, "stream": True},
                cut_when=lambda lines: "event: response.output_text.delta" in lines,
            )
            assert (
                "event: response.output_text.delta" in lines
                and "event: response.completed" not in lines
            )
            await stack.assert_idle_without_leaks()

    run_stack(main())


# ---- bad requests ----


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "Hi", "frequency_penalty": 1}, "frequency_penalty"),  # not a Responses field
        ({"input": "Hi", "background": True, "store": False}, "background"),
        ({"input": "Hi", "background": True, "stream": True}, "stream"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            None,
        ),
        ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "Hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ],
)
def test_bad_requests_are_400(gw, body, param):
    r = post(gw, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert (error["param"] or "").startswith(param), error


def test_malformed_ids_are_400_and_unknown_ones_404(gw, client):
    for method in ("GET", "DELETE"):
        r = httpx.request(method, gw.base_url + "/v1/responses/chatcmpl-1", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"
        r = httpx.request(method, gw.base_url + "/v1/responses/resp_unknown", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    r = post(gw, {"input": "Hi", "previous_response_id": "bad"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"


def test_unknown_model_is_404(gw):
    r = post(gw, {"input": "Hi", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_truncation_auto_drops_the_oldest_items(client, gw, backends):
    long = "x" * (CONTEXT_LENGTH // 2)
    body = {"input": [{"role": "user", "content": long}] * 2 + [{"role": "user", "content": "end"}]}
    r = post(gw, {**body, "max_output_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(gw, {**body, "max_output_tokens": 8, "truncation": "auto"})
    assert r.status_code == 200 and r.json()["truncation"] == "auto"
    assert last_prompt(backends) == conversation(("user", long), ("user", "end"))


# ---- the conversion to a chat request (pure) ----


def test_text_format_json_schema_becomes_the_chat_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = ResponsesRequest.model_validate(
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "A", "schema": schema}}}
    )
    chat = chat_request(req, rfmt.input_items(req))
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema},
    }
    constraint = chat_input(chat).sampling.constraint
    assert (constraint.kind, json.loads(constraint.spec)) == ("json_schema", schema)
    obj = ResponsesRequest.model_validate(
        {"input": "x", "text": {"format": {"type": "json_object"}}}
    )
    assert (
        chat_input(chat_request(obj, rfmt.input_items(obj))).sampling.constraint.kind
        == "json_object"
    )


def test_function_tools_and_calls_become_chat_shapes():
    req = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "user", "content": "q"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "r1"},
            ],
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "f"},
        }
    )
    chat = chat_request(req, rfmt.input_items(req))
    assert chat.tools == [{"type": "function", "function": {"name": "f"}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    roles = [(m.role, len(m.tool_calls or []), m.tool_call_id) for m in chat.messages]
    assert roles == [("user", 0, None), ("assistant", 2, None), ("tool", 0, "c1")]


# ---- the store's bounds (pure) ----


def entry(i: int, pad: int = 0) -> tuple[dict, list, list]:
    return {"id": f"resp_{i}", "pad": "x" * pad}, [], []


def test_store_evicts_the_oldest_beyond_max_entries():
    store = ResponseStore(max_entries=3, max_bytes=10**6)
    for i in range(5):
        assert store.put(*entry(i))
    assert len(store) == 3
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_store_evicts_the_oldest_beyond_max_bytes_and_refuses_one_too_large():
    size = stored_size(*entry(0, pad=100))
    store = ResponseStore(max_entries=100, max_bytes=3 * size)
    for i in range(4):
        assert store.put(*entry(i, pad=100))
    assert store.get("resp_0") is None and store.get("resp_3") is not None
    assert store.total_bytes == 3 * size
    assert not store.put(*entry(9, pad=4 * size)) and store.get("resp_9") is None
    assert store.delete("resp_3") and not store.delete("resp_3")
    assert store.total_bytes == 2 * size
    store.put(*entry(1, pad=100))  # replacing an entry counts it once
    assert store.total_bytes == 2 * size and len(store) == 2


def test_finish_reasons_map_to_response_statuses():
    def status(reason: str) -> str:
        return rfmt.final_status(Finish(reason, None, 1, 1, 0))

    assert [status(r) for r in ("stop", "length", "abort")] == [
        "completed",
        "incomplete",
        "cancelled",
    ]


# ---- reasoning (--reasoning-parser) ----

THOUGHT = "Paris is in France."
THINKING = f"<think>{THOUGHT}</think>"


@pytest.fixture(scope="module")
def thinking_gw(backends):
    running = RunningGateway(backends, tool_call_parser="hermes", reasoning_parser="qwen3")
    yield running
    running.close()


@pytest.fixture(scope="module")
def thinking_client(thinking_gw):
    return openai.OpenAI(
        base_url=thinking_gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30
    )


def test_reasoning_comes_as_a_reasoning_item_before_the_message(thinking_client, client):
    resp = thinking_client.responses.create(model=MODEL, input=script(THINKING + "Sunny."))
    reasoning, message = resp.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.summary == [] and reasoning.status == "completed"
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", THOUGHT)]
    assert message.type == "message" and resp.output_text == "Sunny."
    # The tokens up to the delta that brings the first content (the fake sends two a message).
    tokens = resp.usage.output_tokens_details.reasoning_tokens
    assert len(THINKING) <= tokens <= len(THINKING) + 2 < resp.usage.output_tokens
    # Without --reasoning-parser the text is all content and no token is reasoning.
    plain = client.responses.create(model=MODEL, input=script(THINKING + "Sunny."))
    assert plain.output_text == THINKING + "Sunny."
    assert plain.usage.output_tokens_details.reasoning_tokens == 0


def test_reasoning_streams_as_reasoning_text_events(thinking_gw, thinking_client):
    body = {"input": script(THINKING + "Sunny."), "stream": True}
    with httpx.stream("POST", thinking_gw.base_url + "/v1/responses", json=body, timeout=30) as r:
        frames = r.read().decode().strip("\n").split("\n\n")
    events = [EVENTS.validate_python(json.loads(f.split("\n")[1][6:])) for f in frames]
    kinds = [e.type for e in events]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    assert kinds[first_text - 5 : first_text] == [
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert events[2].item.type == "reasoning" and events[3].part.type == "reasoning_text"
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == THOUGHT
    [done] = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == THOUGHT and done.output_index == 0
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Sunny."
    assert final.usage.output_tokens_details.reasoning_tokens >= len(THINKING)
    done_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.model_dump() for i in done_items] == [o.model_dump() for o in final.output]
    whole = thinking_client.responses.create(model=MODEL, input=script(THINKING + "Sunny."))
    assert [o.type for o in whole.output] == [o.type for o in final.output]


def test_reasoning_then_a_call_and_the_next_turn_leaves_the_reasoning_out(
    thinking_client, backends
):
    call_text = hermes_call("get_weather", {"city": "Paris"})
    first = thinking_client.responses.create(
        model=MODEL, input=script(THINKING + call_text), tools=[WEATHER]
    )
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = thinking_client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": script("Sunny.")}
        ],
        tools=[WEATHER],
    )
    assert second.status == "completed" and second.output_text == "Sunny."
    assert last_prompt(backends) == conversation(
        ("user", script(THINKING + call_text)), ("assistant", ""), ("tool", script("Sunny."))
    )


def test_output_cut_inside_the_reasoning_is_incomplete_reasoning(thinking_client):
    resp = thinking_client.responses.create(
        model=MODEL, input=script(THINKING + "Sunny."), max_output_tokens=12
    )
    assert resp.status == "incomplete"
    reasoning, message = resp.output
    assert reasoning.content[0].text == THINKING[len("<think>") : 12]
    assert reasoning.status == message.status == "incomplete" and resp.output_text == ""
    assert resp.usage.output_tokens_details.reasoning_tokens == 12


def test_reasoning_items_sent_back_as_input_are_left_out_of_the_prompt(
    thinking_gw, thinking_client, backends
):
    first = thinking_client.responses.create(model=MODEL, input=script(THINKING + "Sunny."))
    replayed = [item.model_dump(exclude_none=True) for item in first.output]
    second = thinking_client.responses.create(
        model=MODEL, input=[*replayed, {"role": "user", "content": script("Thanks.")}], store=False
    )
    assert second.output_text == "Thanks."
    assert last_prompt(backends) == conversation(
        ("assistant", "Sunny."), ("user", script("Thanks."))
    )
    only_reasoning = post(thinking_gw, {"input": replayed[:1]})
    assert only_reasoning.status_code == 400 and only_reasoning.json()["error"]["param"] == "input"
