"""OpenAI Responses shapes: the request's input as chat messages, the output items, the response
object and its stream events. Pure: no I/O."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from radixserve.gateway.api.errors import bad_request, not_supported
from radixserve.gateway.api.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputContentPart,
    InputMessage,
    ReasoningItem,
    ResponsesRequest,
    TextFormatJsonObject,
    TextFormatJsonSchema,
)
from radixserve.gateway.pipeline.generation import Finish


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- input ----


def input_items(req: ResponsesRequest) -> list[dict]:
    """This request's input as stored items, each with an id (a string input is one user message)."""
    if isinstance(req.input, str):
        message = InputMessage(
            role="user", content=[InputContentPart(type="input_text", text=req.input)]
        )
        return [_stored_item(message)]
    return [_stored_item(item) for item in req.input]


def _stored_item(
    item: InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
) -> dict:
    data = item.model_dump(exclude_none=True)
    if isinstance(item, InputMessage) and isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        data["content"] = [{"type": kind, "text": item.content}]
    prefix = {
        "message": "msg",
        "function_call": "fc",
        "function_call_output": "fco",
        "reasoning": "rs",
    }[item.type]
    data.setdefault("id", new_id(prefix))
    data.setdefault("status", "completed")
    return data


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Items (stored shape) as chat messages: function calls join the assistant message before
    them, their outputs become tool messages."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        kind = item["type"]
        # Earlier turns' reasoning is not shown to the model again (as chat templates do).
        if kind == "reasoning":
            continue
        if kind == "message":
            messages.append({"role": item["role"], "content": _content(item["content"], i)})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _text(item["output"], i),
                }
            )
    return messages


def _content(content: str | list[dict], index: int) -> str | list[dict]:
    """A message's content for the chat API: its text, or its parts in order when it holds images
    (input_image as the chat API's image_url part)."""
    if isinstance(content, str) or all(part["type"] != "input_image" for part in content):
        return _text(content, index)
    return [
        {"type": "image_url", "image_url": {"url": part["image_url"]}}
        if part["type"] == "input_image"
        else {"type": "text", "text": part["text"]}
        for part in content
    ]


def image_urls(items: list[dict], own_from: int) -> list[tuple[str, str]]:
    """The input_image URLs of items (stored shape), each with the param naming it: input.N.content.M
    for this request's own items (from index own_from on), previous_response_id for earlier ones."""
    where = []
    for i, item in enumerate(items):
        if item["type"] != "message" or isinstance(item["content"], str):
            continue
        for j, part in enumerate(item["content"]):
            if part["type"] != "input_image":
                continue
            param = f"input.{i - own_from}.content.{j}" if i >= own_from else "previous_response_id"
            if part.get("file_id") is not None:
                raise not_supported("input_image by file_id (send image_url)", param=param)
            if not part.get("image_url"):
                raise bad_request("an input_image part needs image_url", param=param)
            where.append((part["image_url"], param + ".image_url"))
    return where


def _text(content: str | list[dict], index: int) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if part["type"] not in ("input_text", "output_text"):
            raise not_supported(f"content of type {part['type']!r}", param=f"input[{index}]")
    return "\n".join(part["text"] for part in content)


def chat_tools(req: ResponsesRequest) -> list[dict] | None:
    """Responses' flat function tools in the chat API's nested shape."""
    if req.tools is None:
        return None
    tools = []
    for tool in req.tools:
        function: dict = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        tools.append({"type": "function", "function": function})
    return tools


def chat_tool_choice(req: ResponsesRequest):
    choice = req.tool_choice
    if isinstance(choice, FunctionToolChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def response_format(req: ResponsesRequest) -> dict | None:
    """text.format as the chat API's response_format (text: none)."""
    fmt = req.text.format if req.text else None
    if isinstance(fmt, TextFormatJsonObject):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJsonSchema):
        return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
    return None


# ---- output ----


