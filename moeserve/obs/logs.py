"""Logs of both services: plain text for a terminal, or one JSON object per line for a log
collector, each record carrying the id of the request it was logged in.

`request_id_var` holds the id of the request being served by the current asyncio task:
the gateway's edge middleware sets it (X-Request-Id, or one it made up), the engine's gRPC
interceptor sets it from the `x-request-id` metadata the gateway sends. A JSON line holds
`time` (ISO 8601, UTC), `level`, `logger`, `message`, `request_id` when there is one, the
fields passed as `extra=`, and `exception` with its traceback when one is logged.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# What every LogRecord has; anything else on a record came from `extra=` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                  "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        out.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRS and k != "request_id")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str | int = "INFO", fmt: str = "text") -> None:
    """Sends the root logger's records to stderr as `fmt` ("text" or "json") says,
    replacing any handler set before."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
