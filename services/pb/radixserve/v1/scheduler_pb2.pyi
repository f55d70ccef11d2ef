from radixserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailedStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILED_STAGE_UNSPECIFIED: _ClassVar[FailedStage]
    FAILED_STAGE_SCHEDULER: _ClassVar[FailedStage]
    FAILED_STAGE_EXECUTOR: _ClassVar[FailedStage]
FAILED_STAGE_UNSPECIFIED: FailedStage
FAILED_STAGE_SCHEDULER: FailedStage
FAILED_STAGE_EXECUTOR: FailedStage

class SchedulerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "input_ids", "sampling", "trace_context", "stopping", "images", "mrope_positions", "mrope_position_delta", "lora_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITION_DELTA_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    trace_context: _common_pb2.TraceContext
    stopping: _common_pb2.StoppingCriteria
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.PromptImage]
    mrope_positions: _containers.RepeatedScalarFieldContainer[int]
    mrope_position_delta: int
    lora_name: str
    def __init__(self, request_id: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., stopping: _Optional[_Union[_common_pb2.StoppingCriteria, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.PromptImage, _Mapping]]] = ..., mrope_positions: _Optional[_Iterable[int]] = ..., mrope_position_delta: _Optional[int] = ..., lora_name: _Optional[str] = ...) -> None: ...

class SchedulerGenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "logprobs", "finish_reason", "matched_stop_token_id", "usage", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish_reason: _common_pb2.FinishReason
    matched_stop_token_id: int
    usage: _common_pb2.Usage
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., matched_stop_token_id: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class SchedulerSessionRequest(_message.Message):
    __slots__ = ("generate", "abort", "generate_group")
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_GROUP_FIELD_NUMBER: _ClassVar[int]
    generate: SchedulerGenerateRequest
    abort: SchedulerAbortRequest
    generate_group: SchedulerGenerateGroup
    def __init__(self, generate: _Optional[_Union[SchedulerGenerateRequest, _Mapping]] = ..., abort: _Optional[_Union[SchedulerAbortRequest, _Mapping]] = ..., generate_group: _Optional[_Union[SchedulerGenerateGroup, _Mapping]] = ...) -> None: ...

class SchedulerGenerateGroup(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SchedulerGenerateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SchedulerGenerateRequest, _Mapping]]] = ...) -> None: ...

class SchedulerRequestError(_message.Message):
    __slots__ = ("request_id", "code", "message", "failed_stage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILED_STAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    failed_stage: FailedStage
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., failed_stage: _Optional[_Union[FailedStage, str]] = ...) -> None: ...

class SchedulerSessionEvents(_message.Message):
    __slots__ = ("events", "errors")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[SchedulerGenerateResponse]
    errors: _containers.RepeatedCompositeFieldContainer[SchedulerRequestError]
    def __init__(self, events: _Optional[_Iterable[_Union[SchedulerGenerateResponse, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[SchedulerRequestError, _Mapping]]] = ...) -> None: ...

class SchedulerAbortRequest(_message.Message):
    __slots__ = ("request_ids", "abort_all")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    ABORT_ALL_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    abort_all: bool
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., abort_all: _Optional[bool] = ...) -> None: ...

class SchedulerAbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class SchedulerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerInfo(_message.Message):
    __slots__ = ("architecture", "model_path", "context_length", "max_total_tokens", "free_tokens", "cached_tokens", "in_use_tokens", "running_requests", "waiting_requests", "eos_token_ids", "dtype", "total_cached_prompt_tokens", "total_prompt_tokens", "config_json", "vocab_size", "executor_unavailable", "replicas", "kv_cache_dtype", "kv_bytes_per_token", "lora_adapters", "max_loras_per_batch", "spec_verify_steps", "spec_draft_tokens", "spec_accepted_tokens")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_USE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    SPEC_VERIFY_STEPS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    model_path: str
    context_length: int
    max_total_tokens: int
    free_tokens: int
    cached_tokens: int
    in_use_tokens: int
    running_requests: int
    waiting_requests: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    total_cached_prompt_tokens: int
    total_prompt_tokens: int
    config_json: str
    vocab_size: int
    executor_unavailable: bool
    replicas: _containers.RepeatedCompositeFieldContainer[SchedulerReplicaInfo]
    kv_cache_dtype: str
    kv_bytes_per_token: int
    lora_adapters: _containers.RepeatedCompositeFieldContainer[SchedulerLoraAdapter]
    max_loras_per_batch: int
    spec_verify_steps: int
    spec_draft_tokens: int
    spec_accepted_tokens: int
    def __init__(self, architecture: _Optional[str] = ..., model_path: _Optional[str] = ..., context_length: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., free_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., in_use_tokens: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., total_cached_prompt_tokens: _Optional[int] = ..., total_prompt_tokens: _Optional[int] = ..., config_json: _Optional[str] = ..., vocab_size: _Optional[int] = ..., executor_unavailable: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[SchedulerReplicaInfo, _Mapping]]] = ..., kv_cache_dtype: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ..., lora_adapters: _Optional[_Iterable[_Union[SchedulerLoraAdapter, _Mapping]]] = ..., max_loras_per_batch: _Optional[int] = ..., spec_verify_steps: _Optional[int] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ...) -> None: ...

class SchedulerLoraAdapter(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class SchedulerLoadLoraAdapterRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class SchedulerLoadLoraAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: SchedulerLoraAdapter
    def __init__(self, adapter: _Optional[_Union[SchedulerLoraAdapter, _Mapping]] = ...) -> None: ...

class SchedulerUnloadLoraAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SchedulerUnloadLoraAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerReplicaInfo(_message.Message):
    __slots__ = ("index", "addr", "reachable", "error", "info", "routed_requests", "inflight_requests")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ROUTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    addr: str
    reachable: bool
    error: str
    info: SchedulerInfo
    routed_requests: int
    inflight_requests: int
    def __init__(self, index: _Optional[int] = ..., addr: _Optional[str] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ..., info: _Optional[_Union[SchedulerInfo, _Mapping]] = ..., routed_requests: _Optional[int] = ..., inflight_requests: _Optional[int] = ...) -> None: ...

class SchedulerFlushCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerFlushCacheResponse(_message.Message):
    __slots__ = ("freed_tokens",)
    FREED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    freed_tokens: int
    def __init__(self, freed_tokens: _Optional[int] = ...) -> None: ...

class SchedulerEmbedRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenIds]
    def __init__(self, sequences: _Optional[_Iterable[_Union[_common_pb2.TokenIds, _Mapping]]] = ...) -> None: ...

class SchedulerEmbedResponse(_message.Message):
    __slots__ = ("dimension", "embeddings", "normalized", "prompt_tokens")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    embeddings: _containers.RepeatedScalarFieldContainer[float]
    normalized: bool
    prompt_tokens: int
    def __init__(self, dimension: _Optional[int] = ..., embeddings: _Optional[_Iterable[float]] = ..., normalized: _Optional[bool] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class SchedulerMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerMetrics(_message.Message):
    __slots__ = ("prometheus_text",)
    PROMETHEUS_TEXT_FIELD_NUMBER: _ClassVar[int]
    prometheus_text: str
    def __init__(self, prometheus_text: _Optional[str] = ...) -> None: ...
