"""A real OTLP/gRPC trace receiver (opentelemetry-proto's TraceService) that keeps every span it is
sent, for tests and benchmarks that run the services with --otlp-traces-endpoint."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict
    events: list[str]
    links: list[tuple[str, str]]  # (trace id, span id)
    status_code: int
    start_ns: int
    end_ns: int


@dataclass
class OtlpReceiver:
    server: grpc.Server
    port: int
    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=attrs.get("service.name", ""),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events=[e.name for e in s.events],
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            status_code=s.status.code,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.spans.extend(received)

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, predicate, timeout: float = 15.0) -> list[ReceivedSpan]:
        """Poll until predicate(spans) is true; return the spans (the caller asserts on them)."""
        deadline = time.time() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans) or time.time() > deadline:
                return spans
            time.sleep(0.1)

    def stop(self) -> None:
        self.server.stop(0)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def start_receiver() -> OtlpReceiver:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = OtlpReceiver(server, port)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver.add), server)
    server.start()
    return receiver
