"""Between the core's plain dataclasses and the radixserve.v1 protobuf messages."""
from __future__ import annotations

from radixserve.v1 import common_pb2, executor_pb2, scheduler_pb2

from radixserve.scheduler.request import Request, RequestEvent, SampledToken, StepPlan


def request_from_proto(request_id: str, msg: scheduler_pb2.SchedulerGenerateRequest) -> Request:
    sampling = msg.sampling
    return Request(
        request_id=request_id,
        prompt_ids=list(msg.input_ids),
        max_new_tokens=sampling.max_new_tokens,
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_new_tokens=sampling.min_new_tokens,
        sampling=sampling,
        trace_context=msg.trace_context if msg.HasField("trace_context") else None,
    )


def plan_to_proto(plan: StepPlan) -> executor_pb2.ExecutorStepRequest:
    msg = executor_pb2.ExecutorStepRequest(step_id=plan.step_id,
                                           finished_request_ids=plan.finished_request_ids)
    for new in plan.new_requests:
        sampling = new.sampling or common_pb2.SamplingParams()
        msg.new_requests.add(request_id=new.request_id, input_ids=new.input_ids,
                             prefix_slots=new.prefix_slots, new_slots=new.new_slots,
                             sampling=_sampling_after_retraction(sampling, new.num_output_ids), sample=new.sample,
                             token_bitmask=new.token_bitmask,
                             penalty_prompt_ids=new.seq_ids if _repetition_penalty_on(sampling) else (),
                             trace_context=new.trace_context)
    for cont in plan.continuing_requests:
        msg.continuing_requests.add(request_id=cont.request_id, input_ids=cont.input_ids,
                                    new_slots=cont.new_slots, sample=cont.sample, token_bitmask=cont.token_bitmask)
    return msg


def _repetition_penalty_on(sampling: common_pb2.SamplingParams) -> bool:
    return sampling.repetition_penalty not in (0.0, 1.0)


def _sampling_after_retraction(sampling: common_pb2.SamplingParams, num_output_ids: int) -> common_pb2.SamplingParams:
    """The executor counts min_new_tokens from when it gets the request: discount tokens generated before."""
    if not num_output_ids or not sampling.min_new_tokens:
        return sampling
    adjusted = common_pb2.SamplingParams()
    adjusted.CopyFrom(sampling)
    adjusted.min_new_tokens = max(0, sampling.min_new_tokens - num_output_ids)
    return adjusted


def outputs_from_proto(resp: executor_pb2.ExecutorStepResponse) -> list[SampledToken]:
    return [SampledToken(o.request_id, o.token_id, o.logprob if o.HasField("logprob") else None)
            for o in resp.outputs]


def event_fields(event: RequestEvent) -> dict:
    """The fields of a SchedulerGenerateResponse for event (to construct one or add it to a list)."""
    return dict(
        request_id=event.request_id,
        token_ids=event.token_ids,
        logprobs=event.logprobs,
        finish_reason=int(event.finish_reason or 0),
        matched_stop_token_id=event.matched_stop_token_id,
        usage=common_pb2.Usage(prompt_tokens=event.prompt_tokens,
                               completion_tokens=event.completion_tokens,
                               cached_tokens=event.cached_tokens),
    )


def event_to_proto(event: RequestEvent) -> scheduler_pb2.SchedulerGenerateResponse:
    return scheduler_pb2.SchedulerGenerateResponse(**event_fields(event))
