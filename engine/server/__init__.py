"""The engine's gRPC server: service Engine, standard health, server reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from moeserve.engine.v1 import engine_pb2, engine_pb2_grpc

from engine.async_engine import AsyncEngine
from engine.core import EngineConfig, EngineCore
from engine.model import DeepseekV3ForCausalLM
from engine.scheduler import SchedulerConfig
from engine.tokenizer import Tokenizer

from .servicer import EngineServicer

log = logging.getLogger(__name__)
SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "0.0.0.0"
    port: int = 50051
    dtype: str = "auto"
    device: str = "auto"
    served_model_name: str = ""
    max_model_len: int = 0  # 0: the model's own limit, capped by the KV cache
    kv_cache_memory_gib: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    block_size: int = 16
    chat_template: str | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_gib}")
        if self.max_model_len < 0 or self.block_size < 1:
            raise ValueError("--max-model-len must be >= 0 and --block-size >= 1")


def engine_config(cfg: ServeConfig, model: DeepseekV3ForCausalLM) -> EngineConfig:
    """Sizes the block pool from the memory budget and the context from model and pool."""
    mc = model.cfg
    block_bytes = mc.num_hidden_layers * cfg.block_size * mc.kv_cache_dim * model.dtype.itemsize
    num_blocks = int(cfg.kv_cache_memory_gib * 2**30 // block_bytes)
    if num_blocks < 1:
        raise ValueError(f"--kv-cache-memory {cfg.kv_cache_memory_gib} GiB holds no block of {block_bytes} bytes")
    limit = min(mc.max_position_embeddings, num_blocks * cfg.block_size)
    if cfg.max_model_len > limit:
        raise ValueError(f"--max-model-len {cfg.max_model_len} exceeds what the model and KV cache allow ({limit})")
    sched = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting)
    return EngineConfig(cfg.max_model_len or limit, num_blocks, cfg.block_size, sched, cfg.enable_prefix_caching)


def build_server(engine: AsyncEngine, name: str, address: str) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine, name), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    return server, port, health_servicer


async def serve(cfg: ServeConfig, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer,
                ready: asyncio.Future | None = None) -> None:
    """Serves until SIGINT/SIGTERM (or cancellation); `ready` receives the bound port."""
    engine = AsyncEngine(EngineCore(model, tokenizer, engine_config(cfg, model)))
    engine.start()
    name = cfg.served_model_name or cfg.model.rstrip("/").split("/")[-1]
    server, port, health_servicer = build_server(engine, name, f"{cfg.host}:{cfg.port}")
    await server.start()
    for svc in ("", SERVICE):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", name, cfg.host, port)
    print(f"engine serving {name} on {cfg.host}:{port}", flush=True)
    if ready is not None:
        ready.set_result(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        await engine.stop()
