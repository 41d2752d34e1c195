"""The aiohttp application: routes, and the middleware at the edge (trace span, request id,
errors, metrics, authentication, admission).

Routes: chat completions and completions under /v1 and the hosted provider's /v1/openai;
models; usage (/v1/usage, /v1/usage/requests); /health (200 only while an engine is
ready); /metrics. /health and /metrics need no key; everything under /v1 needs
`Authorization: Bearer KEY` unless the gateway runs with --no-auth. A generation request
is admitted only while the usage store is up (else 503), its key is within its budget
(else 429 insufficient_quota) and its rate limits (else 429 rate_limit_exceeded); the
rate-limit headers go on every answer to a key that has limits. Every error leaves as
OpenAI's error shape; nothing leaks a trace. Each request logs one access line, and everything
logged while it runs carries its request id (moeserve.obs.logs). On shutdown, `drain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator

from aiohttp import web
from moeserve.aio import wait_for_event
from moeserve.obs import tracing
from moeserve.obs.logs import request_id_var

from gateway.config import ConfigError, GatewayConfig
from gateway.errors import SERVER, ApiError, insufficient_quota, internal, store_unavailable
from gateway.generate import resolve_model
from gateway.handlers import chat_completions, completions
from gateway.keys import KeyDirectory
from gateway.ledger import Ledger
from gateway.limits import RateLimiter
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.pool import EnginePool, ModelCard
from gateway.state import SERVICES, Services, services
from gateway.store import SchemaTooNew, StoreUnavailable, UsageStore, store_for
from gateway.usage_api import usage_records, usage_totals

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLIENT_GONE = 499  # the access log's status of a request whose handler was cancelled (nginx's convention)


class Drain:
    """The requests in flight, and whether the gateway is shutting down. Event loop only.

    Once `draining`, /health answers 503 and new API requests 503 with `Connection: close`;
    `wait` lets the requests in flight finish, `cancel` ends those that outlast the drain
    (their handlers bill what they produced, as aborted)."""

    def __init__(self) -> None:
        self.draining = False
        self._tasks: set[asyncio.Task] = set()  # aiohttp runs each request in a task of its own
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    async def wait(self, timeout: float, cut: asyncio.Event | None = None) -> bool:
        """Until no request is in flight (True), or `timeout` seconds pass or `cut` is set (False)."""
        return await wait_for_event(self._idle, timeout, cut)

    async def cancel(self, timeout: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self.wait(timeout)


DRAIN = web.AppKey("drain", Drain)
CANCEL_WAIT = 5.0  # seconds for cancelled handlers to record their usage


def shutting_down() -> ApiError:
    return ApiError(503, "The gateway is shutting down; retry the request", SERVER, None, "draining",
                    {"Retry-After": "1"})


async def drain(app: web.Application, site: web.BaseSite, timeout: float, cut: asyncio.Event) -> None:
    """SIGTERM/SIGINT: /health and new API requests answer 503 and the listening socket closes,
    at once; the requests in flight run on for up to `timeout` seconds (less if `cut` is set
    again: a second signal), then the rest are cancelled."""
    state = app[DRAIN]
    state.draining = True
    cut.clear()
    await site.stop()
    log.info("draining: %d requests in flight, waiting up to %gs for them", state.in_flight, timeout)
    if await state.wait(timeout, cut):
        log.info("drained: no request in flight")
        return
    log.warning("drain over with %d requests in flight: cancelling them", state.in_flight)
    await state.cancel(CANCEL_WAIT)


def _http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    where = f"{request.method} {request.path}"
    if exc.status == 404:
        return ApiError(404, f"Unknown path: {where}", code="unknown_url")
    if exc.status == 405:
        return ApiError(405, f"Method not allowed: {where}", code="method_not_allowed",
                        headers={"Allow": exc.headers.get("Allow", "")})
    if exc.status == 413:
        return ApiError(413, "The request body is too large", code="request_too_large")
    return ApiError(exc.status, exc.reason or "HTTP error", code=None)


def _error_response(err: ApiError, request_id: str) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers={**err.headers, "X-Request-Id": request_id})


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def traced(request: web.Request, handler) -> web.StreamResponse:
    """The request's HTTP server span, parent of its gRPC calls; outermost, so that it
    sees the status that leaves. Only with tracing on (moeserve.obs.tracing)."""
    if not tracing.enabled():
        return await handler(request)
    route = _route(request)
    span = tracing.http_server_span(request.method, None if route == "unmatched" else route, request.path,
                                    request.scheme, request.headers)
    with tracing.current(span):
        try:
            response = await handler(request)
        finally:
            span.set_attribute("moeserve.request_id", request.get("request_id", ""))
        tracing.set_http_status(span, response.status)
    return response


@web.middleware
async def edge(request: web.Request, handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request["request_id"] = given if REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"
    request_id_var.set(request["request_id"])  # the request's own task: everything it logs carries the id
    drain = request.app[DRAIN]
    start = time.perf_counter()
    try:
        with drain.track():
            if drain.draining and request.path.startswith("/v1/"):
                raise shutting_down()
            response = await handler(request)
    except ApiError as err:
        response = _error_response(err, request["request_id"])
    except web.HTTPException as exc:
        response = _error_response(_http_error(request, exc), request["request_id"])
    except (asyncio.CancelledError, ConnectionResetError):  # the client left, or the drain ran out
        _log_access(request, CLIENT_GONE, start)
        raise
    except Exception:  # noqa: BLE001 - logged with its trace here, answered without it
        log.exception("%s unexpected error", request["request_id"])
        response = _error_response(internal(), request["request_id"])
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request["request_id"])
        if drain.draining:
            response.force_close()  # Connection: close, so that the client's next request goes elsewhere
    m = services(request).metrics
    m.requests.inc(1, route=_route(request), status=str(response.status))
    m.duration.observe(time.perf_counter() - start, route=_route(request))
    _log_access(request, response.status, start)
    return response


def _log_access(request: web.Request, status: int, start: float) -> None:
    """One line per request, after its answer (a stream: after its last event)."""
    ms = round((time.perf_counter() - start) * 1000, 1)
    access_log.info("%s %s %s %d %.1fms", request["request_id"], request.method, request.path, status, ms,
                    extra={"method": request.method, "path": request.path, "status": status, "duration_ms": ms})


@web.middleware
async def auth(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        request["key"] = await services(request).keys.authenticate(request.headers.get("Authorization", ""))
    return await handler(request)


GENERATION = (chat_completions, completions)


@web.middleware
async def admit(request: web.Request, handler) -> web.StreamResponse:
    """Store up, budget, rate limits: checked before a generation request reaches an engine."""
    key = request.get("key")
    if key is None:
        return await handler(request)
    s = services(request)
    request["ratelimit_headers"] = s.limiter.peek(key)
    if request.method == "POST" and request.match_info.route.handler in GENERATION:
        if not s.ledger.healthy:
            raise store_unavailable()
        if s.keys.over_budget(key):
            raise insufficient_quota(key.id, key.budget, s.keys.spent(key))
        state = s.limiter.admit(key)
        request["ratelimit_headers"] = state.headers
        if state.refused is not None:
            raise state.refused
    return await handler(request)


async def ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, streamed or not, error or not, before its headers leave."""
    for name, value in request.get("ratelimit_headers", {}).items():
        response.headers.setdefault(name, value)


