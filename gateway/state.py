"""What the request handlers share: the pool, prices, metrics, keys, limits, ledger. One per app."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.keys import KeyDirectory
from gateway.ledger import Ledger
from gateway.limits import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.pool import EnginePool
from gateway.pricing import PriceBook
from gateway.store import UsageStore


@dataclass(frozen=True)
class Services:
    pool: EnginePool
    prices: PriceBook
    metrics: GatewayMetrics
    store: UsageStore
    keys: KeyDirectory
    limiter: RateLimiter
    ledger: Ledger
    max_body_bytes: int


SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
