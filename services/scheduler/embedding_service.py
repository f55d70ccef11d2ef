"""The Scheduler service of an --is-embedding server: Embed through an EmbedBatcher.

There is no KV pool, prefix cache or step loop: Generate is refused, Abort and FlushCache find
nothing to do, GetInfo describes the model with an empty pool. Requests are checked here, before
batching, so one bad request cannot fail the executor call it would share with others.
"""

from __future__ import annotations

import json

import grpc

from radixserve.v1 import executor_pb2, scheduler_pb2, scheduler_pb2_grpc
from radixserve.scheduler.embed_batcher import EmbedBatcher, EmbedFailed

GENERATION_REFUSED = "this server serves embeddings (--is-embedding): call Embed, not Generate"


class EmbeddingSchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, batcher: EmbedBatcher, model: executor_pb2.ExecutorModelInfo, config: dict):
        self.batcher = batcher
        self.model = model
        self.config = config

    def _invalid(self, sequences: list[list[int]]) -> str | None:
        if not sequences:
            return "no sequences to embed"
        limit, vocab = self.model.context_length, self.model.vocab_size
        for i, ids in enumerate(sequences):
            if not 1 <= len(ids) <= limit:
                return f"sequence {i} has {len(ids)} tokens; embeddings take 1 to {limit}"
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                return f"sequence {i} holds token id {bad}, outside the vocabulary [0, {vocab})"
        return None

    async def Embed(self, request, context):
        sequences = [list(s.ids) for s in request.sequences]
        error = self._invalid(sequences)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        try:
            result = await self.batcher.embed(sequences)
        except EmbedFailed as e:
            await context.abort(e.code, e.message)
        return scheduler_pb2.SchedulerEmbedResponse(
            dimension=result.dimension,
            embeddings=result.values,
            normalized=result.normalized,
            prompt_tokens=sum(len(ids) for ids in sequences),
        )

    async def Generate(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, GENERATION_REFUSED)

    async def Abort(self, request, context):
        return scheduler_pb2.SchedulerAbortResponse(aborted=0)

    async def GetInfo(self, request, context):
        return scheduler_pb2.SchedulerInfo(
            architecture=self.model.architecture,
            model_path=self.model.model_path,
            context_length=self.model.context_length,
            eos_token_ids=self.model.eos_token_ids,
            dtype=self.model.dtype,
            config_json=json.dumps(self.config),
            vocab_size=self.model.vocab_size,
        )

    async def FlushCache(self, request, context):
        return scheduler_pb2.SchedulerFlushCacheResponse(freed_tokens=0)

    async def GetMetrics(self, request, context):
        return scheduler_pb2.SchedulerMetrics()  # no scheduler metrics without a step loop
