"""The step loop of an engine that spans several ranks (engine.distributed).

Every rank runs the same loop, in lockstep; each turn is one step:

1. Global rank 0 (the head, the only rank the gRPC server talks to) takes what its inbox
   holds, sends each new request to a data-parallel group (`DPBalancer`) and each abort to
   the group that runs it, and broadcasts a `StepOrder` to every rank. With nothing to do
   it still broadcasts an empty order every `HEARTBEAT` seconds, so that a rank that died
   or hung is noticed while the engine idles.
2. The head of each DP group (its TP rank 0) applies its share of the order to its own
   `EngineCore` (its scheduler, its KV cache), plans its step and broadcasts the step's
   inputs to its TP peers.
3. Every rank runs the forward; a DP group with nothing scheduled runs an idle forward
   that only joins the MoE layers' collectives, so that those stay aligned.
4. DP heads sample and turn tokens into outputs; rank 0 gathers every group's `DPReport`
   and sends the outputs to the server.

A failed collective (a rank died, or a peer took longer than the collective timeout) ends
the loop with the exception: the ranks are no longer in step, so the engine exits non-zero
and the server stops serving, rather than failing the requests and carrying on as the
one-process loop does.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.core import EngineCore, EngineStats
from engine.distributed import ParallelState
from engine.kv_manager import block_hash
from engine.request import EngineRequest, RequestOutput
from engine.runner import ModelRunner

log = logging.getLogger(__name__)
HEARTBEAT = 1.0  # seconds between orders while the engine idles


@dataclass(frozen=True)
class StepOrder:
    """What rank 0 tells every rank at the start of a step."""

    messages: tuple[list, ...] = ()  # per DP group: ("add", EngineRequest) | ("abort", request id)
    run: bool = False  # whether any group may have a step to run (else only reports are exchanged)
    stop: bool = False


@dataclass(frozen=True)
class DPReport:
    """What a DP group's head tells rank 0 at the end of a step."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats = EngineStats(0, 0, 0)
    has_work: bool = False
    free_blocks: int = 0


