"""Reading a JSON request body field by field, with errors that name the param.

`Fields` wraps one JSON object: each accessor marks its key as read and checks its type
and range; `done()` refuses whatever was left unread, so no field is silently ignored.
JSON null reads as absent, as in OpenAI's API. Params are written as OpenAI writes them:
`messages[0].content`, `stream_options.include_usage`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway.errors import ApiError, invalid, unsupported

_KINDS = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
          dict: "an object", type(None): "null"}


def kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """The body as JSON; NaN and Infinity (which Python would accept) are malformed too."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", param=None, code="invalid_json") from None


class Fields:
    def __init__(self, obj: Any, path: str = "") -> None:
        if not isinstance(obj, dict):
            raise invalid(path or None, f"must be a JSON object, got {kind(obj)}", "invalid_type")
        self.obj, self.path, self.read = obj, path, set()

    def param(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def raw(self, key: str) -> Any:
        self.read.add(key)
        return self.obj.get(key)

    def _typed(self, key: str, types: tuple[type, ...], what: str, required: bool) -> Any:
        value = self.raw(key)
        if value is None:
            if required:
                raise invalid(self.param(key), "is required", "missing_required_parameter")
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise invalid(self.param(key), f"must be {what}, got {kind(value)}", "invalid_type")
        return value

    def string(self, key: str, required: bool = False, non_empty: bool = False) -> str | None:
        value = self._typed(key, (str,), "a string", required)
        if non_empty and value == "":
            raise invalid(self.param(key), "must not be empty", "invalid_value")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self._typed(key, (bool,), "a boolean", False)
        return default if value is None else value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self._typed(key, (int,), "an integer", False)
        if value is None:
            return default
        check_range(value, lo, hi, self.param(key))
        return value

    def number(self, key: str, lo: float, hi: float, default: float | None = None,
               open_lo: bool = False) -> float | None:
        value = self._typed(key, (int, float), "a number", False)
        if value is None:
            return default
        if not math.isfinite(value) or value < lo or value > hi or open_lo and value == lo:
            raise invalid(self.param(key), f"must be in {'(' if open_lo else '['}{lo}, {hi}], got {value}",
                          "invalid_value")
        return float(value)

    def array(self, key: str, required: bool = False, non_empty: bool = False) -> list | None:
        value = self._typed(key, (list,), "an array", required)
        if non_empty and value == []:
            raise invalid(self.param(key), "must not be empty", "invalid_value")
        return value

    def object(self, key: str) -> Fields | None:
        value = self._typed(key, (dict,), "an object", False)
        return None if value is None else Fields(value, self.param(key))

    def only(self, key: str, allowed: tuple[Any, ...], what: str) -> Any:
        """A known field we honour only at its no-op values: null or one of `allowed`."""
        value = self.raw(key)
        if value is not None and value not in allowed:
            raise unsupported(self.param(key), what)
        return value

    def refuse(self, keys: dict[str, str]) -> None:
        """Known fields we cannot honour at all: any non-null value is 400 'not supported yet'."""
        for key, what in keys.items():
            self.only(key, (), what)

    def done(self) -> None:
        for key in self.obj:
            if key not in self.read:
                raise ApiError(400, f"Unknown parameter: '{self.param(key)}'", param=self.param(key),
                               code="unknown_parameter")


def check_range(value: int, lo: int, hi: int, param: str) -> None:
    if not lo <= value <= hi:
        raise invalid(param, f"must be in [{lo}, {hi}], got {value}", "invalid_value")


def item_param(path: str, i: int) -> str:
    return f"{path}[{i}]"
