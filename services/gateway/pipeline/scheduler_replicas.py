"""The gateway's data-parallel schedulers (--dp-size N: one per scheduler + executor replica), behind one
SchedulerStub-like object, so that the unary calls' callers need not know about replicas.

- GetInfo: every replica's, summed (SchedulerInfo.replicas lists each, with the router's counts); an
  unreachable replica is listed as such, and the call fails only when none answers.
- Abort, FlushCache: sent to every replica, their counts summed (request ids are unique: only the replica
  running a request aborts it). Abort fails only when no replica answered, FlushCache when one did not.
- GetMetrics: the replicas' Prometheus texts merged, each sample labelled dp_rank="i".
- LoadLoraAdapter, UnloadLoraAdapter: sent to every replica; fail when one did not answer.
- Embed: round robin, failing over on UNAVAILABLE (replicas.ReplicaSet).
Generation does not come here: the engine runs one SchedulerSession per replica (stub(i)) and the router
(dp_router.py) picks it. With one replica every call goes straight to it, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import grpc

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from radixserve.gateway.pipeline.dp_router import DataParallelRouter
from radixserve.gateway.pipeline.replicas import ReplicaSet

log = logging.getLogger("radixserve.gateway.scheduler_replicas")

DP_LABEL = "dp_rank"
_SUMMED = (
    "max_total_tokens",
    "free_tokens",
    "cached_tokens",
    "in_use_tokens",
    "running_requests",
    "waiting_requests",
    "total_cached_prompt_tokens",
    "total_prompt_tokens",
    "spec_verify_steps",
    "spec_draft_tokens",
    "spec_accepted_tokens",
)
_SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class SchedulerReplicas:
    def __init__(
        self,
        addrs: list[str],
        channel: Callable[[str], grpc.aio.Channel],
        router: DataParallelRouter,
    ):
        self.addrs = list(addrs)
        self.router = router
        self._balanced = ReplicaSet(self.addrs, scheduler_pb2_grpc.SchedulerStub, channel)
        self.channels = self._balanced.channels

    def stub(self, replica: int) -> scheduler_pb2_grpc.SchedulerStub:
        return self._balanced.stubs[replica]

    async def _each(self, method: str, request, **kwargs) -> list:
        """The method's answer from every replica, in order; an AioRpcError in place of a failed one."""
        calls = (getattr(stub, method)(request, **kwargs) for stub in self._balanced.stubs)
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
                raise result
        return results

    async def GetInfo(self, request, **kwargs) -> scheduler_pb2.SchedulerInfo:
        if len(self.addrs) == 1:
            return await self.stub(0).GetInfo(request, **kwargs)
        return aggregate_info(
            await self._each("GetInfo", request, **kwargs), self.addrs, self.router
        )

    async def Abort(self, request, **kwargs) -> scheduler_pb2.SchedulerAbortResponse:
        results = _answered(await self._each("Abort", request, **kwargs), require_all=False)
        return scheduler_pb2.SchedulerAbortResponse(aborted=sum(r.aborted for r in results))

    async def FlushCache(self, request, **kwargs) -> scheduler_pb2.SchedulerFlushCacheResponse:
        results = _answered(await self._each("FlushCache", request, **kwargs), require_all=True)
        return scheduler_pb2.SchedulerFlushCacheResponse(
            freed_tokens=sum(r.freed_tokens for r in results)
        )

    async def GetMetrics(self, request, **kwargs) -> scheduler_pb2.SchedulerMetrics:
        if len(self.addrs) == 1:
            return await self.stub(0).GetMetrics(request, **kwargs)
        results = await self._each("GetMetrics", request, **kwargs)
        texts = {}
        for i, result in enumerate(results):
            if isinstance(result, grpc.aio.AioRpcError):
                log.warning(
                    "metrics of scheduler replica %d (%s) unavailable: %s",
                    i,
                    self.addrs[i],
                    result.code().name,
                )
            else:
                texts[i] = result.prometheus_text
        _answered(results, require_all=False)
        return scheduler_pb2.SchedulerMetrics(prometheus_text=merge_prometheus_texts(texts))

    async def LoadLoraAdapter(self, request, **kwargs):
        """Every replica loads it (fails when one did not)."""
        if len(self.addrs) == 1:
            return await self.stub(0).LoadLoraAdapter(request, **kwargs)
        return _answered(await self._each("LoadLoraAdapter", request, **kwargs), True)[0]

    async def UnloadLoraAdapter(self, request, **kwargs):
        """Every replica unloads it (fails when one did not)."""
        if len(self.addrs) == 1:
            return await self.stub(0).UnloadLoraAdapter(request, **kwargs)
        return _answered(await self._each("UnloadLoraAdapter", request, **kwargs), True)[0]

    async def Embed(self, request, **kwargs) -> scheduler_pb2.SchedulerEmbedResponse:
        return await self._balanced.call("Embed", request, **kwargs)


def _answered(results: list, require_all: bool) -> list:
    """The answers; raises the first error when every replica failed (or, with require_all, any)."""
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    if errors and (require_all or len(errors) == len(results)):
        raise errors[0]
    return [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]


def aggregate_info(
    results: list, addrs: list[str], router: DataParallelRouter
) -> scheduler_pb2.SchedulerInfo:
    """One SchedulerInfo for the replicas' GetInfo answers (see SchedulerInfo.replicas)."""
    infos = _answered(results, require_all=False)
    total = scheduler_pb2.SchedulerInfo()
    total.CopyFrom(infos[0])
    for field in _SUMMED:
        setattr(total, field, sum(getattr(info, field) for info in infos))
    total.context_length = min(info.context_length for info in infos)
    total.executor_unavailable = any(info.executor_unavailable for info in infos)
    for i, (addr, result) in enumerate(zip(addrs, results)):
        replica = total.replicas.add(
            index=i,
            addr=addr,
            routed_requests=router.routed[i],
            inflight_requests=router.inflight[i],
        )
        if isinstance(result, grpc.aio.AioRpcError):
            replica.error = f"{result.code().name}: {result.details() or ''}"
        else:
            replica.reachable = True
            replica.info.CopyFrom(result)
    return total


def merge_prometheus_texts(texts: dict[int, str]) -> str:
    """Prometheus text expositions of several replicas (by index) as one: each metric family once (its HELP
    and TYPE lines), with the samples of every replica, labelled dp_rank="<index>"."""
    families: dict[
        str, tuple[list[str], list[str]]
    ] = {}  # name -> (its HELP and TYPE lines, its samples)
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(maxsplit=3)[2]
                meta, _ = families.setdefault(family, ([], []))
                if not any(
                    m.startswith(line[:7]) for m in meta
                ):  # the first replica's HELP and TYPE
                    meta.append(line)
            elif line and not line.startswith("#"):
                name = family or _SAMPLE_NAME.match(line).group(0)
                families.setdefault(name, ([], []))[1].append(_with_label(line, replica))
    return "".join(line + "\n" for meta, samples in families.values() for line in meta + samples)


def _with_label(sample: str, replica: int) -> str:
    """A sample line with dp_rank="<replica>" added to its labels."""
    name = _SAMPLE_NAME.match(sample).group(0)
    rest = sample[len(name) :]
    label = f'{DP_LABEL}="{replica}"'
    if rest.startswith("{}"):
        return f"{name}{{{label}}}{rest[2:]}"
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"
