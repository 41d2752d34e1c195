"""The engine loop in a process of its own.

The model's step loop and the gRPC server used to share one Python process, and so one
GIL: every torch op hands the GIL over and must win it back from the event loop, and at a
few hundred ops per step the loop lost about half its throughput to that. Here the child
process owns model, cache and scheduler and never waits for anyone; the server process
speaks gRPC, tokenizes and validates. Between them (typed messages, pickled):

    server -> engine   multiprocessing.Queue of ("add", EngineRequest) | ("abort", id) | None (stop)
    engine -> server   Pipe of ("ready", EngineInfo) | ("failed", message) once, then
                       ("step", [RequestOutput], EngineStats) after every step or inbox batch

The child exits when told to, when its pipe breaks, or when its parent disappears.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

from moeserve.obs.logs import FORMATS, configure_logging

from engine.core import EngineConfig, EngineCore, EngineStats
from engine.errors import EngineDead
from engine.model.fp4_experts import ExpertQuantization
from engine.request import RequestOutput
from engine.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "0.0.0.0"
    port: int = 50051
    dtype: str = "auto"
    device: str = "cpu"
    served_model_name: str = ""
    max_model_len: int = 0  # 0: the model's own limit, capped by the KV cache
    kv_cache_memory_gib: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    block_size: int = 16
    chat_template: str | None = None
    enable_prefix_caching: bool = True
    quantization: str | None = None  # routed experts quantized at load: None, "nvfp4" or "mxfp4"
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on host:port; None = off, 0 = any free port
    drain_timeout: float = 30.0  # seconds that requests in flight may run on after SIGTERM/SIGINT
    log_format: str = "text"  # "text" or "json" (moeserve.obs.logs), in both processes
    enforce_eager: bool = False  # no CUDA graphs for decode steps (they are recorded by default on CUDA)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_gib}")
        if self.max_model_len < 0 or self.block_size < 1:
            raise ValueError("--max-model-len must be >= 0 and --block-size >= 1")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_waiting)  # validates
        ExpertQuantization.parse(self.quantization)  # validates
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"--drain-timeout must be a number of seconds >= 0, got {self.drain_timeout}")
        if self.log_format not in FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {self.log_format!r}")


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    config: EngineConfig
    vocab_size: int
    dtype: str
    device: str


def engine_config(cfg: ServeConfig, model) -> EngineConfig:
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
    return EngineConfig(cfg.max_model_len or limit, num_blocks, cfg.block_size, sched, cfg.enable_prefix_caching,
                        cuda_graphs=not cfg.enforce_eager)


def engine_main(cfg: ServeConfig, inbox, outbox: Connection) -> None:
    """Entry point of the engine process."""
    # The server process decides when to stop: a signal to the whole process group (Ctrl-C,
    # systemd's default KillMode) must start its drain, not kill the engine under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("INFO", cfg.log_format)
    try:
        core = _build(cfg)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        outbox.send(("failed", str(exc)))
        return
    outbox.send(("ready", EngineInfo(core.config, core.model.cfg.vocab_size,
                                     str(core.model.dtype).removeprefix("torch."), str(core.model.device))))
    try:
        _EngineLoop(core, inbox, outbox).run()
    except (BrokenPipeError, EOFError):
        pass  # the server is gone


def _build(cfg: ServeConfig) -> EngineCore:
    from engine.loader import load_model
    from engine.tokenizer import Tokenizer

    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization)
    tokenizer = Tokenizer.from_dir(cfg.model, cfg.chat_template)
    return EngineCore(model, tokenizer, engine_config(cfg, model))


class _EngineLoop:
    def __init__(self, core: EngineCore, inbox, outbox: Connection) -> None:
        self.core, self.inbox, self.outbox = core, inbox, outbox
        self.parent = os.getppid()

    def run(self) -> None:
        while True:
            messages = self._receive(block=not self.core.has_work)
            if messages is None:
                return
            outputs = [out for msg in messages for out in self._handle(msg)]
            if self.core.has_work:
                outputs += self._step()
            if messages or outputs:
                self.outbox.send(("step", outputs, self.core.stats()))

    def _receive(self, block: bool) -> list | None:
        """Everything waiting in the inbox; None when told to stop or orphaned."""
        messages = []
        while True:
            try:
                msg = self.inbox.get(timeout=1.0) if block and not messages else self.inbox.get_nowait()
            except queue.Empty:
                if block and not messages and os.getppid() != self.parent:
                    return None
                if messages or not block:
                    return messages
                continue
            if msg is None:
                return None
            messages.append(msg)

    def _handle(self, msg) -> list[RequestOutput]:
        kind, arg = msg
        if kind == "abort":
            out = self.core.abort(arg)
            return [out] if out else []
        try:
            self.core.add(arg)
        except Exception as exc:  # validated by the server already; never let one request stop the loop
            return [RequestOutput(arg.request_id, [], finished=True, error=exc)]
        return []

    def _step(self) -> list[RequestOutput]:
        try:
            return self.core.step()
        except Exception as exc:  # e.g. out of memory: end the requests in flight, keep serving
            log.exception("engine step failed; failing the running requests")
            return self.core.fail_all(EngineDead(f"engine step failed: {exc}"))


__all__ = ["EngineInfo", "EngineStats", "ServeConfig", "engine_config", "engine_main"]
