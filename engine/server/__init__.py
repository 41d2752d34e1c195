"""The engine's gRPC server: service Engine, standard health, server reflection."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from moeserve.engine.v1 import engine_pb2, engine_pb2_grpc

from engine.async_engine import AsyncEngine
from engine.engine_process import ServeConfig
from engine.tokenizer import Tokenizer

from .metrics import EngineMetrics, start_metrics_server
from .servicer import EngineServicer

log = logging.getLogger(__name__)
SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


def build_server(engine: AsyncEngine, tokenizer: Tokenizer, name: str, address: str,
                 metrics: EngineMetrics) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    server = grpc.aio.server(options=[
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
    """Starts the engine process, then serves until SIGINT/SIGTERM (returns 0) or until the
    engine process dies (returns 1, after failing the requests in flight), so that a
    supervisor restarts the service instead of leaving a server without an engine.

    Raises EngineStartError when the engine cannot load the model."""
    stop = asyncio.Event()
    engine = AsyncEngine(cfg, on_death=stop.set)
    await engine.start()
    name = cfg.served_model_name or cfg.model.rstrip("/").split("/")[-1]
    metrics = EngineMetrics(name, engine.info.config.num_blocks)
    server, port, health_servicer = build_server(engine, tokenizer, name, f"{cfg.host}:{cfg.port}", metrics)
    metrics_runner = None
    try:
        await server.start()
        if cfg.metrics_port is not None:
            metrics_runner, metrics_port = await start_metrics_server(metrics, engine.stats, cfg.host, cfg.metrics_port)
            print(f"engine metrics on http://{cfg.host}:{metrics_port}/metrics", flush=True)
        for svc in ("", SERVICE):
            await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", name, cfg.host, port)
        print(f"engine serving {name} on {cfg.host}:{port}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        await engine.stop()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    return 1 if engine.dead is not None else 0
