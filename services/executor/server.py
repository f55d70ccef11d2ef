"""The executor's gRPC service: a thin layer over ModelRunner. Steps run one at a time in a worker
thread so the event loop stays responsive; each is launched on the device, then collected (its tokens
read back) on a second thread, so a step that arrives while the previous one runs is launched at once.
On the CPU launching runs the whole step, so both happen in the one worker job (no second hop).

Tensor parallelism (--tp-size N > 1) runs one process per shard (shard_group.py). How a step reaches
every shard: leader broadcast. Rank 0 is the only executor the scheduler talks to; its worker thread
broadcasts each step to the other shards (torch.distributed broadcast_object_list over a gloo control
group), every shard runs the forward pass, and rank 0 alone samples and answers (step_broadcast.py).
Chosen over fan-out from the scheduler (TGI's way) because the scheduler and the protocol stay as they
are (the scheduler learns nothing of TP but the KV slot count GetModelInfo reports), a step costs one
gRPC hop whatever N is, and rank 0's worker thread already orders steps, so every shard sees them in
the same order with no further protocol; the broadcast of a step's diff costs well under a millisecond
next to its forward pass. The other shards serve no gRPC.

Only the client that holds the executor's step session (its scheduler; see common/step_session.py) may
Step or Reset: anyone else is refused before a step takes a place in the step order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import os

import grpc
import torch

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from radixserve.common.args import ServerArgs, replica_name
from radixserve.common.grpc_security import install_from_args
from radixserve.common import tracing
from radixserve.common.grpc_util import aio_server, bind
from radixserve.common.lifecycle import run_service, run_until_signalled
from radixserve.common.log import setup_logging
from radixserve.common.step_session import StepSessions, StepsOverStream
from radixserve.common.model_files import cache_root, resolve_model_path
from radixserve.common.phase_clock import PhaseClock
from radixserve.executor.embedding_runner import (
    EmbedInputError,
    EmbeddingRunner,
    build_embedding_runner,
)
from radixserve.executor.lora.adapter import LoraDisabled, LoraError, LoraNotFound
from radixserve.executor.parallel_state import destroy_tensor_parallel
from radixserve.executor.runner import LaunchedStep, ModelRunner, build_model_runner
from radixserve.executor.shard_group import (
    NodeShards,
    ShardLayout,
    join_group,
    open_store,
    shard_device,
)
from radixserve.executor.step_broadcast import TensorParallelLeader, follow
from radixserve.executor.step_tracing import StepTracer
from radixserve.executor.warmup import run_warmup
from radixserve.executor.watchdog import StepWatchdog
from radixserve.common.step import StepError, StepInput, StepOutput
from radixserve.common.step_convert import output_to_proto, step_from_proto

log = logging.getLogger("radixserve.executor")


def lora_status(e: LoraError) -> grpc.StatusCode:
    if isinstance(e, LoraNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, LoraDisabled):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


def torch_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs all torch work (loading and steps), so steps are serialized.

    It must be the same thread throughout: OpenMP gives each thread that runs parallel ops its own
    team of workers, and two teams on a small CPU measured ~1.5x slower decode steps.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-torch")


class ExecutorServicer(StepsOverStream, executor_pb2_grpc.ExecutorServicer):
    def __init__(
        self,
        runner: ModelRunner,
        worker: concurrent.futures.ThreadPoolExecutor,
        watchdog: StepWatchdog | None = None,
    ):
        self.runner = runner
        self.worker = worker
        # Waits for launched steps on the device and reads their tokens back, leaving the worker free
        # to launch the next step meanwhile.
        self.collector = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="executor-collect"
        )
        self.watchdog = watchdog  # watches every job on the worker and the collector
        # False where launch() returns a finished step (runner.launches_ahead; absent: True).
        self.launches_ahead = getattr(runner, "launches_ahead", True)
        self.sessions = (
            StepSessions()
        )  # Step and Reset only from the live session's client (its scheduler)
        self.step_tracer = StepTracer() if tracing.enabled() else None

    def _launch(self, request: executor_pb2.ExecutorStepRequest, step: StepInput):
        """runner.launch on the worker thread; returns it with the step's spans (tracing on) for _collect."""
        spans = self.step_tracer.start(request) if self.step_tracer is not None else None
        try:
            return self.runner.launch(step), spans
        except BaseException as e:
            StepTracer.end(spans, error=e)
            raise

    def _collect(self, launched: LaunchedStep, spans) -> StepOutput:
        try:
            out = self.runner.collect(launched)
        except BaseException as e:
            StepTracer.end(spans, error=e)
            raise
        StepTracer.end(spans, out.forward_ms)
        return out

    def _launch_and_collect(self, request: executor_pb2.ExecutorStepRequest, step: StepInput):
        """Both on the worker, for a runner whose launch already ran the step (the CPU): a hop to the
        collector would cost a thread wake-up per step and overlap nothing."""
        return self._collect(*self._launch(request, step))

    def _reset(self) -> int:
        if self.step_tracer is not None:
            self.step_tracer.reset()
        return self.runner.reset()

    def _submit(self, fn, *args, on=None) -> asyncio.Future:
        """fn(*args) on the worker thread (or the pool `on`), under the watchdog."""
        if self.watchdog is not None:
            fn, args = self.watchdog.run, (fn, *args)
        return asyncio.get_running_loop().run_in_executor(on or self.worker, fn, *args)

    async def _run(self, fn, *args):
        return await self._submit(fn, *args)

    async def Step(self, request, context):
        # Refused before it takes a place in the step order unless it comes from the live session.
        session = await self.sessions.wait_turn(request, context)
        step = step_from_proto(request)
        # The worker launches steps in step order; the collector waits for each on the device. So the
        # next step is launched as soon as it arrives, while this one still runs: the device goes from
        # one step to the next while this one's tokens are read back and answered.
        if self.launches_ahead:
            launching = self._submit(self._launch, request, step)
        else:
            launching = self._submit(self._launch_and_collect, request, step)
        await session.order.done(request.step_id)
        try:
            if self.launches_ahead:
                launched, spans = await launching
                out = await self._submit(self._collect, launched, spans, on=self.collector)
            else:
                out = await launching
        except StepError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("step %d failed", request.step_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"step failed: {e}")
        return output_to_proto(out)

    async def GetModelInfo(self, request, context):
        return executor_pb2.ExecutorModelInfo(**dataclasses.asdict(self.runner.model_info()))

    async def Reset(self, request, context):
        session = await self.sessions.admit(request.session_id, context)
        await session.order.reset()
        dropped = await self._run(self._reset)
        return executor_pb2.ExecutorResetResponse(dropped=dropped)

    async def OpenSession(self, request, context):
        async for event in self.sessions.open(
            request, context, functools.partial(self._run, self._reset)
        ):
            yield event

    async def LoadLoraAdapter(self, request, context):
        try:
            adapter = await self._run(self.runner.load_lora, request.name, request.path)
        except LoraError as e:
            await context.abort(lora_status(e), str(e))
        return executor_pb2.ExecutorLoadLoraAdapterResponse(
            adapter=executor_pb2.ExecutorLoraAdapter(**adapter)
        )

    async def UnloadLoraAdapter(self, request, context):
        try:
            await self._run(self.runner.unload_lora, request.name)
        except LoraError as e:
            await context.abort(lora_status(e), str(e))
        return executor_pb2.ExecutorUnloadLoraAdapterResponse()

    async def Embed(self, request, context):
        if not isinstance(self.runner, EmbeddingRunner):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this executor serves generation; start it with --is-embedding to embed",
            )
        try:
            out = await self._run(self.runner.embed, [list(s.ids) for s in request.sequences])
        except EmbedInputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("embedding %d sequences failed", len(request.sequences))
            await context.abort(grpc.StatusCode.INTERNAL, f"embed failed: {e}")
        return executor_pb2.ExecutorEmbedResponse(
            dimension=out.vectors.shape[1],
            embeddings=out.vectors.reshape(-1).tolist(),
            normalized=out.normalized,
            forward_ms=out.forward_ms,
        )


