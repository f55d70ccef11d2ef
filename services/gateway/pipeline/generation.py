"""The data that flows through the gateway's pipeline, independent of REST or gRPC."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from radixserve.v1 import common_pb2, tokenizer_pb2
from radixserve.common.sampling import SamplingDefaults, SamplingParams, StoppingCriteria

Prompt = str | common_pb2.ChatConversation | list[int]


@dataclass
class GenerationInput:
    """One generation request as the API layers hand it to the engine."""

    prompt: Prompt
    sampling: SamplingParams
    stopping: StoppingCriteria  # max_new_tokens 0: use default_max_new_tokens
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    request_id: str = ""
    prompt_param: str = "prompt"  # the request field named in prompt-related errors
    default_max_new_tokens: int | None = None  # None: fill the context
    stop_regex: list[str] = field(
        default_factory=list
    )  # checked (pipeline/sampling.py stop_regexes)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    # A text prompt's encoded image files, filling its image placeholders in order (SGLang's
    # image_data); a chat's images travel in its conversation.
    images: list[bytes] = field(default_factory=list)
    lora_name: str = ""  # the LoRA adapter to generate with ("": the base model)


@dataclass
class PreparedRequest:
    """A validated request in token ids, ready for the scheduler."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingCriteria  # max_new_tokens set
    stop: list[str]
    skip_special_tokens: bool
    stop_regex: list[str] = field(default_factory=list)
    # The prompt's processed images (and M-RoPE positions) as the tokenizer returned them; None: none.
    multimodal: tokenizer_pb2.TokenizerChatResult | None = None
    lora_name: str = ""  # the LoRA adapter to generate with ("": the base model)


@dataclass
class Delta:
    """New output since the previous item."""

    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]
    # On the first delta, when sampling.prompt_logprob_start is set: prompt tokens' logprobs, from
    # prompt index max(prompt_logprob_start, 1) on.
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    # The generation's Finish comes next, at once: the same scheduler message ended it. A streamed
    # response puts finish_reason on this Delta's chunk instead of sending one more empty chunk.
    last: bool = False


@dataclass
class Finish:
    """The last item of a generation."""

    reason: str  # "stop" | "length" | "abort"
    matched: str | int | None  # the stop string or stop token id that ended it
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Completion:
    """A whole generation, collected from its stream."""

    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]
    finish: Finish
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class ServedModel:
    """What the backends say about the served model."""

    served_name: str
    model_path: str
    tokenizer_path: str
    architecture: str
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    has_chat_template: bool
    # The executor's KV pool: its dtype (the model's, or fp8_e5m2 / fp8_e4m3) and bytes per token.
    kv_cache_dtype: str = ""
    kv_bytes_per_token: int = 0
    # The sampling defaults for what requests leave out (--generation-config, --preferred-sampling-params,
    # --override-generation-config layered; see pipeline/sampling.py server_defaults).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


class Cancellation:
    """Ends the generations of one API request early (--request-timeout, /abort_request): those started
    are aborted in the scheduler (queued or running) and finish with "abort"; those started after it
    finish so at once, without reaching the scheduler."""

    def __init__(self):
        self.cancelled = False
        self._hooks: list[Callable[[], int]] = []

    def on_cancel(self, hook: Callable[[], int]) -> None:
        """hook() aborts some generations and returns how many were still open; runs at once if cancelled."""
        if self.cancelled:
            hook()
        else:
            self._hooks.append(hook)

    def cancel(self) -> int:
        """How many generations this aborted (0 when they had all ended, or it was cancelled before)."""
        self.cancelled = True
        hooks, self._hooks = self._hooks, []
        return sum(hook() for hook in hooks)
