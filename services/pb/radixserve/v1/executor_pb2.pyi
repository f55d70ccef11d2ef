from radixserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecutorNewRequest(_message.Message):
    __slots__ = ("request_id", "input_ids", "prefix_slots", "new_slots", "sampling", "sample", "token_bitmask", "penalty_prompt_ids", "trace_context", "stopping", "generated_tokens", "prompt_logprobs", "images", "mrope_positions", "mrope_position_delta", "lora_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NEW_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BITMASK_FIELD_NUMBER: _ClassVar[int]
    PENALTY_PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITION_DELTA_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_slots: _containers.RepeatedScalarFieldContainer[int]
    new_slots: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    sample: bool
    token_bitmask: bytes
    penalty_prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    trace_context: _common_pb2.TraceContext
    stopping: _common_pb2.StoppingCriteria
    generated_tokens: int
    prompt_logprobs: ExecutorPromptLogprobRange
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.PromptImage]
    mrope_positions: _containers.RepeatedScalarFieldContainer[int]
    mrope_position_delta: int
    lora_name: str
    def __init__(self, request_id: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., prefix_slots: _Optional[_Iterable[int]] = ..., new_slots: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., sample: _Optional[bool] = ..., token_bitmask: _Optional[bytes] = ..., penalty_prompt_ids: _Optional[_Iterable[int]] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., stopping: _Optional[_Union[_common_pb2.StoppingCriteria, _Mapping]] = ..., generated_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[_Union[ExecutorPromptLogprobRange, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.PromptImage, _Mapping]]] = ..., mrope_positions: _Optional[_Iterable[int]] = ..., mrope_position_delta: _Optional[int] = ..., lora_name: _Optional[str] = ...) -> None: ...

class ExecutorPromptLogprobRange(_message.Message):
    __slots__ = ("start", "count", "next_token_id", "top_logprobs_num")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_NUM_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    next_token_id: int
    top_logprobs_num: int
    def __init__(self, start: _Optional[int] = ..., count: _Optional[int] = ..., next_token_id: _Optional[int] = ..., top_logprobs_num: _Optional[int] = ...) -> None: ...

class ExecutorContinuingRequest(_message.Message):
    __slots__ = ("request_id", "input_ids", "new_slots", "sample", "token_bitmask", "prompt_logprobs", "draft_ids", "draft_parents")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BITMASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    new_slots: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    token_bitmask: bytes
    prompt_logprobs: ExecutorPromptLogprobRange
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., new_slots: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., token_bitmask: _Optional[bytes] = ..., prompt_logprobs: _Optional[_Union[ExecutorPromptLogprobRange, _Mapping]] = ..., draft_ids: _Optional[_Iterable[int]] = ..., draft_parents: _Optional[_Iterable[int]] = ...) -> None: ...

class ExecutorStepRequest(_message.Message):
    __slots__ = ("step_id", "finished_request_ids", "new_requests", "continuing_requests", "session_id")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CONTINUING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    new_requests: _containers.RepeatedCompositeFieldContainer[ExecutorNewRequest]
    continuing_requests: _containers.RepeatedCompositeFieldContainer[ExecutorContinuingRequest]
    session_id: str
    def __init__(self, step_id: _Optional[int] = ..., finished_request_ids: _Optional[_Iterable[str]] = ..., new_requests: _Optional[_Iterable[_Union[ExecutorNewRequest, _Mapping]]] = ..., continuing_requests: _Optional[_Iterable[_Union[ExecutorContinuingRequest, _Mapping]]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ExecutorRequestOutput(_message.Message):
    __slots__ = ("request_id", "token_id", "logprob", "accepted_draft_ids", "accepted_draft_logprobs", "proposed_draft_ids", "proposed_draft_parents")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    logprob: _common_pb2.TokenLogprob
    accepted_draft_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted_draft_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    proposed_draft_ids: _containers.RepeatedScalarFieldContainer[int]
    proposed_draft_parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., accepted_draft_ids: _Optional[_Iterable[int]] = ..., accepted_draft_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., proposed_draft_ids: _Optional[_Iterable[int]] = ..., proposed_draft_parents: _Optional[_Iterable[int]] = ...) -> None: ...

class ExecutorStepResponse(_message.Message):
    __slots__ = ("step_id", "outputs", "forward_ms", "prompt_logprobs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[ExecutorRequestOutput]
    forward_ms: float
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[ExecutorPromptLogprobs]
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[ExecutorRequestOutput, _Mapping]]] = ..., forward_ms: _Optional[float] = ..., prompt_logprobs: _Optional[_Iterable[_Union[ExecutorPromptLogprobs, _Mapping]]] = ...) -> None: ...

class ExecutorPromptLogprobs(_message.Message):
    __slots__ = ("request_id", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class ExecutorModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecutorModelInfo(_message.Message):
    __slots__ = ("architecture", "model_path", "context_length", "kv_slots", "vocab_size", "eos_token_ids", "dtype", "device", "num_parameters", "kv_cache_dtype", "kv_bytes_per_token", "max_loras_per_batch", "lora_adapters", "max_graph_tokens", "max_tree_draft_tokens")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAPH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    model_path: str
    context_length: int
    kv_slots: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    num_parameters: int
    kv_cache_dtype: str
    kv_bytes_per_token: int
    max_loras_per_batch: int
    lora_adapters: _containers.RepeatedCompositeFieldContainer[ExecutorLoraAdapter]
    max_graph_tokens: int
    max_tree_draft_tokens: int
    def __init__(self, architecture: _Optional[str] = ..., model_path: _Optional[str] = ..., context_length: _Optional[int] = ..., kv_slots: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_parameters: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ..., max_loras_per_batch: _Optional[int] = ..., lora_adapters: _Optional[_Iterable[_Union[ExecutorLoraAdapter, _Mapping]]] = ..., max_graph_tokens: _Optional[int] = ..., max_tree_draft_tokens: _Optional[int] = ...) -> None: ...

class ExecutorLoraAdapter(_message.Message):
    __slots__ = ("name", "path", "rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    rank: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class ExecutorLoadLoraAdapterRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ExecutorLoadLoraAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: ExecutorLoraAdapter
    def __init__(self, adapter: _Optional[_Union[ExecutorLoraAdapter, _Mapping]] = ...) -> None: ...

class ExecutorUnloadLoraAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExecutorUnloadLoraAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecutorResetRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExecutorOpenSessionRequest(_message.Message):
    __slots__ = ("replaces_session_id",)
    REPLACES_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    replaces_session_id: str
    def __init__(self, replaces_session_id: _Optional[str] = ...) -> None: ...

class ExecutorSessionEvent(_message.Message):
    __slots__ = ("session_id", "dropped")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    dropped: int
    def __init__(self, session_id: _Optional[str] = ..., dropped: _Optional[int] = ...) -> None: ...

class ExecutorResetResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class ExecutorEmbedRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenIds]
    def __init__(self, sequences: _Optional[_Iterable[_Union[_common_pb2.TokenIds, _Mapping]]] = ...) -> None: ...

class ExecutorEmbedResponse(_message.Message):
    __slots__ = ("dimension", "embeddings", "normalized", "forward_ms")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    embeddings: _containers.RepeatedScalarFieldContainer[float]
    normalized: bool
    forward_ms: float
    def __init__(self, dimension: _Optional[int] = ..., embeddings: _Optional[_Iterable[float]] = ..., normalized: _Optional[bool] = ..., forward_ms: _Optional[float] = ...) -> None: ...
