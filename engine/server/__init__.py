"""The engine's gRPC server: service Engine, standard health, server reflection; and its
life: serve until a signal, then drain.

Drain (SIGTERM or SIGINT): health turns NOT_SERVING and new generation calls are refused
with UNAVAILABLE at once, so gateways route elsewhere; requests in flight run to their end
for up to `--drain-timeout` seconds, after which the rest are aborted (their streams end
with finish reason ABORT and the usage so far); then the server stops and serve returns 0.
A second signal during the drain cuts it short the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from moeserve.engine.v1 import engine_pb2_grpc
from moeserve.obs.logs import request_id_var

from engine.async_engine import AsyncEngine
from engine.engine_process import ServeConfig
from engine.tokenizer import Tokenizer

from .metrics import EngineMetrics, start_metrics_server
from .servicer import SERVICE, EngineServicer

log = logging.getLogger(__name__)
ABORT_WAIT = 5.0  # seconds for aborted requests to end before their calls are cancelled


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Puts the caller's `x-request-id` metadata (the gateway's request id) into the context
    the RPC's handler runs in, so that what it logs carries the id."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        for key, value in details.invocation_metadata or ():
            if key == "x-request-id" and isinstance(value, str):
                request_id_var.set(value)
        return await continuation(details)


def build_server(engine: AsyncEngine, tokenizer: Tokenizer, name: str, address: str,
                 metrics: EngineMetrics) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    server = grpc.aio.server(interceptors=[RequestIdInterceptor()], options=[
        ("grpc.max_receive_message_length", 64 << 20),
        # let clients (the gateway) detect a hung engine with keepalive pings, even when idle
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ])
    engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine, tokenizer, name, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    return server, port, health_servicer


async def serve(cfg: ServeConfig, tokenizer: Tokenizer) -> int:
    """Starts the engine process, then serves until SIGINT/SIGTERM (drains, then returns 0)
    or until the engine process dies (returns 1 at once, after failing the requests in
    flight), so that a supervisor restarts the service instead of leaving a server without
    an engine.

    Raises EngineStartError when the engine cannot load the model."""
    stop = asyncio.Event()
    engine = AsyncEngine(cfg, on_death=stop.set)
    await engine.start()
    name = cfg.served_model_name or cfg.model.rstrip("/").split("/")[-1]
    metrics = EngineMetrics(name, engine.info.total_blocks)
    server, port, health_servicer = build_server(engine, tokenizer, name, f"{cfg.host}:{cfg.port}", metrics)
    metrics_runner = None
    try:
        await server.start()
        if cfg.metrics_port is not None:
            metrics_runner, metrics_port = await start_metrics_server(metrics, engine.stats, cfg.host, cfg.metrics_port)
            print(f"engine metrics on http://{cfg.host}:{metrics_port}/metrics", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # before anyone is told we serve: a signal then drains
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        for svc in ("", SERVICE):
            await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", name, cfg.host, port)
        print(f"engine serving {name} on {cfg.host}:{port}", flush=True)
        await stop.wait()
        if engine.dead is None:
            await drain(engine, health_servicer, cfg.drain_timeout, stop)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        await engine.stop()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    return 1 if engine.dead is not None else 0


async def drain(engine: AsyncEngine, health_servicer: health.aio.HealthServicer, timeout: float,
                cut: asyncio.Event) -> None:
    """Refuses new work at once, lets the requests in flight run for up to `timeout` seconds
    (less if `cut` is set again: a second signal, or the engine dying), then aborts the rest
    and waits briefly for their final messages."""
    await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING, for good
    engine.draining = True
    cut.clear()
    log.info("draining: %d requests in flight, waiting up to %gs for them", engine.in_flight, timeout)
    if await engine.wait_idle(timeout, cut):
        log.info("drained: no request in flight")
        return
    log.warning("drain over with %d requests in flight: aborting them", engine.in_flight)
    engine.abort_all()
    await engine.wait_idle(ABORT_WAIT)  # aborts land at the engine's next step boundary
