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


class RendezvousError(RuntimeError):
    """The ranks could not find each other (message says which address and why)."""


def rank_device(cfg: ParallelConfig, rank: int, device_type: str) -> torch.device:
    """Rank `rank`'s device: one GPU per rank (its index on its node), or the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", rank % cfg.ranks_per_node)
    return torch.device("cpu")


def cpu_threads(cfg: ParallelConfig, cores: int | None = None) -> int:
    """Each of a node's ranks gets its share of the cores (at least one)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // cfg.ranks_per_node)


def init_rank(cfg: ParallelConfig, rank: int, device: torch.device, rendezvous_timeout: float = 60.0,
              load_timeout: float = 1800.0) -> ParallelState:
    """Joins the engine's process groups as global `rank` on `device`."""
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
