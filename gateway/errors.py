"""Errors at the HTTP edge, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see is an `ApiError`; handlers raise it and one middleware
writes it. The engine's gRPC statuses are translated here too (`from_rpc_error`), so the
mapping from engine to HTTP lives in one place.
"""

from __future__ import annotations

import grpc

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
INSUFFICIENT_QUOTA = "insufficient_quota"


class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    """400 for one request field; `message` reads after the param's name."""
    return ApiError(400, f"{param}: {message}" if param else message, INVALID_REQUEST, param, code)


def unsupported(param: str, what: str) -> ApiError:
    """400 for a known field at a value we cannot honour yet; `what` names both."""
    return ApiError(400, f"{what} is not supported yet", INVALID_REQUEST, param, "unsupported_value")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist or is not served here", INVALID_REQUEST, "model",
                    "model_not_found")


def no_engine(detail: str = "no engine is ready") -> ApiError:
    return ApiError(503, f"Service unavailable: {detail}; retry shortly", SERVER, None, "engine_unavailable",
                    {"Retry-After": "1"})


def overloaded(detail: str) -> ApiError:
    return ApiError(429, f"The engines' queues are full ({detail}); retry shortly", RATE_LIMIT, None,
                    "rate_limit_exceeded", {"Retry-After": "1"})


def store_unavailable() -> ApiError:
    """The usage store cannot take records: nothing runs unbilled."""
    return ApiError(503, "usage store unavailable: requests are not served while they cannot be billed; retry shortly",
                    SERVER, None, "usage_store_unavailable", {"Retry-After": "1"})


def insufficient_quota(key_id: str, budget: object, spent: object) -> ApiError:
    return ApiError(429, f"You exceeded your current quota: key {key_id} has spent ${spent} of its ${budget} budget",
                    INSUFFICIENT_QUOTA, None, INSUFFICIENT_QUOTA)


def context_exceeded(param: str, message: str) -> ApiError:
    return ApiError(400, message, INVALID_REQUEST, param, "context_length_exceeded")


def internal(message: str = "internal error") -> ApiError:
    return ApiError(500, message, SERVER, None, "internal_error")


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError, params: dict[str, str]) -> ApiError:
    """Maps an engine status to the HTTP error; `params` renames engine fields to request params.

    INVALID_ARGUMENT carries "FIELD: message" (the engine's convention); a prompt that does
    not fit the context becomes context_length_exceeded.
    """
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(": ")
        param = params.get(field, field)
        if field == "prompt" and "context" in message or field == "max_tokens" and "exceeds" in message:
            return context_exceeded(param, f"{param}: {message}")
        return invalid(param, message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return overloaded(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return no_engine(f"the engine is unavailable ({details})")
    return internal(f"the engine failed: {code.name}: {details}".splitlines()[0])