def usage(finish: Finish | None, reasoning_tokens: int = 0) -> dict | None:
    if finish is None:
        return None
    return {
        "input_tokens": finish.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finish.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": finish.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def final_status(finish: Finish) -> str:
    return {"length": "incomplete", "abort": "cancelled"}.get(finish.reason, "completed")


@dataclass
class ResponseHead:
    """What a response object echoes of its request, fixed when it is created."""

    id: str
    model: str
    req: ResponsesRequest
    temperature: float
    top_p: float
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(
        self,
        status: str,
        output: list[dict],
        finish: Finish | None = None,
        error: dict | None = None,
        reasoning_tokens: int = 0,
    ) -> dict:
        req = self.req
        choice = req.tool_choice or "auto"
        if isinstance(choice, FunctionToolChoice):
            choice = choice.model_dump()
        text_format = (
            req.text.format.model_dump(by_alias=True) if req.text and req.text.format else None
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": req.background,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump()
            if req.reasoning
            else {"effort": None, "summary": None},
            "store": req.store,
            "temperature": self.temperature,
            "text": {"format": text_format or {"type": "text"}},
            "tool_choice": choice,
            "tools": [
                {**tool.model_dump(), "strict": bool(tool.strict)} for tool in req.tools or []
            ],
            "top_p": self.top_p,
            "truncation": req.truncation,
            "usage": usage(finish, reasoning_tokens),
            "user": req.user,
        }


@dataclass(frozen=True)
class ReasoningText:
    """Reasoning split off the output, as it is fed to OutputBuilder beside content and calls."""

    text: str


class OutputBuilder:
    """Builds the output items from reasoning text and the tool parser's events (content text, or
    chat tool-call deltas) and, as it goes, the stream events that announce them, each with its
    sequence number."""

    def __init__(self, parallel_tool_calls: bool = True):
        self.parallel_tool_calls = parallel_tool_calls
        self.output: list[dict] = []
        self.sequence = 0
        self._open: dict | None = None  # the item still growing
        self._calls: dict[int, dict] = {}  # tool parser's call index -> its function_call item

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def feed(self, events: list) -> list[dict]:
        out: list[dict] = []
        for e in events:
            if isinstance(e, ReasoningText):
                if e.text:
                    out += self._reasoning(e.text)
            elif isinstance(e, str):
                if e:
                    out += self._text(e)
            else:
                out += self._tool_delta(e)
        return out

    def finish(self, status: str) -> list[dict]:
        """Close the item still open; with no message or call at all (reasoning aside), an empty
        message (as OpenAI answers)."""
        item_status = "incomplete" if status == "incomplete" else "completed"
        if all(item["type"] == "reasoning" for item in self.output):
            return self._close(item_status) + self._open_message() + self._close(item_status)
        return self._close(item_status)

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _reasoning(self, text: str) -> list[dict]:
        out = []
        if not (self._open and self._open["type"] == "reasoning"):
            reasoning = {"type": "reasoning", "summary": []}
            out = self._close() + self._open_item(
                "rs", reasoning, {"type": "reasoning_text", "text": ""}
            )
        item = self._open
        item["content"][0]["text"] += text
        return out + [
            self.event(
                "response.reasoning_text.delta",
                item_id=item["id"],
                output_index=self._index(item),
                content_index=0,
                delta=text,
            )
        ]

    def _open_message(self) -> list[dict]:
        return self._open_item(
            "msg",
            {"type": "message", "role": "assistant"},
            {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        )

    def _open_item(self, prefix: str, fields: dict, part: dict) -> list[dict]:
        """Open an item of one content part (a message, or reasoning)."""
        item = {"id": new_id(prefix), **fields, "status": "in_progress", "content": [part]}
        self.output.append(item)
        self._open = item
        index = len(self.output) - 1
        return [
            self.event("response.output_item.added", output_index=index, item=_snapshot(item, [])),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=dict(part),
            ),
        ]

    def _text(self, text: str) -> list[dict]:
        out = (
            []
            if self._open and self._open["type"] == "message"
            else self._close() + self._open_message()
        )
        item = self._open
        item["content"][0]["text"] += text
        return out + [
            self.event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self._index(item),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        ]

    def _tool_delta(self, delta: dict) -> list[dict]:
        index = delta.get("index", 0)
        if index > 0 and not self.parallel_tool_calls:
            return []
        function = delta.get("function") or {}
        out: list[dict] = []
        if "id" in delta:
            out += self._close()
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta["id"],
                "name": function.get("name", ""),
                "arguments": "",
            }
            self.output.append(item)
            self._open = item
            self._calls[index] = item
            out.append(
                self.event(
                    "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
                )
            )
        item = self._calls.get(index)
        arguments = function.get("arguments") or ""
        if item is not None and arguments:
            item["arguments"] += arguments
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._index(item),
                    delta=arguments,
                )
            )
        return out

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self._index(item)
        item["status"] = status
        out = []
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "message":
                done = self.event(
                    "response.output_text.done", **where, text=part["text"], logprobs=[]
                )
            else:
                done = self.event("response.reasoning_text.done", **where, text=part["text"])
            out += [
                done,
                self.event("response.content_part.done", **where, part=dict(part)),
            ]
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(
            self.event("response.output_item.done", output_index=index, item=_snapshot(item))
        )
        return out


def _snapshot(item: dict, content: list | None = None) -> dict:
    """A copy of an item as it stands (events must not change as the item grows)."""
    copy = dict(item)
    if "content" in item:
        copy["content"] = [dict(p) for p in item["content"]] if content is None else content
    return copy