async def start_server(
    runner: ModelRunner,
    addr: str,
    worker: concurrent.futures.ThreadPoolExecutor | None = None,
    watchdog: StepWatchdog | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving runner on addr (port 0: any free port); returns the server and its port.

    worker: the thread the runner was built on (see torch_worker); a new one when not given.
    watchdog: a started StepWatchdog that every job on the worker runs under; None: unwatched.
    """
    server = aio_server()
    servicer = ExecutorServicer(runner, worker or torch_worker(), watchdog)
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
    port = bind(server, addr)
    await server.start()
    return server, port


SHARD_STOP_TIMEOUT_S = 10.0


def start_shard_group(
    args: ServerArgs,
) -> tuple[ServerArgs, ShardLayout, object, NodeShards | None]:
    """Tensor parallelism, on the main thread: the model resolved once for every shard, the group's
    store opened and the node's other shards started (by the node's first shard)."""
    folder = resolve_model_path(
        args.model_path,
        revision=args.revision,
        download_dir=args.download_dir,
        weights=args.load_format != "dummy",
    )
    args = dataclasses.replace(args, model_path=str(folder))
    layout = ShardLayout.from_args(args)
    store, addr = open_store(args, layout)
    shards = NodeShards(args, layout, addr) if layout.starts_node_shards else None
    return args, layout, store, shards


def build_shard_runner(layout: ShardLayout, store, args: ServerArgs) -> ModelRunner:
    """On the torch worker thread: join the group and load this shard's part of the model."""
    return build_model_runner(join_group(args, layout, store))


