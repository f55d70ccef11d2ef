"""Logging setup: one format for every service, the service name in each line, and the request id
and trace id of the request being served when there is one (`request_id` context variable, the
current span)."""

import contextvars
import logging
import sys

# The request the current task serves (set by the gateway per request; tasks inherit it).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class RequestContextFilter(logging.Filter):
    """Adds `context`: " [rid=... trace=...]" for records logged while serving a request, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        from radixserve.common.tracing import current_trace_id

        parts = []
        if rid := request_id.get():
            parts.append(f"rid={rid}")
        if trace_id := current_trace_id():
            parts.append(f"trace={trace_id}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s [{service}] %(levelname)s %(name)s:%(context)s %(message)s",
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestContextFilter())
    return logging.getLogger(f"radixserve.{service}")
