"""API errors in OpenAI's shape, and how backend gRPC failures map onto them."""

from __future__ import annotations

import grpc

RETRY_AFTER_S = 1  # what a 503 for an overloaded backend tells the client to wait

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = (
            type
            or _TYPE_BY_STATUS.get(status)
            or ("invalid_request_error" if status < 500 else "server_error")
        )
        self.headers = headers  # extra HTTP response headers, e.g. Retry-After

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_supported(feature: str, param: str | None = None) -> ApiError:
    return ApiError(400, f"{feature} is not supported yet", param=param, code="not_supported")


def from_grpc(err: grpc.aio.AioRpcError, stage: str) -> ApiError:
    """Translate a backend's gRPC error; only client-facing details are passed on."""
    return from_status(err.code(), err.details() or "", stage)


def from_status(code: grpc.StatusCode, details: str, stage: str) -> ApiError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, details or f"{stage} rejected the request", code="invalid_argument")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ApiError(
            400, details or "a request with this id is already running", code="duplicate_request_id"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(
            503,
            f"the {stage} is overloaded: {details}",
            code="resource_exhausted",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ApiError(503, f"the {stage} service is unavailable", code="service_unavailable")
    if code == grpc.StatusCode.CANCELLED:
        return ApiError(499, "the request was cancelled", code="cancelled")
    if code == grpc.StatusCode.NOT_FOUND:  # a LoRA adapter that is not loaded (vLLM's code)
        return ApiError(404, details or "not found", param="model", code="model_not_found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ApiError(400, details or f"{stage} refused the request", code="invalid_request")
    return ApiError(500, f"the {stage} service failed ({code.name})", code="internal_error")


def grpc_status_for(status: int) -> grpc.StatusCode:
    """The gRPC status the public gRPC API answers for an HTTP-style ApiError status."""
    if status == 400:
        return grpc.StatusCode.INVALID_ARGUMENT
    if status == 404:
        return grpc.StatusCode.NOT_FOUND
    if status == 499:
        return grpc.StatusCode.CANCELLED
    if status == 503:
        return grpc.StatusCode.UNAVAILABLE
    if status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL
