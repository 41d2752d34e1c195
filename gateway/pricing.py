"""Prices per model and the estimated cost of a request, in Decimal.

Prices file (JSON), every price in dollars per million tokens, as a string or a number:

    {"default": {"input_per_million": "1.00", "output_per_million": "3.00"},
     "models": {"NAME": {"input_per_million": "1.00", "output_per_million": "3.00",
                         "cached_input_per_million": "0.25"}}}

"default" is optional (it defaults to $1.00 in / $3.00 out) and prices every model not
listed; each entry needs the input and output prices, its cached-input price is optional:
without it, cached prompt tokens cost the input price.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

MILLION = Decimal(1_000_000)


class PricesError(ValueError):
    """The prices file is unreadable or malformed; the message says where."""


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens."""

    input_per_million: Decimal = Decimal("1.00")
    output_per_million: Decimal = Decimal("3.00")
    cached_input_per_million: Decimal | None = None

    def __post_init__(self) -> None:
        for name in ("input_per_million", "output_per_million", "cached_input_per_million"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Decimal) or not value.is_finite() or value < 0):
                raise PricesError(f"{name} must be a non-negative number, got {value!r}")

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
        """prompt x input + completion x output; cached prompt tokens at the cached price when set."""
        cached = min(cached_tokens, prompt_tokens) if self.cached_input_per_million is not None else 0
        total = ((prompt_tokens - cached) * self.input_per_million + completion_tokens * self.output_per_million
                 + cached * (self.cached_input_per_million or 0))
        return total / MILLION


@dataclass(frozen=True)
class PriceBook:
    default: Price = Price()
    models: dict[str, Price] = field(default_factory=dict)

    def for_model(self, model: str) -> Price:
        return self.models.get(model, self.default)


def cost_number(cost: Decimal) -> float | int:
    """The cost as a JSON number: exact for up to 15 significant digits, which any cost has."""
    normal = cost.normalize()
    return int(normal) if normal == normal.to_integral_value() else float(normal)


def _price(obj: object, where: str) -> Price:
    if not isinstance(obj, dict):
        raise PricesError(f"{where} must be an object")
    known = {"input_per_million", "output_per_million", "cached_input_per_million"}
    if unknown := set(obj) - known:
        raise PricesError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(known))})")
    if missing := {"input_per_million", "output_per_million"} - set(obj):
        raise PricesError(f"{where}: {sorted(missing)[0]} is required")
    values = {}
    for key, raw in obj.items():
        if isinstance(raw, bool) or not isinstance(raw, (str, int, Decimal)):
            raise PricesError(f"{where}.{key} must be a number or a numeric string")
        try:
            values[key] = Decimal(str(raw))
        except InvalidOperation:
            raise PricesError(f"{where}.{key} is not a number: {raw!r}") from None
    try:
        return Price(**values)
    except PricesError as exc:
        raise PricesError(f"{where}: {exc}") from None


def load_prices(path: Path) -> PriceBook:
    try:
        data = json.loads(path.read_text(), parse_float=Decimal)
    except (OSError, UnicodeDecodeError) as exc:
        raise PricesError(f"cannot read prices file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PricesError(f"prices file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"default", "models"}:
        raise PricesError(f"prices file {path} must be an object with keys 'models' and optionally 'default'")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise PricesError(f"prices file {path}: 'models' must be an object of model name to prices")
    default = _price(data["default"], "default") if "default" in data else Price()
    return PriceBook(default, {name: _price(p, f"models.{name}") for name, p in models.items()})
