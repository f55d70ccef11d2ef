"""The scheduler's LoRA adapters: which names new requests may use, and loading / unloading them on the
executor (which loads on every tensor-parallel shard).

Unloading is safe for running requests: the name is withdrawn at once (new requests naming it get
NOT_FOUND), the call waits until no request of the core runs, waits or still releases KV with it (the
refcount is the core's own request table), then the executor forgets the adapter and the prefix cache
frees its namespace. Requests are checked twice: when built, and again just before they are queued
(check_queued, with no await between it and the queue), so none slips in during an unload.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from radixserve.v1 import executor_pb2, scheduler_pb2
from radixserve.common.config import lora_name_problem
from radixserve.scheduler.lora_admission import adapter_in_use, drop_adapter_cache
from radixserve.scheduler.request import Request
from radixserve.scheduler.session import Rejected

log = logging.getLogger("radixserve.scheduler.lora")

UNLOAD_POLL_S = 0.02  # how often an unload looks whether its adapter's requests have ended
MAX_PATH_CHARS = 4096


class LoraAdapters:
    def __init__(self, runtime, executor, model: executor_pb2.ExecutorModelInfo):
        """runtime: the SchedulerRuntime (its core's requests are the refcount); executor: its stub."""
        self.runtime, self.executor = runtime, executor
        self.max_loras = model.max_loras_per_batch  # 0: the executor serves no LoRA
        self.paths: dict[str, str] = {a.name: a.path for a in model.lora_adapters}
        self.unloading: set[str] = set()
        self._busy = asyncio.Lock()  # one load or unload at a time

    async def reload_missing(self, model: executor_pb2.ExecutorModelInfo) -> None:
        """After the executor came back (a restart forgets adapters loaded at run time): load again
        those it lacks; one that fails to load is dropped (its requests then get NOT_FOUND)."""
        held = {a.name for a in model.lora_adapters}
        for name, path in list(self.paths.items()):
            if name in held:
                continue
            try:
                await self.executor.LoadLoraAdapter(
                    executor_pb2.ExecutorLoadLoraAdapterRequest(name=name, path=path)
                )
                log.info("LoRA adapter %r loaded again on the restarted executor", name)
            except grpc.aio.AioRpcError as e:
                log.error(
                    "LoRA adapter %r could not be loaded again (%s); dropped", name, e.details()
                )
                del self.paths[name]

    @property
    def enabled(self) -> bool:
        return self.max_loras > 0

    def available(self) -> list[scheduler_pb2.SchedulerLoraAdapter]:
        return [
            scheduler_pb2.SchedulerLoraAdapter(name=n, path=p)
            for n, p in self.paths.items()
            if n not in self.unloading
        ]

    def check(self, name: str) -> None:
        """Rejected unless new requests may use adapter name ("" always)."""
        if not name:
            return
        if not self.enabled:
            raise Rejected(
                grpc.StatusCode.NOT_FOUND,
                f"LoRA adapter {name!r} is not loaded: the server runs without --enable-lora",
            )
        if name not in self.paths or name in self.unloading:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {name!r} is not loaded")

    def check_queued(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.check(req.lora_name)

    async def load(self, name: str, path: str) -> scheduler_pb2.SchedulerLoraAdapter:
        if not self.enabled:
            raise Rejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                "LoRA is off: start the server with --enable-lora to load adapters",
            )
        if (problem := lora_name_problem(name)) is not None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not path or len(path) > MAX_PATH_CHARS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "lora_path is required")
        async with self._busy:
            if name in self.paths:
                raise Rejected(
                    grpc.StatusCode.INVALID_ARGUMENT, f"LoRA adapter {name!r} is already loaded"
                )
            try:
                await self.executor.LoadLoraAdapter(
                    executor_pb2.ExecutorLoadLoraAdapterRequest(name=name, path=path)
                )
            except grpc.aio.AioRpcError as e:
                raise Rejected(e.code(), e.details() or str(e)) from None
            self.paths[name] = path
        log.info("LoRA adapter %r loaded from %s", name, path)
        return scheduler_pb2.SchedulerLoraAdapter(name=name, path=path)

    async def unload(self, name: str) -> None:
        if name not in self.paths or name in self.unloading:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {name!r} is not loaded")
        self.unloading.add(name)
        try:
            async with self._busy:
                core = self.runtime.core
                while adapter_in_use(core, name) or not drop_adapter_cache(core, name):
                    await asyncio.sleep(UNLOAD_POLL_S)
                try:
                    await self.executor.UnloadLoraAdapter(
                        executor_pb2.ExecutorUnloadLoraAdapterRequest(name=name)
                    )
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:  # gone already (a restarted executor)
                        raise Rejected(e.code(), e.details() or str(e)) from None
                del self.paths[name]
        finally:
            self.unloading.discard(name)
        log.info("LoRA adapter %r unloaded", name)
