"""What the gateway observes of its requests: Prometheus metrics (latencies, token counts, gRPC hops),
the OpenTelemetry span of each generation, and RequestTelemetry, which owns one generation's timings and
tells the metrics, the span and the request log."""
