"""Starting ranks: the rendezvous, each rank's device and CPU share, and the processes of
one node.

Rendezvous: rank 0 hosts a TCPStore at --master-addr:--master-port, the others connect
to it (under torchrun: env://, from torchrun's MASTER_ADDR / MASTER_PORT / RANK). A master
that cannot be reached fails after `rendezvous_timeout` seconds with a message naming the
address, never hangs.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .parallel_state import ParallelConfig, ParallelState

EXIT_BAD_INPUT = 2  # as the command line's: a rendezvous that cannot happen is bad input


class RendezvousError(RuntimeError):
    """The ranks could not find each other (message says which address and why)."""


def rank_device(cfg: ParallelConfig, rank: int, device_type: str) -> torch.device:
    """Rank `rank`'s device: one GPU per rank (its index on its node), or the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", rank % cfg.ranks_per_node)
    return torch.device("cpu")


def device_memory_gib(device_type: str, ranks_per_node: int) -> float:
    """The memory one rank may plan with: its GPU's, or on the CPU its share of what the host
    has available now."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available / 2**30 / ranks_per_node


def cpu_threads(cfg: ParallelConfig, cores: int | None = None) -> int:
    """Each of a node's ranks gets its share of the cores (at least one)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // cfg.ranks_per_node)


def init_rank(cfg: ParallelConfig, rank: int, device: torch.device, load_timeout: float = 1800.0) -> ParallelState:
    """Joins the engine's process groups as global `rank` on `device`."""
    rendezvous_timeout = cfg.rendezvous_timeout
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads(cfg))
    if cfg.torchrun:
        return ParallelState.init(cfg, rank, device, None, load_timeout=load_timeout)
    try:
        store = dist.TCPStore(cfg.master_addr, cfg.master_port, cfg.world_size, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=rendezvous_timeout), wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        what = "could not listen on" if rank == 0 else f"rank {rank} could not reach"
        raise RendezvousError(f"{what} --master-addr {cfg.master_addr} --master-port {cfg.master_port} "
                              f"within {rendezvous_timeout:g}s: {str(exc).splitlines()[0]}") from None
    return ParallelState.init(cfg, rank, device, store=store, load_timeout=load_timeout)


def run_node(cfg: ParallelConfig, target, args: tuple = ()) -> int:
    """Runs `target(rank, *args)` for each of this node's ranks, one spawned process each,
    until they end. The first to fail takes the others down; returns its exit code (2 when
    the ranks could not meet), or 0. SIGTERM / SIGINT end the ranks too."""
    import multiprocessing as mp
    import signal
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_node_rank, args=(target, rank, args), name=f"moeserve-rank-{rank}", daemon=True)
             for rank in cfg.node_ranks()]
    for proc in procs:
        proc.start()

    def stop(signum, frame):
        for proc in procs:
            proc.kill()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    running = list(procs)
    while running:
        for sentinel in wait([p.sentinel for p in running]):
            proc = next(p for p in running if p.sentinel == sentinel)
            running.remove(proc)
            proc.join()
            if proc.exitcode != 0:
                for other in running:
                    other.kill()
                return proc.exitcode if proc.exitcode > 0 else 1
    return 0


def _node_rank(target, rank: int, args: tuple) -> None:
    try:
        target(rank, *args)
    except RendezvousError as exc:
        import sys
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
