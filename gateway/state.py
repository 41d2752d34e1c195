"""What the request handlers share: the pool, prices, metrics, limits. One per app."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.metrics import GatewayMetrics
from gateway.pool import EnginePool
from gateway.pricing import PriceBook


@dataclass(frozen=True)
class Services:
    pool: EnginePool
    prices: PriceBook
    metrics: GatewayMetrics
    api_keys: tuple[bytes, ...]  # empty: authentication is off (--no-auth)
    max_body_bytes: int


SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
