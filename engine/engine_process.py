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
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
from moeserve.obs.logs import FORMATS, configure_logging

from engine.attention.base import KV_CACHE_DTYPES
from engine.core import EngineConfig, EngineCore, EngineStats
from engine.distributed import ParallelConfig, ParallelState, destroy
from engine.distributed.launch import init_rank, rank_device
from engine.errors import EngineDead
from engine.kv_sizing import CudaMemory, KVCacheSpec, size_kv_cache
from engine.model.fp4_experts import ExpertQuantization
from engine.parallel_loop import RankLoop, apply_message
from engine.request import RequestOutput
from engine.runner import ModelRunner
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
    kv_cache_memory_gib: float | None = 1.0  # KV cache per rank; None: sized by gpu_memory_utilization (CUDA)
    gpu_memory_utilization: float = field(default=0.9, kw_only=True)  # of each GPU: weights, steps, KV cache
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
    parallel: ParallelConfig = ParallelConfig()  # the ranks this engine spans (one process each)
    moe_dispatch: str = "auto"  # how MoE layers reach other ranks' experts: auto, allgather, alltoall
    kv_cache_dtype: str = "auto"  # the latent cache: "auto" (the model dtype) or "fp8_e4m3" (half of bf16's bytes)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        _ = self.kv_cache_spec  # built once here to validate --kv-cache-memory and --gpu-memory-utilization
        if self.kv_cache_memory_gib is None and torch.device(self.device).type != "cuda":
            raise ValueError("--gpu-memory-utilization sizes the KV cache from a GPU's memory; "
                             "on the CPU give --kv-cache-memory GIB")
        if self.max_model_len < 0 or self.block_size < 1:
            raise ValueError("--max-model-len must be >= 0 and --block-size >= 1")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_waiting)  # validates
        ExpertQuantization.parse(self.quantization)  # validates
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"--drain-timeout must be a number of seconds >= 0, got {self.drain_timeout}")
        if self.moe_dispatch not in ("auto", "allgather", "alltoall"):
            raise ValueError(f"--moe-dispatch must be auto, allgather or alltoall, got {self.moe_dispatch!r}")
        if self.moe_dispatch == "alltoall" and not self.parallel.enable_expert_parallel:
            raise ValueError("--moe-dispatch alltoall needs --enable-expert-parallel")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.log_format not in FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {self.log_format!r}")

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.block_size, self.max_num_batched_tokens, self.max_num_seqs, self.kv_cache_memory_gib,
                           self.gpu_memory_utilization)


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    config: EngineConfig  # of one data-parallel group (each has its own KV cache of this size)
    vocab_size: int
    dtype: str
    device: str
    data_parallel_size: int = 1

    @property
    def total_blocks(self) -> int:
        """KV blocks of every data-parallel group together."""
        return self.config.num_blocks * self.data_parallel_size


def engine_config(cfg: ServeConfig, model, num_blocks: int) -> EngineConfig:
    """The engine on a pool of `num_blocks` (engine.kv_sizing); the context from model and pool."""
    mc = model.cfg
    limit = min(mc.max_position_embeddings, num_blocks * cfg.block_size)
    if cfg.max_model_len > limit:
        raise ValueError(f"--max-model-len {cfg.max_model_len} exceeds what the model and KV cache allow ({limit})")
    sched = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting)
    return EngineConfig(cfg.max_model_len or limit, num_blocks, cfg.block_size, sched, cfg.enable_prefix_caching,
                        cuda_graphs=not cfg.enforce_eager)


def engine_main(cfg: ServeConfig, inbox, outbox: Connection) -> None:
    """Entry point of the engine process (global rank 0 of a parallel engine)."""
    # The server process decides when to stop: a signal to the whole process group (Ctrl-C,
    # systemd's default KillMode) must start its drain, not kill the engine under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("INFO", cfg.log_format)
    mailbox = Mailbox(inbox, outbox)
    try:
        state = _join(cfg, 0)
        core = _build(cfg, *_load_sized(cfg, state))
        state.wait_loaded()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        outbox.send(("failed", str(exc)))
        return
    outbox.send(("ready", EngineInfo(core.config, core.model.cfg.vocab_size,
                                     str(core.model.dtype).removeprefix("torch."), str(core.model.device),
                                     cfg.parallel.data_parallel_size)))
    try:
        if state.world_size == 1:
            _EngineLoop(core, mailbox).run()
        else:
            _run_parallel(RankLoop(state, core.runner, core, mailbox))
    except (BrokenPipeError, EOFError):
        pass  # the server is gone


