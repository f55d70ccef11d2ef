"""LoRA adapters as the gateway names them: an OpenAI `model` of "BASE:ADAPTER" or an adapter's own name
picks the adapter (SGLang's and vLLM's forms), the base model's name (or "") none; /v1/models lists
each adapter with `parent` = the base model. The names come from the scheduler (SchedulerInfo.
lora_adapters), fetched again when a request names one the gateway does not know (at most every
REFRESH_MIN_S), and updated at once by loads and unloads made through this gateway."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.api.errors import ApiError, from_grpc

if TYPE_CHECKING:
    from radixserve.gateway.pipeline.engine import Engine

REFRESH_MIN_S = 1.0


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


class LoraModels:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.paths: dict[str, str] = {}  # adapter name -> folder
        self.enabled = False
        self._fetched_at: float | None = None

    async def refresh(self) -> None:
        info = await self.engine.scheduler_info()
        self.paths = {a.name: a.path for a in info.lora_adapters}
        self.enabled = info.max_loras_per_batch > 0
        self._fetched_at = time.monotonic()

    async def names(self) -> dict[str, str]:
        if self._fetched_at is None:
            try:
                await self.refresh()
            except ApiError:
                return {}
        return self.paths

    def _is_base(self, model: str) -> bool:
        return model in (self.engine.served_name, str(self.engine.args.model_path or ""))

    async def resolve(self, model: str | None, param: str = "model") -> str:
        """The adapter `model` names ("" for the base model); 404 model_not_found for anything else."""
        if not model or self._is_base(model):
            return ""
        name = model
        base, sep, adapter = model.rpartition(":")
        if sep and self._is_base(base):
            name = adapter
        if name in await self.names():
            return name
        stale = time.monotonic() - (self._fetched_at or 0.0) >= REFRESH_MIN_S
        if stale:
            try:
                await self.refresh()
            except ApiError:  # the backends are down: the name is unknown all the same
                raise model_not_found(model) from None
            if name in self.paths:
                return name
        raise model_not_found(model)

    def shown_name(self, model: str | None, lora: str) -> str:
        """The model a response names: as the request named it when that picked LoRA adapter lora
        ("BASE:NAME" or "NAME", as vLLM answers for an adapter), else the served model name."""
        return model if lora and model else self.engine.served_name

    async def load(self, name: str, path: str) -> None:
        import grpc

        try:
            await self.engine.stubs().scheduler.LoadLoraAdapter(
                scheduler_pb2.SchedulerLoadLoraAdapterRequest(name=name, path=path)
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None
        self.paths[name] = path

    async def unload(self, name: str) -> None:
        """Unload name; it leaves the listed models at once (the call waits for its requests)."""
        import grpc

        path = self.paths.pop(name, None)
        try:
            await self.engine.stubs().scheduler.UnloadLoraAdapter(
                scheduler_pb2.SchedulerUnloadLoraAdapterRequest(name=name)
            )
        except grpc.aio.AioRpcError as e:
            if path is not None and e.code() != grpc.StatusCode.NOT_FOUND:
                self.paths[name] = path  # still loaded
            raise from_grpc(e, "scheduler") from None
