"""Runs `EngineCore` on its own thread and streams its outputs into asyncio.

The loop thread owns the core: only it touches scheduler, cache and model. asyncio
callers talk to it through a thread-safe inbox (add / abort), and outputs come back
through `loop.call_soon_threadsafe`, once per step for all requests, so the event loop
(and the gRPC server on it) stays responsive while the model computes. torch releases the
GIL inside its kernels, so the two threads overlap.

Cancellation: when the consumer of `generate` stops (client disconnect, deadline), the
request is aborted at the next step boundary and its blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.core import EngineCore
from engine.errors import EngineDead, QueueFull
from engine.request import EngineRequest, RequestOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    used_blocks: int
    total_blocks: int


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pending = 0  # requests accepted but not yet finished; guarded by the GIL's atomic ops
        self.dead: Exception | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread:
            await asyncio.to_thread(self._thread.join)

    def stats(self) -> EngineStats:
        sched, cfg = self.core.scheduler, self.core.config
        return EngineStats(len(sched.waiting), len(sched.running), cfg.num_blocks - self.core.kv.num_free_blocks,
                           cfg.num_blocks)

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until its last one (finished, with usage).

        Raises InvalidRequest before anything is queued when req is invalid, and QueueFull
        when too many requests wait.
        """
        if self.dead is not None:
            raise EngineDead(f"the engine loop stopped: {self.dead}")
        self.core.check(req)
        if req.request_id in self._streams:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        if len(self._streams) >= self.core.config.scheduler.max_waiting + self.core.config.scheduler.max_num_seqs:
            raise QueueFull(f"{len(self._streams)} requests are in flight; the limit is reached")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = stream
        self._inbox.put(("add", req))
        finished = False
        try:
            while not finished:
                out: RequestOutput = await stream.get()
                if out.error is not None:
                    raise out.error
                finished = out.finished
                yield out
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._inbox.put(("abort", req.request_id))

    # -- the loop thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                outputs = self._drain_inbox(block=not self.core.has_work)
                if self.core.has_work:
                    outputs += self._step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except Exception as exc:  # the loop itself broke: fail everything, refuse new work
            log.exception("engine loop died")
            self.dead = exc
            self._loop.call_soon_threadsafe(self._deliver, self.core.fail_all(EngineDead(str(exc))))

    def _step(self) -> list[RequestOutput]:
        try:
            return self.core.step()
        except Exception as exc:
            # A failure inside a step (e.g. out of memory) ends the requests in it; the
            # engine keeps serving new ones.
            log.exception("engine step failed; failing the running requests")
            return self.core.fail_all(EngineDead(f"engine step failed: {exc}"))

    def _drain_inbox(self, block: bool) -> list[RequestOutput]:
        outputs = []
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    outputs += self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return outputs

    def _handle(self, item) -> list[RequestOutput]:
        kind, arg = item
        if kind == "abort":
            out = self.core.abort(arg)
            return [out] if out else []
        try:
            self.core.add(arg)
        except Exception as exc:  # checked before queueing, but never let one request stop the loop
            return [RequestOutput(arg.request_id, [], finished=True, error=exc)]
        return []

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
