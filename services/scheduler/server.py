"""The Scheduler gRPC service: a thin servicer over SchedulerRuntime, and process startup."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass

import grpc

from radixserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from radixserve.common.config import MAX_RUNNING_REQUESTS_CAP
from radixserve.common.args import ServerArgs, replica_name
from radixserve.common.grpc_security import install_from_args
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.common.lifecycle import (
    SHUTDOWN_GRACE_S,
    run_service,
    unless_stopped,
    wait_until_signalled,
)
from radixserve.common import tracing
from radixserve.common.log import setup_logging
from radixserve.common.sampling import SamplingError
from radixserve.scheduler.convert import event_to_proto, request_from_proto
from radixserve.scheduler.core import Scheduler, image_error
from radixserve.scheduler.embed_batcher import EmbedBatcher
from radixserve.scheduler.embedding_service import EmbeddingSchedulerServicer
from radixserve.scheduler.lora_service import LoraAdapters
from radixserve.scheduler.request import Request
from radixserve.scheduler.request_tracing import RequestTracer
from radixserve.scheduler.grammar import (
    CompileBusy,
    CompilerUnavailable,
    GrammarBackend,
    InvalidConstraint,
    grammar_backend,
    request_grammar,
)
from radixserve.scheduler.decode_log import DecodeLog
from radixserve.scheduler.metrics import SchedulerMetrics, attach_metrics
from radixserve.scheduler.runtime import SchedulerRuntime, StepFailure, step_deadline
from radixserve.scheduler.queue_limit import queue_refusal
from radixserve.scheduler.session import Rejected, Session

log = logging.getLogger("radixserve.scheduler")

# Default --max-running-requests: one request per this many pool tokens (a modest average
# sequence; retraction covers the cases where requests grow longer), between 1 and the cap.
TOKENS_PER_RUNNING_REQUEST = 128
EXECUTOR_WAIT_LOG_EVERY_S = 10.0


def trace_context_from_metadata(target: common_pb2.TraceContext, metadata) -> None:
    """A direct Generate caller's traceparent travels in metadata; the core carries it as a field."""
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate"):
            setattr(target, key, value)