def _model_json(card: ModelCard) -> dict:
    return {"id": card.name, "object": "model", "created": card.created, "owned_by": "moeserve",
            "max_model_len": card.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    cards = services(request).pool.models().values()
    return web.json_response({"object": "list", "data": [_model_json(c) for c in cards]})


async def get_model(request: web.Request) -> web.Response:
    return web.json_response(_model_json(resolve_model(services(request).pool, request.match_info["model"])))


async def health(request: web.Request) -> web.Response:
    pool = services(request).pool
    ready = len(pool.ready_replicas())
    status = "draining" if request.app[DRAIN].draining else "ok" if ready else "unavailable"
    body = {"status": status, "engines_ready": ready, "engines": len(pool.replicas)}
    return web.json_response(body, status=200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    s = services(request)
    return web.Response(body=s.metrics.render_pool(s.pool).encode(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", "/v1/openai"):
        app.router.add_post(prefix + "/chat/completions", chat_completions)
        app.router.add_post(prefix + "/completions", completions)
        app.router.add_get(prefix + "/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", get_model)
    app.router.add_get("/v1/usage", usage_totals)
    app.router.add_get("/v1/usage/requests", usage_records)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


async def open_store(cfg: GatewayConfig) -> UsageStore:
    store = store_for(cfg.usage_db)
    try:
        await store.open()
    except (StoreUnavailable, SchemaTooNew) as exc:
        raise ConfigError(f"--usage-db: cannot open the usage store {store!r}: {exc}") from None
    return store


async def build_app(cfg: GatewayConfig) -> web.Application:
    """Must run inside the event loop that serves the app (the pool's gRPC channels bind to it).

    Opens the usage store (applying its migrations) before anything listens."""
    store = await open_store(cfg)
    pool = EnginePool(cfg.engines, cfg.health_interval, cfg.max_backoff)
    keys = KeyDirectory(store, cfg.api_keys, cfg.key_secret, cfg.no_auth, cfg.key_cache_seconds)
    limiter = RateLimiter()
    ledger = Ledger(store, keys, limiter)
    app = web.Application(middlewares=[traced, edge, auth, admit], client_max_size=cfg.max_body_bytes)
    app[SERVICES] = Services(pool, cfg.prices, GatewayMetrics(), store, keys, limiter, ledger, cfg.max_body_bytes)
    app[DRAIN] = Drain()
    add_routes(app)
    app.on_response_prepare.append(ratelimit_headers)

    async def start(_app: web.Application) -> None:
        await pool.start()
        await ledger.start()

    async def close(_app: web.Application) -> None:
        await pool.close()
        await ledger.close()
        await store.close()
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app