class DPBalancer:
    """Chooses the DP group of each new request: the least loaded (fewest requests queued
    or running, then most free KV blocks), unless a group recently took a request with the
    same leading prompt blocks and is not much busier, in which case that group, whose prefix
    cache probably still holds them. Remembers up to `max_prefixes` block hashes (LRU)."""

    SLACK = 4  # requests a prefix-holding group may have over the least loaded one

    def __init__(self, dp_size: int, block_size: int, max_prefixes: int = 1 << 16) -> None:
        self.block_size, self.max_prefixes = block_size, max_prefixes
        self.queued = [0] * dp_size
        self.free_blocks = [0] * dp_size
        self.owner: dict[str, int] = {}
        self.prefixes: OrderedDict[bytes, int] = OrderedDict()

    def assign(self, req: EngineRequest) -> int:
        hashes = self._hashes(req.prompt_ids)
        least = min(range(len(self.queued)), key=lambda d: (self.queued[d], -self.free_blocks[d], d))
        holder = self._holder(hashes)
        choice = holder if holder is not None and self.queued[holder] <= self.queued[least] + self.SLACK else least
        for h in hashes:
            self.prefixes[h] = choice
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > self.max_prefixes:
            self.prefixes.popitem(last=False)
        self.owner[req.request_id] = choice
        self.queued[choice] += req.params.n
        return choice

    def _hashes(self, ids: list[int]) -> list[bytes]:
        out, parent, b = [], b"", self.block_size
        for i in range(len(ids) // b):
            parent = block_hash(parent, ids[i * b:(i + 1) * b])
            out.append(parent)
        return out

    def _holder(self, hashes: list[bytes]) -> int | None:
        """The group that took the longest run of these leading blocks."""
        holder = None
        for h in hashes:
            group = self.prefixes.get(h)
            if group is None or (holder is not None and group != holder):
                break
            holder = group
        return holder

    def update(self, reports: list[DPReport]) -> None:
        for d, report in enumerate(reports):
            self.queued[d] = report.stats.waiting + report.stats.running
            self.free_blocks[d] = report.free_blocks
            for out in report.outputs:
                if out.finished:
                    self.owner.pop(out.request_id, None)


class RankLoop:
    """One rank's loop. `core`: this rank's EngineCore where it heads a DP group (else None,
    and `runner` executes the steps its head sends); `mailbox`: rank 0's link to the server."""

    def __init__(self, state: ParallelState, runner: ModelRunner, core: EngineCore | None = None,
                 mailbox=None) -> None:
        self.state, self.runner, self.core, self.mailbox = state, runner, core, mailbox
        self.head = state.rank == 0
        if self.head:
            self.balancer = DPBalancer(state.dp_size, runner.block_size)
            self.busy = False

    def run(self) -> None:
        steps = 0
        while True:
            order = self.state.world.broadcast_object(self._order() if self.head else None)
            if order.stop:
                self._log_collectives(steps)
                return
            outputs = self._apply(order.messages[self.state.dp_rank]) if self.core and order.messages else []
            if order.run:
                outputs += self._step()
                steps += 1
            report = None if self.core is None else DPReport(outputs, self.core.stats(), self.core.has_work,
                                                            self.core.kv.num_free_blocks)
            reports = self.state.world.gather_objects(report)
            if self.head:
                self._deliver([r for r in reports if r is not None])

    def _log_collectives(self, steps: int) -> None:
        """The time this rank spent in the model's collectives (benchmarks read this line)."""
        seconds = self.state.collective_seconds()
        log.info("rank %d: %d steps, collectives %.3f ms per step (%.3f s in all)", self.state.rank, steps,
                 1e3 * seconds / max(steps, 1), seconds)

    def _order(self) -> StepOrder:
        messages = self.mailbox.receive(HEARTBEAT if not self.busy else 0.0)
        if messages is None:
            return StepOrder(stop=True)
        per_group: tuple[list, ...] = tuple([] for _ in range(self.state.dp_size))
        for kind, arg in messages:
            group = self.balancer.assign(arg) if kind == "add" else self.balancer.owner.get(arg)
            if group is not None:
                per_group[group].append((kind, arg))
        return StepOrder(per_group if messages else (), self.busy or any(k == "add" for k, _ in messages))

    def _apply(self, messages: list) -> list[RequestOutput]:
        return [out for msg in messages for out in apply_message(self.core, msg)]

    def _step(self) -> list[RequestOutput]:
        planned = self.core.plan_step() if self.core is not None else None
        shipped = None if planned is None else planned[1]._replace(sampled=[])
        step = self.state.tp.broadcast_object(shipped) if self.core is not None else self.state.tp.broadcast_object()
        if step is None:
            self.runner.model.idle_forward()
            return []
        logits = self.runner.execute(step)
        if planned is None:
            return []
        out, mine = planned
        return self.core.complete_step(out, logits, mine.sampled)

    def _deliver(self, reports: list[DPReport]) -> None:
        self.balancer.update(reports)
        self.busy = any(r.has_work for r in reports)
        stats = EngineStats(*(sum(getattr(r.stats, f) for r in reports) for f in ("waiting", "running", "used_blocks")))
        outputs = [out for r in reports for out in r.outputs]
        self.mailbox.send(outputs, stats)


def apply_message(core: EngineCore, msg) -> list[RequestOutput]:
    """An inbox message applied to the core: ("abort", request id) or ("add", EngineRequest).
    A request that the core refuses ends at once with its error; it never stops the loop."""
    kind, arg = msg
    if kind == "abort":
        out = core.abort(arg)
        return [out] if out else []
    try:
        core.add(arg)
    except Exception as exc:  # validated by the server already
        return [RequestOutput(arg.request_id, [], finished=True, error=exc)]
    return []