def default_max_running_requests(pool_tokens: int) -> int:
    return max(1, min(MAX_RUNNING_REQUESTS_CAP, pool_tokens // TOKENS_PER_RUNNING_REQUEST))


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    max_queued_requests: int | None = None  # --max-queued-requests; None: no limit

    def __init__(
        self,
        runtime: SchedulerRuntime,
        model: executor_pb2.ExecutorModelInfo,
        config: dict,
        grammars: GrammarBackend | None = None,
        metrics: SchedulerMetrics | None = None,
    ):
        self.grammars = grammars
        self.metrics = metrics
        self.runtime = runtime
        self.model = model
        self.config = config
        self.lora = LoraAdapters(runtime, runtime.executor, model)
        runtime.after_reconnect.append(self.lora.reload_missing)

    def _invalid(self, req: Request) -> str | None:
        vocab = self.model.vocab_size
        bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            return f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab})"
        bad = next((t for t in req.sampling.token_ids_logprob if not 0 <= t < vocab), None)
        if bad is not None:
            return f"token_ids_logprob holds token id {bad}, outside the vocabulary [0, {vocab})"
        try:
            req.sampling.check().check_prompt_logprobs(len(req.prompt_ids))
            req.stopping.check()
        except SamplingError as e:
            return str(e)
        return self.runtime.core.validate(
            len(req.prompt_ids), req.stopping.max_new_tokens
        ) or image_error(req)

    async def build(self, msg: scheduler_pb2.SchedulerGenerateRequest) -> Request:
        """The core Request for a generate action, or Rejected; the queue limit is not checked here."""
        rid = msg.request_id or uuid.uuid4().hex
        try:
            req = request_from_proto(rid, msg)
        except ValueError as e:  # an image tensor that does not decode
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        error = self._invalid(req)
        if error:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, error)
        self.lora.check(req.lora_name)
        try:
            grammar = await request_grammar(self.grammars, req.sampling)
        except InvalidConstraint as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except CompileBusy as e:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except CompilerUnavailable as e:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        if rid in self.runtime.core.requests:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already running")
        req.grammar = grammar
        return req

    def check_room(self, count: int, reqs: list[Request] = ()) -> None:
        """Rejected unless `count` more requests fit the queue (queue_limit.queue_refusal) and reqs'
        LoRA adapters are still loaded."""
        self.lora.check_queued(list(reqs))
        refusal = queue_refusal(
            count, len(self.runtime.core.waiting), self.max_queued_requests, "sequences", "requests"
        )
        if refusal is not None:
            raise Rejected(*refusal)

    async def prepare(self, msg: scheduler_pb2.SchedulerGenerateRequest) -> Request:
        """The core Request for a generate call, or Rejected (the queue limit included)."""
        req = await self.build(msg)
        self.check_room(1, [req])
        return req

    async def Generate(self, request, context):
        if not request.HasField("trace_context"):
            trace_context_from_metadata(request.trace_context, context.invocation_metadata())
        try:
            req = await self.prepare(request)
        except Rejected as e:
            await context.abort(e.code, e.message)
        queue: asyncio.Queue = asyncio.Queue()
        deliver = queue.put_nowait  # one bound method: detach recognises its receiver by identity
        self.runtime.submit(req, deliver)
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, StepFailure):
                    done = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, item.message)
                done = item.finished
                yield event_to_proto(item)
        finally:
            self.runtime.detach(req, deliver, abort=not done)

    async def Session(self, request_iterator, context):
        session = Session(self.runtime, self.build, self.check_room)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            while (events := await session.outbox.get()) is not None:
                yield events
        finally:
            reader.cancel()
            session.close()

    async def Abort(self, request, context):
        aborted = self.runtime.abort(list(request.request_ids), request.abort_all)
        return scheduler_pb2.SchedulerAbortResponse(aborted=aborted)

    async def GetInfo(self, request, context):
        core = self.runtime.core
        stats = core.stats()
        return scheduler_pb2.SchedulerInfo(
            architecture=self.model.architecture,
            model_path=self.model.model_path,
            context_length=core.context_length,
            max_total_tokens=stats.pool_tokens,
            free_tokens=stats.free,
            cached_tokens=stats.cached,
            in_use_tokens=stats.in_use,
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            eos_token_ids=sorted(core.eos_token_ids),
            dtype=self.model.dtype,
            kv_cache_dtype=self.model.kv_cache_dtype,
            kv_bytes_per_token=self.model.kv_bytes_per_token,
            total_cached_prompt_tokens=stats.total_cached_prompt_tokens,
            total_prompt_tokens=stats.total_prompt_tokens,
            spec_verify_steps=stats.spec_verify_steps,
            spec_draft_tokens=stats.spec_draft_tokens,
            spec_accepted_tokens=stats.spec_accepted_tokens,
            config_json=json.dumps(self.config),
            vocab_size=self.model.vocab_size,
            executor_unavailable=not self.runtime.executor_available,
            lora_adapters=self.lora.available(),
            max_loras_per_batch=self.lora.max_loras,
        )

    async def FlushCache(self, request, context):
        return scheduler_pb2.SchedulerFlushCacheResponse(
            freed_tokens=self.runtime.core.flush_cache()
        )

    async def Embed(self, request, context):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "this server serves generation; start it with --is-embedding to embed",
        )

    async def LoadLoraAdapter(self, request, context):
        try:
            adapter = await self.lora.load(request.name, request.path)
        except Rejected as e:
            await context.abort(e.code, e.message)
        return scheduler_pb2.SchedulerLoadLoraAdapterResponse(adapter=adapter)

    async def UnloadLoraAdapter(self, request, context):
        try:
            await self.lora.unload(request.name)
        except Rejected as e:
            await context.abort(e.code, e.message)
        return scheduler_pb2.SchedulerUnloadLoraAdapterResponse()

    async def GetMetrics(self, request, context):
        text = self.metrics.prometheus_text() if self.metrics is not None else ""
        return scheduler_pb2.SchedulerMetrics(prometheus_text=text)


