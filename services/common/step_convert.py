"""The step types (step.py) to and from the executor.proto messages: the one mapping each way, used by
the scheduler, the executor, the fake executor and the benchmarks."""

from __future__ import annotations

from radixserve.v1 import executor_pb2
from radixserve.common.multimodal import prompt_image_to_proto, prompt_images_from_proto
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import (
    ContinuingRequest,
    NewRequest,
    PromptLogprobRange,
    PromptLogprobs,
    SampledToken,
    StepInput,
    StepOutput,
)


def step_to_proto(step: StepInput) -> executor_pb2.ExecutorStepRequest:
    msg = executor_pb2.ExecutorStepRequest(
        step_id=step.step_id, finished_request_ids=step.finished_request_ids
    )
    for r in step.new_requests:
        msg.new_requests.add(
            request_id=r.request_id,
            input_ids=r.input_ids,
            prefix_slots=r.prefix_slots,
            new_slots=r.new_slots,
            sampling=r.sampling.to_proto(),
            sample=r.sample,
            token_bitmask=r.token_bitmask,
            penalty_prompt_ids=r.penalty_prompt_ids,
            trace_context=r.trace_context,
            stopping=r.stopping.to_proto(),
            generated_tokens=r.generated_tokens,
            prompt_logprobs=_range_to_proto(r.prompt_logprobs),
            images=[prompt_image_to_proto(i) for i in r.images],
            mrope_positions=r.mrope_positions,
            mrope_position_delta=r.mrope_position_delta,
            lora_name=r.lora_name,
        )
    for r in step.continuing_requests:
        msg.continuing_requests.add(
            request_id=r.request_id,
            input_ids=r.input_ids,
            new_slots=r.new_slots,
            sample=r.sample,
            token_bitmask=r.token_bitmask,
            prompt_logprobs=_range_to_proto(r.prompt_logprobs),
            draft_ids=r.draft_ids,
            draft_parents=r.draft_parents,
        )
    return msg


def _range_to_proto(r: PromptLogprobRange | None) -> executor_pb2.ExecutorPromptLogprobRange | None:
    if r is None:
        return None
    return executor_pb2.ExecutorPromptLogprobRange(
        start=r.start,
        count=r.count,
        next_token_id=r.next_token_id,
        top_logprobs_num=r.top_logprobs_num,
    )


def _range_from_proto(msg) -> PromptLogprobRange | None:
    if not msg.HasField("prompt_logprobs"):
        return None
    r = msg.prompt_logprobs
    return PromptLogprobRange(r.start, r.count, r.next_token_id, r.top_logprobs_num)


def step_from_proto(msg: executor_pb2.ExecutorStepRequest) -> StepInput:
    return StepInput(
        step_id=msg.step_id,
        finished_request_ids=list(msg.finished_request_ids),
        new_requests=[
            NewRequest(
                r.request_id,
                list(r.input_ids),
                list(r.new_slots),
                list(r.prefix_slots),
                SamplingParams.from_proto(r.sampling),
                r.sample,
                r.token_bitmask,
                list(r.penalty_prompt_ids),
                StoppingCriteria.from_proto(r.stopping),
                r.generated_tokens,
                r.trace_context if r.HasField("trace_context") else None,
                _range_from_proto(r),
                images=prompt_images_from_proto(r.images),
                mrope_positions=list(r.mrope_positions),
                mrope_position_delta=r.mrope_position_delta,
                lora_name=r.lora_name,
            )
            for r in msg.new_requests
        ],
        continuing_requests=[
            ContinuingRequest(
                r.request_id,
                list(r.new_slots),
                list(r.input_ids),
                r.sample,
                r.token_bitmask,
                _range_from_proto(r),
                list(r.draft_ids),
                list(r.draft_parents),
            )
            for r in msg.continuing_requests
        ],
    )


def output_to_proto(out: StepOutput) -> executor_pb2.ExecutorStepResponse:
    resp = executor_pb2.ExecutorStepResponse(step_id=out.step_id, forward_ms=out.forward_ms)
    for o in out.outputs:
        item = resp.outputs.add(
            request_id=o.request_id,
            token_id=o.token_id,
            accepted_draft_ids=o.accepted_draft_ids,
            accepted_draft_logprobs=o.accepted_draft_logprobs,
            proposed_draft_ids=o.proposed_draft_ids,
            proposed_draft_parents=o.proposed_draft_parents,
        )
        logprob = o.token_logprob()
        if logprob is not None:
            item.logprob.CopyFrom(logprob)
    for p in out.prompt_logprobs:
        resp.prompt_logprobs.add(request_id=p.request_id, logprobs=p.logprobs)
    return resp


def output_from_proto(resp: executor_pb2.ExecutorStepResponse) -> StepOutput:
    return StepOutput(
        resp.step_id,
        [
            SampledToken(
                o.request_id,
                o.token_id,
                *_logprob(o),
                list(o.accepted_draft_ids),
                list(o.accepted_draft_logprobs),
                list(o.proposed_draft_ids),
                list(o.proposed_draft_parents),
            )
            for o in resp.outputs
        ],
        resp.forward_ms,
        prompt_logprobs=[
            PromptLogprobs(p.request_id, list(p.logprobs)) for p in resp.prompt_logprobs
        ],
    )


def _logprob(
    o: executor_pb2.ExecutorRequestOutput,
) -> tuple[float | None, list[tuple[int, float]], list[tuple[int, float]]]:
    if not o.HasField("logprob"):
        return None, [], []
    return o.logprob.logprob, _pairs(o.logprob.top), _pairs(o.logprob.token_ids_logprobs)


def _pairs(items) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in items]