def on_base_gpu(args: ServerArgs) -> ServerArgs:
    """--base-gpu-id at --tp-size 1 (replica i of `serve --dp-size N`): the device becomes cuda:<base_gpu_id>."""
    if args.base_gpu_id == 0:
        return args
    return dataclasses.replace(args, device=str(shard_device(args.device, 0, 1, args.base_gpu_id)))


def build_on_device(build, args: ServerArgs):
    """build(args) on the torch thread, with a cuda:N device made that thread's current one (kernels launch
    on the current device)."""
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(args.device))
    return build(args)


def _stop_group(leader: TensorParallelLeader) -> None:
    leader.stop()
    destroy_tensor_parallel()


async def serve(args: ServerArgs) -> None:
    install_from_args(args)
    log.info(
        "loading model %s (dtype %s, load format %s, tp %d)",
        args.model_path or "<embedded SmolLM2>",
        args.dtype,
        args.load_format,
        args.tp_size,
    )
    worker = torch_worker()
    loop = asyncio.get_running_loop()
    shards = None
    if args.tp_size > 1:
        args, layout, store, shards = start_shard_group(args)
        build = functools.partial(build_shard_runner, layout, store)
    else:
        args = on_base_gpu(args)
        build = functools.partial(
            build_on_device, build_embedding_runner if args.is_embedding else build_model_runner
        )
    try:
        runner = await loop.run_in_executor(worker, build, args)
        if args.tp_size > 1:
            runner = TensorParallelLeader(runner)
        clock = getattr(getattr(runner, "runner", runner), "clock", None) or PhaseClock()
        if not args.skip_server_warmup and not args.is_embedding:
            with clock.phase("warm-up"):
                await loop.run_in_executor(worker, run_warmup, runner, args)
        info = runner.model_info()
        log.info(
            "model %s ready: %s on %s, %d KV slots (%s, %d bytes per token), context %d",
            info.architecture,
            info.dtype,
            info.device,
            info.kv_slots,
            info.kv_cache_dtype or "none",
            info.kv_bytes_per_token,
            info.context_length,
        )
        log.info("startup: %s", clock.summary())
        watchdog = (
            StepWatchdog(args.watchdog_timeout).start() if args.watchdog_timeout > 0 else None
        )
        server, _ = await start_server(runner, args.executor_addr, worker, watchdog)
        log.info("executor ready on %s", args.executor_addr)
        await run_until_signalled(server)
        if isinstance(runner, TensorParallelLeader):
            await loop.run_in_executor(worker, _stop_group, runner)
    finally:
        if shards is not None:
            shards.stop(SHARD_STOP_TIMEOUT_S)


def run_shard(args: ServerArgs) -> int:
    """A tensor-parallel shard other than rank 0: no gRPC; it runs what rank 0 broadcasts until told to stop."""
    args, layout, store, shards = start_shard_group(args)
    try:
        follow(build_shard_runner(layout, store, args))
        destroy_tensor_parallel()
    finally:
        if shards is not None:
            shards.stop(SHARD_STOP_TIMEOUT_S)
    log.info("tensor-parallel shard %d stopped", layout.rank)
    return 0


def main(args: ServerArgs) -> int:
    # Compiled Triton kernels and autotuning picks live with radixserve's other caches (a container's /cache
    # volume), so that a restart loads them instead of compiling and timing again.
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    name = replica_name("executor", args.dp_rank)
    if args.tp_size > 1 and (rank := ShardLayout.from_args(args).rank) != 0:
        setup_logging(f"{name}-tp{rank}", args.log_level)
        return run_shard(args)
    setup_logging(name, args.log_level)
    return run_service(serve, args)
