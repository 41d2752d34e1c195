"""The parallel layout of one engine and the process groups that serve it.

One `engine serve` spans `world = tp * dp` ranks, one process per device. Global rank
`r = dp_rank * tp + tp_rank`: the ranks of a tensor-parallel (TP) group are consecutive,
and rank `dp_rank * tp` heads DP group `dp_rank` (it schedules, samples and talks to the
head of the engine). Global rank 0 heads the whole engine and serves gRPC.

Groups (built once by `ParallelState.init`, then handed down; nothing reads a global):
- tp:     the ranks of my DP group; attention heads, dense MLPs, shared experts and the
          vocabulary are split over it.
- dp:     the ranks with my tp_rank across DP groups; MoE layers gather tokens over it.
- world:  every rank; the routed experts are split over it (whole experts with EP, slices
          of every expert's intermediate dimension without), and the step loop exchanges
          its per-step messages over it.

Every collective runs under the groups' timeout: a rank that dies or hangs makes its
peers' next collective fail (gloo notices a closed socket at once) instead of waiting.
At world size 1 every group has size 1 and every collective returns its input, so the
model code is the same with and without parallelism.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes and rendezvous, from the command line (or torchrun's environment)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    collective_timeout: float = 30.0  # seconds: a collective that takes longer fails the engine
    rendezvous_timeout: float = 300.0  # seconds the ranks wait for each other at start
    torchrun: bool = False  # ranks were started by torchrun (env:// rendezvous), one per process

    def __post_init__(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--data-parallel-size", self.data_parallel_size), ("--nnodes", self.nnodes)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, "
                             f"got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} does not divide the {self.world_size} ranks "
                             f"(--tensor-parallel-size x --data-parallel-size) evenly")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be in 1..65535, got {self.master_port}")
        for flag, value in (("--collective-timeout", self.collective_timeout),
                            ("--rendezvous-timeout", self.rendezvous_timeout)):
            if not 0 < value < float("inf"):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    @property
    def is_head_node(self) -> bool:
        return self.node_rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


class Group:
    """A process group and this rank's place in it.

    `cpu_pg` (gloo) carries Python objects; `pg` carries tensors (NCCL on GPUs, the same
    gloo group on CPUs). `seconds` adds up the wall time spent in tensor collectives, for
    benchmarks. Size 1: every collective returns its input and costs nothing.
    """

    def __init__(self, ranks: list[int], rank: int, pg=None, cpu_pg=None) -> None:
        self.ranks, self.rank = ranks, ranks.index(rank)
        self.size = len(ranks)
        self.pg, self.cpu_pg = pg, cpu_pg
        self.gloo = pg is not None and dist.get_backend(pg) == "gloo"
        self.seconds = 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        """gloo reduces half types through float; sums in fp32 lose nothing."""
        return x.float() if self.gloo and x.dtype in (torch.bfloat16, torch.float16) else x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group; returns the result (x itself where it could be done in place).
        A TP group's ranks hold the same tokens, so an empty x (an idle step) is empty on all."""
        if self.size == 1 or x.numel() == 0:
            return x
        wire = self._wire(x)
        self._timed(dist.all_reduce, wire, dist.ReduceOp.SUM, self.pg)
        return wire if wire is x else wire.to(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's x (equal shapes) concatenated along dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._timed(dist.all_gather, parts, x.contiguous(), self.pg)
        return torch.cat(parts, dim=dim)

    def all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [counts[rank], ...] -> [sum(counts), ...]: every rank's rows in rank order."""
        if self.size == 1:
            return x
        width = max(max(counts), 1)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = self.all_gather(padded)
        return torch.cat([gathered[i * width: i * width + n] for i, n in enumerate(counts)])

    def reduce_scatter_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [sum(counts), ...] (each rank's partial sums for everyone's rows) -> my rows of the sum."""
        if self.size == 1:
            return x
        width = max(max(counts), 1)
        padded = x.new_zeros((self.size * width, *x.shape[1:]))
        start = 0
        for i, n in enumerate(counts):
            padded[i * width: i * width + n] = x[start: start + n]
            start += n
        wire = self._wire(padded)
        out = wire.new_empty((width, *x.shape[1:]))
        self._timed(dist.reduce_scatter_tensor, out, wire, dist.ReduceOp.SUM, self.pg)
        return out[: counts[self.rank]].to(x.dtype)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of x, sent send_counts[i] to rank i in rank order; returns the rows received."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        self._timed(dist.all_to_all_single, out, x.contiguous(), recv_counts, send_counts, self.pg)
        return out

    def broadcast_object(self, obj=None, src: int = 0):
        """obj from group rank src to every rank of the group."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_pg)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Every rank's obj, in rank order, at group rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=self.ranks[0], group=self.cpu_pg)
        return out


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the layout, and its groups."""

    rank: int
    tp_size: int
    dp_size: int
    expert_parallel: bool
    tp: Group
    dp: Group
    world: Group
    start_pg: object = None  # gloo over the world, waiting up to the load timeout (see wait_loaded)

    @classmethod
    def single(cls) -> "ParallelState":
        one = Group([0], 0)
        return cls(0, 1, 1, False, one, one, one)

    def wait_loaded(self) -> None:
        """Returns once every rank has loaded its weights (ranks load at their own pace, for
        longer than a step's collective timeout)."""
        if self.start_pg is not None:
            dist.barrier(group=self.start_pg)

    @classmethod
    def init(cls, cfg: ParallelConfig, rank: int, device: torch.device, init_method: str | None = None,
             store=None, load_timeout: float = 1800.0) -> "ParallelState":
        """Joins the rendezvous as global `rank` and builds the groups: through `store` (a
        TCPStore, see launch.init_rank), or `init_method` (None: env://, as under torchrun).
        The world group itself waits up to `load_timeout` (ranks load weights at their own
        pace before the first step); the groups the step loop uses wait `cfg.collective_timeout`."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        where = {"store": store} if store is not None else {"init_method": init_method or "env://"}
        dist.init_process_group(backend, rank=rank, world_size=cfg.world_size,
                                timeout=datetime.timedelta(seconds=load_timeout), **where,
                                **({"device_id": device} if device.type == "cuda" else {}))
        timeout = datetime.timedelta(seconds=cfg.collective_timeout)
        tp, dp = cfg.tensor_parallel_size, cfg.data_parallel_size
        tp_rank, dp_rank = rank % tp, rank // tp

        def group(ranks_of: list[list[int]], mine: list[int]) -> Group:
            # new_group is collective: every rank creates every group, in the same order
            made = {}
            for ranks in ranks_of:
                pg = dist.new_group(ranks, timeout=timeout, backend=backend)
                cpu = pg if backend == "gloo" else dist.new_group(ranks, timeout=timeout, backend="gloo")
                made[tuple(ranks)] = (pg, cpu)
            return Group(mine, rank, *made[tuple(mine)])

        tp_groups = [[d * tp + t for t in range(tp)] for d in range(dp)]
        dp_groups = [[d * tp + t for d in range(dp)] for t in range(tp)]
        world = list(range(cfg.world_size))
        start = dist.new_group(world, timeout=datetime.timedelta(seconds=load_timeout), backend="gloo")
        return cls(rank, tp, dp, cfg.enable_expert_parallel,
                   group(tp_groups, tp_groups[dp_rank]), group(dp_groups, dp_groups[tp_rank]),
                   group([world], world), start)

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def dp_rank(self) -> int:
        return self.dp.rank

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def is_dp_head(self) -> bool:
        """The rank that schedules and samples for its DP group."""
        return self.tp.rank == 0

    def collective_seconds(self) -> float:
        return sum(g.seconds for g in {id(g): g for g in (self.tp, self.dp, self.world)}.values())


def shard_range(total: int, parts: int, index: int) -> range:
    """Rows [start, stop) of part `index` when `total` is split in `parts` ceil-sized pieces
    (the last may be shorter, or empty)."""
    size = -(-total // parts)
    return range(min(index * size, total), min((index + 1) * size, total))


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
