"""How to pick each next token (SamplingParams) and when to stop (StoppingCriteria), for every service:
defaults, allowed ranges, and the mapping to and from the radixserve.v1 messages.

Proto3 cannot tell "unset" from 0, so a 0 read from a message means the default where 0 is not a
meaningful value: top_p 0 is 1 and repetition_penalty 0 is 1 (from_proto applies that rule; nothing after
it sees a raw proto). top_k -1, as SGLang spells "disabled", is 0 wherever it comes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace

from radixserve.v1 import common_pb2, tokenizer_pb2

UINT64_MASK = (1 << 64) - 1
MAX_INT32 = (1 << 31) - 1
MAX_TOKEN_ID = MAX_INT32
MAX_TOP_LOGPROBS = 20
# Most prompt logprob values one request may ask for: its prompt positions x (1 + prompt top logprobs).
MAX_PROMPT_LOGPROB_VALUES = 1 << 18
MAX_TOKEN_IDS_LOGPROB = (
    256  # token ids whose logprobs one request may ask for at every output position
)
MAX_PENALTY = (
    2.0  # frequency and presence penalties lie in [-2, 2], the repetition penalty in (0, 2]
)
MAX_LOGIT_BIAS = 100.0
MAX_TEMPERATURE = 2.0

CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf", "json_object")


class SamplingError(ValueError):
    """A sampling or stopping option is out of range; param names the option."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """Structured output: the text must match this (see common.proto SamplingParams.constraint)."""

    kind: str  # one of CONSTRAINT_KINDS
    spec: str  # "" for json_object


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: disabled
    top_k: int = 0  # 0 (or -1, which becomes 0): disabled
    min_p: float = 0.0
    seed: int | None = None  # None: random
    return_logprob: bool = False
    top_logprobs_num: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: disabled
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Constraint | None = None
    prompt_logprob_start: int = -1  # -1: no prompt logprobs; else the first prompt index returned
    prompt_top_logprobs_num: int = 0
    token_ids_logprob: tuple[
        int, ...
    ] = ()  # with return_logprob: these ids' logprobs per output token

    def __post_init__(self):
        if self.top_k == -1:
            self.top_k = 0

    @property
    def repetition_active(self) -> bool:
        return self.repetition_penalty > 0 and self.repetition_penalty != 1.0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprob_start >= 0

    def first_prompt_logprob_token(self) -> int:
        """The first prompt index that gets a logprob (the first token has none); needs prompt logprobs."""
        return max(self.prompt_logprob_start, 1)

    def prompt_logprob_values(self, prompt_len: int) -> int:
        """How many logprob values its prompt logprobs over a prompt of prompt_len tokens return."""
        if not self.wants_prompt_logprobs:
            return 0
        positions = max(0, prompt_len - self.first_prompt_logprob_token())
        return positions * (1 + self.prompt_top_logprobs_num)

    def check_prompt_logprobs(self, prompt_len: int) -> SamplingParams:
        """self, or SamplingError when its prompt logprobs start past a prompt of prompt_len tokens or
        ask for more than MAX_PROMPT_LOGPROB_VALUES values."""
        if not self.wants_prompt_logprobs:
            return self
        _require(
            self.prompt_logprob_start < prompt_len,
            "logprob_start_len",
            f"logprob_start_len ({self.prompt_logprob_start}) must be less than the prompt's "
            f"{prompt_len} tokens",
        )
        positions = max(0, prompt_len - self.first_prompt_logprob_token())
        values = self.prompt_logprob_values(prompt_len)
        _require(
            values <= MAX_PROMPT_LOGPROB_VALUES,
            "prompt_logprobs",
            f"prompt logprobs would return {positions} prompt positions x "
            f"{1 + self.prompt_top_logprobs_num} values = {values}, more than the limit of "
            f"{MAX_PROMPT_LOGPROB_VALUES}; ask for fewer positions or top alternatives",
        )
        return self

    def check(self) -> SamplingParams:
        """self, or SamplingError for the first option out of range."""
        _require(
            0.0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"temperature must be between 0 and 2, got {self.temperature}",
        )
        _require(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _require(
            self.top_k >= 0, "top_k", f"top_k must be -1 (disabled) or at least 1, got {self.top_k}"
        )
        _require(
            self.top_k <= MAX_INT32, "top_k", f"top_k must be at most {MAX_INT32}, got {self.top_k}"
        )
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _require(
            0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
        )
        _require(
            -1 <= self.prompt_logprob_start <= MAX_INT32,
            "logprob_start_len",
            f"logprob_start_len must be -1 (none) or a prompt index, got {self.prompt_logprob_start}",
        )
        _require(
            0 <= self.prompt_top_logprobs_num <= MAX_TOP_LOGPROBS,
            "prompt_logprobs",
            f"prompt top logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
        )
        _require(
            len(self.token_ids_logprob) <= MAX_TOKEN_IDS_LOGPROB,
            "token_ids_logprob",
            f"token_ids_logprob may name at most {MAX_TOKEN_IDS_LOGPROB} token ids, got "
            f"{len(self.token_ids_logprob)}",
        )
        bad_id = next((t for t in self.token_ids_logprob if not 0 <= t <= MAX_TOKEN_ID), None)
        _require(
            bad_id is None,
            "token_ids_logprob",
            f"token_ids_logprob must be token ids (non-negative integers), got {bad_id}",
        )
        for value, name in (
            (self.frequency_penalty, "frequency_penalty"),
            (self.presence_penalty, "presence_penalty"),
        ):
            _require(
                -MAX_PENALTY <= value <= MAX_PENALTY,
                name,
                f"{name} must be between -2 and 2, got {value}",
            )
        _require(
            0.0 < self.repetition_penalty <= MAX_PENALTY,
            "repetition_penalty",
            f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
        )
        for token, value in self.logit_bias.items():
            _require(
                0 <= token <= MAX_TOKEN_ID,
                "logit_bias",
                f"logit_bias keys must be token ids (non-negative integers), got {token!r}",
            )
            _require(
                -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"logit_bias values must be between -100 and 100, got {value} for token {token}",
            )
        return self

    @classmethod
    def from_proto(cls, msg: common_pb2.SamplingParams) -> SamplingParams:
        kind = msg.WhichOneof("constraint")
        constraint = (
            None
            if kind is None
            else Constraint(kind, "" if kind == "json_object" else getattr(msg, kind))
        )
        return cls(
            temperature=msg.temperature,
            top_p=msg.top_p or 1.0,
            top_k=msg.top_k,
            min_p=msg.min_p,
            seed=msg.seed if msg.HasField("seed") else None,
            return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num,
            frequency_penalty=msg.frequency_penalty,
            presence_penalty=msg.presence_penalty,
            repetition_penalty=msg.repetition_penalty or 1.0,
            logit_bias=dict(msg.logit_bias),
            constraint=constraint,
            prompt_logprob_start=(
                msg.prompt_logprob_start if msg.HasField("prompt_logprob_start") else -1
            ),
            prompt_top_logprobs_num=msg.prompt_top_logprobs_num,
            token_ids_logprob=tuple(msg.token_ids_logprob),
        )

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            return_logprob=self.return_logprob,
            top_logprobs_num=self.top_logprobs_num,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias,
            prompt_logprob_start=self.prompt_logprob_start if self.wants_prompt_logprobs else None,
            prompt_top_logprobs_num=self.prompt_top_logprobs_num,
            token_ids_logprob=self.token_ids_logprob,
        )
        if self.constraint is not None:
            kind = self.constraint.kind
            setattr(msg, kind, True if kind == "json_object" else self.constraint.spec)
        return msg


@dataclass
class StoppingCriteria:
    max_new_tokens: int = 0  # 0 only before the gateway fills it in: as many as the context leaves
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids (unless ignore_eos)
    ignore_eos: bool = False
    min_new_tokens: int = (
        0  # EOS and stop_token_ids do not end the request before this many output tokens
    )

    def check(
        self, max_tokens_param: str = "max_new_tokens", min_tokens_param: str = "min_new_tokens"
    ) -> StoppingCriteria:
        """self, or SamplingError for the first option out of range (max_new_tokens 0: not given yet)."""
        _require(
            0 <= self.max_new_tokens <= MAX_INT32,
            max_tokens_param,
            f"{max_tokens_param} must be between 1 and {MAX_INT32}, got {self.max_new_tokens}",
        )
        bad_stop = next((t for t in self.stop_token_ids if not 0 <= t <= MAX_TOKEN_ID), None)
        _require(
            bad_stop is None,
            "stop_token_ids",
            f"stop_token_ids must be token ids (non-negative integers), got {bad_stop}",
        )
        _require(
            0 <= self.min_new_tokens <= MAX_INT32,
            min_tokens_param,
            f"{min_tokens_param} must be between 0 and {MAX_INT32}, got {self.min_new_tokens}",
        )
        _require(
            not self.max_new_tokens or self.min_new_tokens <= self.max_new_tokens,
            min_tokens_param,
            f"{min_tokens_param} ({self.min_new_tokens}) must not exceed the maximum number of tokens "
            f"({self.max_new_tokens})",
        )
        return self

    @classmethod
    def from_proto(cls, msg: common_pb2.StoppingCriteria) -> StoppingCriteria:
        return cls(
            max_new_tokens=msg.max_new_tokens,
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            min_new_tokens=msg.min_new_tokens,
        )

    def to_proto(self) -> common_pb2.StoppingCriteria:
        return common_pb2.StoppingCriteria(
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_new_tokens=self.min_new_tokens,
        )


# The keys of generation_config.json that vLLM reads as sampling defaults (--generation-config auto).
GENERATION_CONFIG_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)


@dataclass(frozen=True)
class SamplingDefaults:
    """Server-side defaults for the sampling options a request leaves out; None: the API's own default.

    Made from the model's generation_config.json (--generation-config), SGLang's
    --preferred-sampling-params and vLLM's --override-generation-config, in that order, a later one
    winning per field (layered); a request's own values win over all of them."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_new_tokens: int | None = None

    def layered(self, over: SamplingDefaults) -> SamplingDefaults:
        """self with every field that `over` sets taken from it."""
        return replace(self, **{k: v for k, v in over.as_dict().items()})

    def as_dict(self) -> dict:
        """The fields that are set."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def check(self, source: str) -> SamplingDefaults:
        """self, or SamplingError (naming source) when a value is out of the range a request may give."""
        try:
            SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                repetition_penalty=(
                    1.0 if self.repetition_penalty is None else self.repetition_penalty
                ),
                frequency_penalty=self.frequency_penalty or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
            ).check()
            StoppingCriteria(max_new_tokens=self.max_new_tokens or 0).check()
        except SamplingError as e:
            raise SamplingError(e.param, f"{source}: {e}") from None
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise SamplingError("max_new_tokens", f"{source}: max_new_tokens must be at least 1")
        return self

    @classmethod
    def from_mapping(cls, values: dict, source: str, keys=None) -> SamplingDefaults:
        """Defaults from a JSON object; keys: the names it may hold (default: every field). An unknown
        key or a value of the wrong type is a SamplingError naming source."""
        allowed = keys or tuple(f.name for f in fields(cls))
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise SamplingError(
                unknown[0], f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})"
            )
        kinds = {f.name: f.type for f in fields(cls)}
        out = {}
        for key, value in values.items():
            integral = "int" in str(kinds[key])
            ok = isinstance(value, int) if integral else isinstance(value, (int, float))
            if value is not None and (isinstance(value, bool) or not ok):
                kind = "an integer" if integral else "a number"
                raise SamplingError(key, f"{source}: {key} must be {kind}, got {value!r}")
            out[key] = value if value is None or integral else float(value)
        return cls(**out).check(source)

    @classmethod
    def from_json(cls, text: str | None, source: str) -> SamplingDefaults:
        """Defaults from a flag's JSON object ("" or None: none)."""
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise SamplingError(source, f"{source}: not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise SamplingError(source, f"{source}: must be a JSON object")
        return cls.from_mapping(values, source)

    @classmethod
    def from_generation_config(cls, config: dict, source: str) -> SamplingDefaults:
        """The sampling keys of a generation_config.json (the others, eos_token_id etc., are not sampling
        defaults); a value of the wrong type or out of range is a SamplingError."""
        picked = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
        return cls.from_mapping(picked, source, GENERATION_CONFIG_KEYS)

    @classmethod
    def from_proto(cls, msg: tokenizer_pb2.TokenizerGenerationDefaults) -> SamplingDefaults:
        return cls(**{k: getattr(msg, k) for k in GENERATION_CONFIG_KEYS if msg.HasField(k)})

    def to_proto(self) -> tokenizer_pb2.TokenizerGenerationDefaults:
        return tokenizer_pb2.TokenizerGenerationDefaults(
            **{k: v for k, v in self.as_dict().items() if k in GENERATION_CONFIG_KEYS}
        )


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingError(param, message)
