"""Between the core's requests and events and the radixserve.v1 scheduler messages (its steps: see
common/step_convert.py)."""

from __future__ import annotations

from radixserve.v1 import common_pb2, scheduler_pb2

from radixserve.common.multimodal import prompt_images_from_proto
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.scheduler.request import Request, RequestEvent


def request_from_proto(request_id: str, msg: scheduler_pb2.SchedulerGenerateRequest) -> Request:
    return Request(
        request_id=request_id,
        prompt_ids=list(msg.input_ids),
        stopping=StoppingCriteria.from_proto(msg.stopping),
        sampling=SamplingParams.from_proto(msg.sampling),
        trace_context=msg.trace_context if msg.HasField("trace_context") else None,
        images=prompt_images_from_proto(msg.images),
        mrope_positions=list(msg.mrope_positions),
        mrope_position_delta=msg.mrope_position_delta,
        lora_name=msg.lora_name,
    )


def event_fields(event: RequestEvent) -> dict:
    """The fields of a SchedulerGenerateResponse for event (to construct one or add it to a list)."""
    return dict(
        request_id=event.request_id,
        token_ids=event.token_ids,
        logprobs=event.logprobs,
        prompt_logprobs=event.prompt_logprobs,
        finish_reason=int(event.finish_reason or 0),
        matched_stop_token_id=event.matched_stop_token_id,
        usage=common_pb2.Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_tokens=event.cached_tokens,
        ),
    )


def event_to_proto(event: RequestEvent) -> scheduler_pb2.SchedulerGenerateResponse:
    return scheduler_pb2.SchedulerGenerateResponse(**event_fields(event))
