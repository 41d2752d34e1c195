"""The pool of engine replicas: who is ready, what they serve, and where the next request goes.

Each replica has one gRPC channel and one watcher task. The watcher asks grpc.health.v1
whether the Engine service is SERVING and, when it is, refreshes the replica's ModelInfo
(served model name, context length); every `interval` while ready, with exponential
backoff while not. A call that fails with UNAVAILABLE takes the replica out at once
(`mark_down`) and wakes its watcher, so a dead engine leaves within one request and
returns on its first healthy check.

Choice: among ready replicas serving the model, the one with the fewest outstanding
requests (ties: the first listed). All state is touched from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
ENGINE_SERVICE = pb.DESCRIPTOR.services_by_name["Engine"].full_name
CHANNEL_OPTIONS = [
    # Reconnect quickly to an engine that restarts (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True)
class ModelCard:
    """What a replica serves, from its ModelInfo."""

    name: str
    max_model_len: int
    max_top_logprobs: int
    created: int  # when the gateway first saw it (unix seconds), for /v1/models


class Replica:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.EngineStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.ready = False
        self.card: ModelCard | None = None
        self.info: pb.ModelInfo | None = None  # the last ModelInfo it answered (load, KV cache use)
        self.outstanding = 0
        self.wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"Replica({self.address}, ready={self.ready}, outstanding={self.outstanding})"


class EnginePool:
    def __init__(self, addresses: tuple[str, ...], interval: float = 1.0, max_backoff: float = 5.0) -> None:
        self.replicas = [Replica(a) for a in addresses]
        self.interval, self.max_backoff = interval, max_backoff
        self._tasks: list[asyncio.Task] = []
        self._first_seen: dict[str, int] = {}

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(r), name=f"watch {r.address}") for r in self.replicas]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(r.channel.close() for r in self.replicas), return_exceptions=True)

    # -- state ------------------------------------------------------------------------

    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.ready]

    def models(self) -> dict[str, ModelCard]:
        """Models served by at least one ready replica; the smallest context wins."""
        out: dict[str, ModelCard] = {}
        for r in self.ready_replicas():
            if r.card.name not in out or r.card.max_model_len < out[r.card.name].max_model_len:
                out[r.card.name] = r.card
        return out

    def pick(self, model: str, exclude: set[Replica] = frozenset()) -> Replica | None:
        candidates = [r for r in self.ready_replicas() if r.card.name == model and r not in exclude]
        return min(candidates, key=lambda r: r.outstanding, default=None)

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.ready:
            log.warning("engine %s left the pool: %s", replica.address, reason)
        replica.ready = False
        replica.wake.set()

    # -- health -----------------------------------------------------------------------

    async def _check(self, r: Replica) -> None:
        """Raises grpc.RpcError or ValueError when the replica is not ready to serve."""
        timeout = max(1.0, self.interval)
        reply = await r.health.Check(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE), timeout=timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ValueError(f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        info = await r.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        created = self._first_seen.setdefault(info.served_model_name, int(time.time()))
        r.info = info
        r.card = ModelCard(info.served_model_name, info.max_model_len, info.capabilities.max_top_logprobs, created)

    async def _watch(self, r: Replica) -> None:
        backoff = self.interval / 10
        while True:
            try:
                await self._check(r)
                if not r.ready:
                    log.info("engine %s is ready, serving %s", r.address, r.card.name)
                r.ready, backoff, delay = True, self.interval / 10, self.interval
            except (grpc.RpcError, ValueError) as exc:
                self.mark_down(r, _reason(exc))
                delay, backoff = backoff, min(backoff * 2, self.max_backoff)
            r.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(r.wake.wait(), delay)


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
