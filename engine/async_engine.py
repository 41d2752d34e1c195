"""The server side of the engine process: spawn it, feed it requests, stream its outputs
into asyncio.

Outputs arrive on a pipe that the event loop watches (`add_reader`), so no thread is
involved; requests go out through a multiprocessing queue whose feeder thread never
blocks the loop. Each request's outputs land in its own asyncio.Queue.

Cancellation: when the consumer of `generate` stops (client disconnect, deadline), an
abort goes to the engine, which ends the request at its next step boundary and frees its
blocks; tokens produced so far are still counted in its final usage.

Shutting down (engine.server's drain): `draining` refuses new requests, `wait_idle` waits
for those in flight, `abort_all` ends the ones that outlast the drain.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
from collections.abc import AsyncIterator, Callable

from moeserve.aio import wait_for_event

from engine.core import EngineStats, check_request
from engine.engine_process import EngineInfo, ServeConfig, engine_main, rank_main
from engine.errors import EngineDead, QueueFull
from engine.request import EngineRequest, RequestOutput

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine process could not load the model (message says why)."""


class EngineDraining(EngineDead):
    """The engine is shutting down: it lets what runs finish and takes nothing new (gRPC
    UNAVAILABLE, so that a gateway sends the request to another replica)."""


class AsyncEngine:
    def __init__(self, cfg: ServeConfig, on_death: Callable[[], None] = lambda: None) -> None:
        """on_death: called (on the event loop) if the engine process exits unasked."""
        self.cfg, self._on_death = cfg, on_death
        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue()
        self._outbox, child_end = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=engine_main, args=(cfg, self._inbox, child_end), name="moeserve-engine",
                                    daemon=True)
        # the other ranks of a parallel engine that run on this node (under torchrun, its own)
        ranks = [] if cfg.parallel.torchrun else [r for r in cfg.parallel.node_ranks() if r != 0]
        self._ranks = {r: ctx.Process(target=rank_main, args=(cfg, r), name=f"moeserve-rank-{r}", daemon=True)
                       for r in ranks}
        self._child_end = child_end
        self._streams: dict[str, asyncio.Queue] = {}
        self.info: EngineInfo | None = None
        self.latest = EngineStats(0, 0, 0)
        self.dead: Exception | None = None
        self.draining = False
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()

    async def start(self) -> EngineInfo:
        """Spawns the engine (every rank of it on this node) and waits until its model is loaded."""
        self._process.start()
        for proc in self._ranks.values():
            proc.start()
        self._child_end.close()
        first = asyncio.ensure_future(asyncio.to_thread(self._first_message))
        while not first.done():
            await asyncio.wait([first], timeout=0.5)
            lost = self._lost_rank()
            if lost is not None and not first.done():
                self._kill_all()
                await first
                raise EngineStartError(f"{lost} while loading")
        kind, payload = first.result()
        if kind != "ready":
            await asyncio.to_thread(self._process.join, 10)
            lost = self._lost_rank()  # a rank that failed to load makes rank 0 fail at the barrier
            self._kill_all()
            raise EngineStartError(f"{lost} while loading (its log says why); rank 0: {payload}" if lost else payload)
        self.info = payload
        loop = asyncio.get_running_loop()
        loop.add_reader(self._outbox.fileno(), self._on_outputs)
        for rank, proc in self._ranks.items():
            loop.add_reader(proc.sentinel, self._rank_exited, rank)
        return payload

    def _lost_rank(self) -> str | None:
        """Which rank of this node has exited, if any, in words."""
        for rank, proc in self._ranks.items():
            if proc.exitcode is not None:
                return f"rank {rank} exited (code {proc.exitcode})"
        return None

    def _rank_exited(self, rank: int) -> None:
        asyncio.get_running_loop().remove_reader(self._ranks[rank].sentinel)
        if self.dead is None:
            self._engine_died(RuntimeError(self._lost_rank() or f"rank {rank} exited"))

    def _kill_all(self) -> None:
        for proc in (self._process, *self._ranks.values()):
            if proc.is_alive():
                proc.kill()

    def _first_message(self):
        try:
            return self._outbox.recv()
        except EOFError:
            return "failed", f"the engine process exited (code {self._process.exitcode})"

    async def stop(self) -> None:
        """Asks the engine to exit (it finishes nothing further) and waits for it."""
        try:  # its pipe closing now is expected, not a death
            asyncio.get_running_loop().remove_reader(self._outbox.fileno())
        except (ValueError, OSError):
            pass
        for proc in self._ranks.values():
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
        if self._process.is_alive():
            self._inbox.put(None)  # rank 0 tells the other ranks to stop too
            await asyncio.to_thread(self._process.join, 30)
        for proc in self._ranks.values():
            await asyncio.to_thread(proc.join, 10)
        self._kill_all()

    def stats(self) -> EngineStats:
        return self.latest

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until its last one (finished, with usage).

        Raises InvalidRequest before anything is queued when req is invalid, QueueFull when
        too many requests are in flight, EngineDead when the engine is gone, EngineDraining
        once it shuts down.
        """
        if self.dead is not None:
            raise EngineDead(f"the engine stopped: {self.dead}")
        if self.draining:
            raise EngineDraining("the engine is draining")
        check_request(req, self.info.config, self.info.vocab_size)
        if req.request_id in self._streams:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        sched = self.info.config.scheduler
        if len(self._streams) >= sched.max_waiting + sched.max_num_seqs:
            raise QueueFull(f"{len(self._streams)} requests are in flight, the most this engine queues")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = stream
        self._idle.clear()
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
            if not self._streams:
                self._idle.set()
            if not finished and self.dead is None:
                self._inbox.put(("abort", req.request_id))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def wait_idle(self, timeout: float, cut: asyncio.Event | None = None) -> bool:
        """Waits until no request is in flight (True), or `timeout` seconds pass or `cut`
        is set (False)."""
        return await wait_for_event(self._idle, timeout, cut)

    def abort_all(self) -> None:
        """Ends every request in flight at the engine's next step: each stream ends with
        finish reason ABORT and the usage so far, and its blocks are freed."""
        if self.dead is None:
            for rid in self._streams:
                self._inbox.put(("abort", rid))

    def _on_outputs(self) -> None:
        try:
            while self._outbox.poll():
                _, outputs, self.latest = self._outbox.recv()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put_nowait(out)
        except (EOFError, OSError) as exc:
            self._engine_died(exc)

    def _engine_died(self, exc: Exception) -> None:
        what = self._lost_rank() or f"the engine process exited (code {self._process.exitcode})"
        log.error("the engine is gone: %s", what)
        self.dead = exc
        try:
            asyncio.get_running_loop().remove_reader(self._outbox.fileno())
        except (ValueError, OSError):
            pass
        self._kill_all()  # a parallel engine without one of its ranks cannot step
        error = EngineDead(what)
        for rid, stream in self._streams.items():
            stream.put_nowait(RequestOutput(rid, [], finished=True, error=error))
        self._on_death()
