"""GET /metrics (--enable-metrics): the gateway's Prometheus metrics followed by the scheduler's."""

from __future__ import annotations

import logging

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError

log = logging.getLogger("radixserve.gateway.metrics")
router = APIRouter()
SCHEDULER_METRICS_TIMEOUT_S = 5.0


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.metrics is None:
        raise ApiError(
            404, "metrics are off: start the server with --enable-metrics", code="not_found"
        )
    text = engine.metrics.prometheus_text() + await scheduler_metrics_text(engine)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


async def scheduler_metrics_text(engine: Engine) -> str:
    """The scheduler's metrics; empty while it cannot be reached (the gateway's are served anyway)."""
    try:
        resp = await engine.stubs().scheduler.GetMetrics(
            scheduler_pb2.SchedulerMetricsRequest(), timeout=SCHEDULER_METRICS_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as e:
        log.warning("scheduler metrics unavailable: %s", e.code().name)
        return ""
    return resp.prometheus_text