def rank_main(cfg: ServeConfig, rank: int) -> None:
    """Entry point of every other rank of a parallel engine: it loads its part of the model,
    then follows rank 0's steps until told to stop. Exits non-zero when a peer is lost."""
    # Signals go to whoever launched the ranks (the server, a node's launcher, torchrun); this
    # rank ends when rank 0 says stop, or when a collective with a lost peer fails.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("INFO", cfg.log_format)
    state = _join(cfg, rank)
    log.info("rank %d of %d (pid %d) joined: TP rank %d, DP rank %d", rank, state.world_size, os.getpid(),
             state.tp_rank, state.dp_rank)
    model, num_blocks = _load_sized(cfg, state)
    if state.is_dp_head:  # schedules and samples for its DP group
        core = _build(cfg, model, num_blocks)
        runner = core.runner
    else:
        runner = ModelRunner(model, None, num_blocks, block_size=cfg.block_size)
        core = None
    state.wait_loaded()
    _run_parallel(RankLoop(state, runner, core))


def node_rank_main(rank: int, cfg: ServeConfig) -> None:
    """rank_main as `run_node` (engine.distributed.launch) calls it: rank first."""
    rank_main(cfg, rank)


def _run_parallel(loop: RankLoop) -> None:
    try:
        loop.run()
    except (RuntimeError, OSError) as exc:  # a collective failed: a peer died or hung
        log.error("rank %d lost its peers, exiting: %s", loop.state.rank, str(exc).splitlines()[0] if str(exc) else exc)
        raise SystemExit(EXIT_RANK_LOST) from None
    finally:
        destroy()


EXIT_RANK_LOST = 3


def _join(cfg: ServeConfig, rank: int) -> ParallelState:
    if not cfg.parallel.parallel:
        return ParallelState.single()
    device = rank_device(cfg.parallel, rank, torch.device(cfg.device).type)
    return init_rank(cfg.parallel, rank, device)


def _load(cfg: ServeConfig, state: ParallelState):
    from engine.loader import load_model

    device = cfg.device if state.world_size == 1 else str(rank_device(cfg.parallel, state.rank,
                                                                      torch.device(cfg.device).type))
    model = load_model(cfg.model, dtype=cfg.dtype, device=device, quantization=cfg.quantization,
                       parallel=state, moe_dispatch=cfg.moe_dispatch, progress=state.rank == 0)
    model.set_kv_cache_dtype(cfg.kv_cache_dtype)  # before the cache is sized: FP8 blocks are half the bytes
    return model


def _load_sized(cfg: ServeConfig, state: ParallelState):
    """This rank's part of the model, and the KV blocks every rank agreed on (sized by a
    profiled step, which all ranks run together once all have loaded, unless
    --kv-cache-memory names the size)."""
    memory = None
    if cfg.kv_cache_memory_gib is None:  # before loading: what the device holds already is not ours
        memory = CudaMemory(cfg.device if state.world_size == 1
                            else rank_device(cfg.parallel, state.rank, torch.device(cfg.device).type))
    model = _load(cfg, state)
    if memory is not None:
        state.wait_loaded()
    size = size_kv_cache(cfg.kv_cache_spec, model, state, memory)
    if state.rank == 0:
        log.info("%s", size.describe(cfg.parallel.data_parallel_size))
    return model, size.num_blocks


def _build(cfg: ServeConfig, model, num_blocks: int) -> EngineCore:
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(cfg.model, cfg.chat_template)
    return EngineCore(model, tokenizer, engine_config(cfg, model, num_blocks))


class Mailbox:
    """The engine's side of its link to the server: requests in, outputs out."""

    def __init__(self, inbox, outbox: Connection) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.parent = os.getppid()

    def receive(self, wait: float | None) -> list | None:
        """Everything waiting in the inbox, after waiting up to `wait` seconds for a first
        message (0: not at all; None: until one comes). None when told to stop or orphaned."""
        deadline = None if wait is None else time.monotonic() + wait
        messages: list = []
        while not messages:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            try:
                messages.append(self.inbox.get(timeout=min(1.0, left)))
            except queue.Empty:
                if os.getppid() != self.parent:
                    return None
        while True:
            if messages and messages[-1] is None:
                return None
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def send(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self.outbox.send(("step", outputs, stats))


class _EngineLoop:
    """The one-process loop: wait for work, step while there is some."""

    def __init__(self, core: EngineCore, mailbox: Mailbox) -> None:
        self.core, self.mailbox = core, mailbox

    def run(self) -> None:
        while True:
            messages = self.mailbox.receive(None if not self.core.has_work else 0.0)
            if messages is None:
                return
            outputs = [out for msg in messages for out in apply_message(self.core, msg)]
            if self.core.has_work:
                outputs += self._step()
            if messages or outputs:
                self.mailbox.send(outputs, self.core.stats())

    def _step(self) -> list[RequestOutput]:
        try:
            return self.core.step()
        except Exception as exc:  # e.g. out of memory: end the requests in flight, keep serving
            log.exception("engine step failed; failing the running requests")
            return self.core.fail_all(EngineDead(f"engine step failed: {exc}"))


__all__ = ["EngineInfo", "EngineStats", "ServeConfig", "engine_config", "engine_main", "rank_main"]
