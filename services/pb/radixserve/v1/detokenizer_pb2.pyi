from radixserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetokenizerState(_message.Message):
    __slots__ = ("window_ids", "prefix_offset", "read_offset", "held_text", "emitted_chars")
    WINDOW_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_OFFSET_FIELD_NUMBER: _ClassVar[int]
    READ_OFFSET_FIELD_NUMBER: _ClassVar[int]
    HELD_TEXT_FIELD_NUMBER: _ClassVar[int]
    EMITTED_CHARS_FIELD_NUMBER: _ClassVar[int]
    window_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_offset: int
    read_offset: int
    held_text: str
    emitted_chars: int
    def __init__(self, window_ids: _Optional[_Iterable[int]] = ..., prefix_offset: _Optional[int] = ..., read_offset: _Optional[int] = ..., held_text: _Optional[str] = ..., emitted_chars: _Optional[int] = ...) -> None: ...

class DetokenizerDecodeItem(_message.Message):
    __slots__ = ("request_id", "state", "new_token_ids", "stop", "skip_special_tokens", "final", "trace_context", "stop_regex")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_REGEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: DetokenizerState
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    skip_special_tokens: bool
    final: bool
    trace_context: _common_pb2.TraceContext
    stop_regex: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[DetokenizerState, _Mapping]] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., skip_special_tokens: _Optional[bool] = ..., final: _Optional[bool] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., stop_regex: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokenizerDecodeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DetokenizerDecodeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DetokenizerDecodeItem, _Mapping]]] = ...) -> None: ...

class DetokenizerDecodeResult(_message.Message):
    __slots__ = ("request_id", "text", "state", "stopped", "matched_stop", "stop_token_count")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    state: DetokenizerState
    stopped: bool
    matched_stop: str
    stop_token_count: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., state: _Optional[_Union[DetokenizerState, _Mapping]] = ..., stopped: _Optional[bool] = ..., matched_stop: _Optional[str] = ..., stop_token_count: _Optional[int] = ...) -> None: ...

class DetokenizerDecodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DetokenizerDecodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DetokenizerDecodeResult, _Mapping]]] = ...) -> None: ...
