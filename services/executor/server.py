"""The executor's gRPC service: a thin layer over ModelRunner. Steps run one at a time in a worker
thread so the event loop stays responsive."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import grpc

from radixserve.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from services.common.args import ServerArgs
from services.common.grpc_util import aio_server, bind
from services.common.lifecycle import run_service, run_until_signalled
from services.common.log import setup_logging
from services.common.step_order import StepOrder
from services.executor.embedding_runner import EmbedInputError, EmbeddingRunner, build_embedding_runner
from services.executor.runner import ModelRunner, build_model_runner
from services.executor.step_io import (ContinuingRequest, NewRequest, SamplingParams, StepError, StepInput,
                                       StepOutput)

log = logging.getLogger("radixserve.executor")

# How long a step waits for the steps before it to arrive before running anyway.


def sampling_from_pb(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                          seed=p.seed if p.HasField("seed") else None, return_logprob=p.return_logprob,
                          top_logprobs_num=p.top_logprobs_num, frequency_penalty=p.frequency_penalty,
                          presence_penalty=p.presence_penalty, repetition_penalty=p.repetition_penalty or 1.0,
                          min_new_tokens=p.min_new_tokens, logit_bias=dict(p.logit_bias),
                          stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                                     seed=p.seed, return_logprob=p.return_logprob,
                                     top_logprobs_num=p.top_logprobs_num, frequency_penalty=p.frequency_penalty,
                                     presence_penalty=p.presence_penalty, repetition_penalty=p.repetition_penalty,
                                     min_new_tokens=p.min_new_tokens, logit_bias=p.logit_bias,
                                     stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos)


def step_input_to_pb(step: StepInput) -> executor_pb2.ExecutorStepRequest:
    """The inverse of step_from_pb (for clients that drive an executor directly, e.g. benchmarks)."""
    msg = executor_pb2.ExecutorStepRequest(step_id=step.step_id, finished_request_ids=step.finished_request_ids)
    for r in step.new_requests:
        msg.new_requests.add(request_id=r.request_id, input_ids=r.input_ids, prefix_slots=r.prefix_slots,
                             new_slots=r.new_slots, sampling=sampling_to_pb(r.sampling), sample=r.sample,
                             token_bitmask=r.token_bitmask, penalty_prompt_ids=r.penalty_prompt_ids)
    for r in step.continuing_requests:
        msg.continuing_requests.add(request_id=r.request_id, input_ids=r.input_ids, new_slots=r.new_slots,
                                    sample=r.sample, token_bitmask=r.token_bitmask)
    return msg


def step_from_pb(req: executor_pb2.ExecutorStepRequest) -> StepInput:
    return StepInput(
        step_id=req.step_id,
        finished_request_ids=list(req.finished_request_ids),
        new_requests=[NewRequest(r.request_id, list(r.input_ids), list(r.new_slots), list(r.prefix_slots),
                                 sampling_from_pb(r.sampling), r.sample, r.token_bitmask,
                                 list(r.penalty_prompt_ids)) for r in req.new_requests],
        continuing_requests=[ContinuingRequest(r.request_id, list(r.new_slots), list(r.input_ids), r.sample,
                                               r.token_bitmask) for r in req.continuing_requests],
    )


def step_to_pb(out: StepOutput) -> executor_pb2.ExecutorStepResponse:
    resp = executor_pb2.ExecutorStepResponse(step_id=out.step_id, forward_ms=out.forward_ms)
    for o in out.outputs:
        item = resp.outputs.add(request_id=o.request_id, token_id=o.token_id)
        if o.logprob is not None:
            item.logprob.token_id = o.token_id
            item.logprob.logprob = o.logprob
            for tid, lp in o.top_logprobs:
                item.logprob.top.add(token_id=tid, logprob=lp)
    return resp


def torch_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs all torch work (loading and steps), so steps are serialized.

    It must be the same thread throughout: OpenMP gives each thread that runs parallel ops its own
    team of workers, and two teams on a small CPU measured ~1.5x slower decode steps.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-torch")


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, runner: ModelRunner, worker: concurrent.futures.ThreadPoolExecutor):
        self.runner = runner
        self.worker = worker
        self.order = StepOrder()

    def _submit(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _run(self, fn, *args):
        return await self._submit(fn, *args)

    async def Step(self, request, context):
        step = step_from_pb(request)
        await self.order.wait_turn(request.step_id)
        # The worker runs jobs in submission order, so the next step may queue up behind this one.
        running = self._submit(self.runner.step, step)
        await self.order.done(request.step_id)
        try:
            out = await running
        except StepError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("step %d failed", request.step_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"step failed: {e}")
        return step_to_pb(out)

    async def GetModelInfo(self, request, context):
        info = self.runner.model_info()
        return executor_pb2.ExecutorModelInfo(
            architecture=info.architecture, model_path=info.model_path, context_length=info.context_length,
            kv_slots=info.kv_slots, vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids,
            dtype=info.dtype, device=info.device, num_parameters=info.num_parameters)

    async def Reset(self, request, context):
        await self.order.reset()
        dropped = await self._run(self.runner.reset)
        return executor_pb2.ExecutorResetResponse(dropped=dropped)

    async def Embed(self, request, context):
        if not isinstance(self.runner, EmbeddingRunner):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this executor serves generation; start it with --is-embedding to embed")
        try:
            out = await self._run(self.runner.embed, [list(s.ids) for s in request.sequences])
        except EmbedInputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("embedding %d sequences failed", len(request.sequences))
            await context.abort(grpc.StatusCode.INTERNAL, f"embed failed: {e}")
        return executor_pb2.ExecutorEmbedResponse(dimension=out.vectors.shape[1],
                                                  embeddings=out.vectors.reshape(-1).tolist(),
                                                  normalized=out.normalized, forward_ms=out.forward_ms)


async def start_server(runner: ModelRunner, addr: str,
                       worker: concurrent.futures.ThreadPoolExecutor | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving runner on addr (port 0: any free port); returns the server and its port.

    worker: the thread the runner was built on (see torch_worker); a new one when not given.
    """
    server = aio_server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorServicer(runner, worker or torch_worker()), server)
    port = bind(server, addr)
    await server.start()
    return server, port


async def serve(args: ServerArgs) -> None:
    log.info("loading model %s (dtype %s, load format %s)", args.model_path or "<embedded SmolLM2>",
             args.dtype, args.load_format)
    worker = torch_worker()
    build = build_embedding_runner if args.is_embedding else build_model_runner
    runner = await asyncio.get_running_loop().run_in_executor(worker, build, args)
    info = runner.model_info()
    log.info("model %s ready: %s on %s, %d KV slots, context %d", info.architecture, info.dtype, info.device,
             info.kv_slots, info.context_length)
    server, _ = await start_server(runner, args.executor_addr, worker)
    log.info("executor ready on %s", args.executor_addr)
    await run_until_signalled(server)


def main(args: ServerArgs) -> int:
    setup_logging("executor", args.log_level)
    return run_service(serve, args)
