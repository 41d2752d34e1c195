"""Errors that are part of the engine's interface; the gRPC server maps each to a status."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is invalid (gRPC INVALID_ARGUMENT). `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses the engine process boundary
        return InvalidRequest, (self.field, self.message)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (gRPC RESOURCE_EXHAUSTED)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step this request was the largest part of; the
    request ends, the others go on (gRPC RESOURCE_EXHAUSTED)."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an internal error (gRPC INTERNAL / UNAVAILABLE)."""