async def wait_for_executor(
    stub: executor_pb2_grpc.ExecutorStub, addr: str
) -> executor_pb2.ExecutorModelInfo:
    """GetModelInfo, retried until the executor answers (it may still be loading the model). Each call
    waits for the channel to connect, so it goes out as soon as the executor listens (the channel retries
    the connection at short intervals: grpc_util.RECONNECT_MAX_BACKOFF_MS)."""
    loop = asyncio.get_running_loop()
    last_log = -EXECUTOR_WAIT_LOG_EVERY_S
    while True:
        try:
            return await stub.GetModelInfo(
                executor_pb2.ExecutorModelInfoRequest(), timeout=5.0, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as e:
            if loop.time() - last_log >= EXECUTOR_WAIT_LOG_EVERY_S:
                log.info("waiting for the executor at %s (%s)", addr, e.code().name)
                last_log = loop.time()
            await asyncio.sleep(0.2)


def build_core(args: ServerArgs, model: executor_pb2.ExecutorModelInfo) -> Scheduler:
    pool_size = model.kv_slots
    if args.max_total_tokens:
        # Page 0 holds the padding slot: one page more than the tokens (rounded down to pages).
        pool_size = min(pool_size, args.max_total_tokens + args.page_size)
    context_length = min(args.context_length or model.context_length, model.context_length)
    max_running = args.max_running_requests or default_max_running_requests(pool_size - 1)
    config = dataclasses.replace(args, max_running_requests=max_running)
    return Scheduler(
        config,
        pool_size,
        context_length,
        eos_token_ids=model.eos_token_ids,
        max_graph_tokens=model.max_graph_tokens,
        max_tree_draft_tokens=model.max_tree_draft_tokens,
    )


@dataclass
class RunningScheduler:
    server: grpc.aio.Server
    runtime: SchedulerRuntime | None  # None with --is-embedding
    port: int
    loop_task: asyncio.Task
    channel: grpc.aio.Channel
    grammars: GrammarBackend | None = None

    async def stop(self, grace: float | None = None) -> None:
        if self.grammars is not None:
            self.grammars.close()  # kills running compiles: the calls waiting for them end now
        self.loop_task.cancel()
        await self.server.stop(grace)
        await self.channel.close()


async def start_embedding_scheduler(
    args: ServerArgs,
    channel: grpc.aio.Channel,
    stub: executor_pb2_grpc.ExecutorStub,
    model: executor_pb2.ExecutorModelInfo,
) -> RunningScheduler:
    """--is-embedding: no KV pool and no step loop; Embed calls are batched by an EmbedBatcher."""
    batcher = EmbedBatcher(
        stub, max_batch_tokens=args.max_prefill_tokens, max_queued=args.max_queued_requests
    )
    config = {
        "is_embedding": True,
        "max_prefill_tokens": args.max_prefill_tokens,
        "context_length": model.context_length,
    }
    server = aio_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        EmbeddingSchedulerServicer(batcher, model, config), server
    )
    port = bind(server, args.scheduler_addr)
    await server.start()
    loop_task = asyncio.create_task(batcher.run(), name="embed-batcher")
    log.info(
        "embedding scheduler ready on port %d (model %s, context %d, batches of %d padded tokens)",
        port,
        model.architecture,
        model.context_length,
        args.max_prefill_tokens,
    )
    return RunningScheduler(server, None, port, loop_task, channel)


async def start_scheduler(args: ServerArgs) -> RunningScheduler:
    """Connect to the executor, then serve on args.scheduler_addr (port 0: an ephemeral one)."""
    channel = aio_channel(args.executor_addr)
    stub = executor_pb2_grpc.ExecutorStub(channel)
    model = await wait_for_executor(stub, args.executor_addr)
    if args.is_embedding:
        return await start_embedding_scheduler(args, channel, stub, model)
    core = build_core(args, model)
    config = {
        "schedule_policy": core.policy,
        "max_running_requests": core.max_running_requests,
        "max_prefill_tokens": core.max_prefill_tokens,
        "max_total_tokens": core.pool.capacity,
        "context_length": core.context_length,
        "disable_radix_cache": core.disable_radix_cache,
        "disable_overlap_schedule": args.disable_overlap_schedule,
        "page_size": core.page_size,
        "chunked_prefill": core.chunking,
        "chunked_prefill_size": core.chunked_prefill_size,
        "enable_mixed_chunk": core.enable_mixed_chunk,
        "stream_interval": core.stream.interval,
        "speculative_algorithm": args.speculative_algorithm,
        "speculative_num_draft_tokens": (
            core.decode.spec.max_draft_tokens + 1 if core.decode.spec is not None else None
        ),
    }
    runtime = SchedulerRuntime(
        core,
        stub,
        overlap=not args.disable_overlap_schedule,
        step_timeout=step_deadline(args.watchdog_timeout),
        model=model,
    )
    if tracing.enabled():
        runtime.observers.append(RequestTracer())
    runtime.observers.append(DecodeLog(core))
    await runtime.connect()  # the executor's step session: ready means able to run steps
    server = aio_server()
    grammars = grammar_backend(args, model)
    servicer = SchedulerServicer(runtime, model, config, grammars, attach_metrics(runtime, args))
    servicer.max_queued_requests = args.max_queued_requests
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = bind(server, args.scheduler_addr)
    await server.start()
    loop_task = asyncio.create_task(runtime.run(), name="scheduler-loop")
    host = args.scheduler_addr.rsplit(":", 1)[0]
    log.info(
        "scheduler ready on %s:%d (model %s, %d KV tokens, context %d, config %s)",
        host,
        port,
        model.architecture,
        core.pool.capacity,
        core.context_length,
        json.dumps(config),
    )
    return RunningScheduler(server, runtime, port, loop_task, channel, grammars)


async def serve(args: ServerArgs) -> None:
    install_from_args(args)
    running = await unless_stopped(start_scheduler(args))
    if running is None:
        log.info("stopped while waiting for the executor")
        return
    try:
        signalled = asyncio.ensure_future(wait_until_signalled(running.server))
        await asyncio.wait({signalled, running.loop_task}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if running.loop_task.done() and not running.loop_task.cancelled():
            running.loop_task.result()  # the loop only ends on a fatal error: raise it (exit code 1)
    finally:
        await running.stop(grace=SHUTDOWN_GRACE_S)


def main(args: ServerArgs) -> int:
    setup_logging(replica_name("scheduler", args.dp_rank), args.log_level)
    return run_service(serve, args)
