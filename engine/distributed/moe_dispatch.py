"""MoE dispatch and combine: getting each token to the ranks that hold its experts, and
the experts' outputs back, behind one interface.

The routed experts are split over every rank of the engine (the world group): with expert
parallelism each rank holds E/world whole experts, without it a 1/world slice of every
expert's intermediate dimension. Within a TP group every rank holds the same tokens; DP
groups hold different ones (data-parallel attention). A dispatcher returns, for this rank's
tokens, its share of the routed output: partial sums that the caller adds over the TP group
(together with the shared experts' partial sums, in one all-reduce).

- `AllGatherDispatcher` (exact, any layout): all-gather the tokens of every DP group, let
  each rank run its experts on all of them, reduce-scatter the partial outputs back to the
  DP groups. Every rank computes over every token: simple and exact, and the form data
  parallelism without EP needs, since every rank holds part of every expert.
- `AllToAllDispatcher` (expert parallelism): each TP rank takes a slice of its group's tokens
  and sends each token only to the ranks owning at least one of its experts, with the
  routing weights of those experts (`all_to_all_single`, uneven splits); the outputs come
  back the same way. A GPU-only backend (DeepEP) would slot in here.

Expert ids handed to the experts are local (0..E_local-1), -1 where another rank owns the
expert: the expert backends skip those.

Legend: T = this rank's tokens, A = tokens of all DP groups, D = hidden, K = experts per token,
W = world size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .parallel_state import ParallelState, shard_range

Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weights, local ids) -> [rows, D]


class TokenDispatcher(ABC):
    """One per model, shared by its MoE layers. `begin_step` runs once per forward (every
    rank of the world, with its own token count, 0 for an idle DP group) before any layer;
    then each MoE layer calls the dispatcher once, on every rank, in the same order."""

    def __init__(self, parallel: ParallelState, num_experts: int, device: torch.device) -> None:
        self.parallel, self.device = parallel, device
        world = parallel.world
        self.local_experts = num_experts // world.size if parallel.expert_parallel else num_experts
        self.first_expert = world.rank * self.local_experts if parallel.expert_parallel else 0

    def begin_step(self, num_tokens: int) -> None:
        """This rank's token count for the coming forward."""

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids [R, K] -> this rank's local ids, -1 for experts it does not hold."""
        if not self.parallel.expert_parallel:
            return ids
        local = ids - self.first_expert
        return local.masked_fill((local < 0) | (local >= self.local_experts), -1)

    @abstractmethod
    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Experts) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64 (global) -> [T, D] in x's dtype:
        this rank's partial routed output, to be summed over the TP group."""


class LocalDispatcher(TokenDispatcher):
    """World size 1: every expert is here."""

    def __call__(self, x, weights, ids, experts):
        return experts(x, weights, ids)


class AllGatherDispatcher(TokenDispatcher):
    def begin_step(self, num_tokens: int) -> None:
        dp = self.parallel.dp
        if dp.size == 1:
            self.counts = [num_tokens]
            return
        n = torch.tensor([num_tokens], dtype=torch.int64, device=self.device)
        self.counts = dp.all_gather(n).tolist()

    def __call__(self, x, weights, ids, experts):
        dp = self.parallel.dp
        x_all = dp.all_gather_rows(x, self.counts)  # [A, D]
        w_all = dp.all_gather_rows(weights, self.counts)  # [A, K]
        ids_all = dp.all_gather_rows(ids, self.counts)  # [A, K]
        y_all = experts(x_all, w_all, self.local_ids(ids_all))  # [A, D]: my experts' share
        return dp.reduce_scatter_rows(y_all, self.counts)  # [T, D]: summed over the DP groups


class AllToAllDispatcher(TokenDispatcher):
    def __call__(self, x, weights, ids, experts):
        world, tp = self.parallel.world, self.parallel.tp
        mine = shard_range(x.shape[0], tp.size, tp.rank)  # my slice of the TP group's tokens
        xs, ws, ids_s = x[mine.start: mine.stop], weights[mine.start: mine.stop], ids[mine.start: mine.stop]
        owner = ids_s // self.local_experts  # [t, K]: the rank holding each chosen expert
        rows, send_counts, packed = [], [], []
        for r in range(world.size):
            to_r = (owner == r)  # [t, K]
            tokens = to_r.any(dim=1).nonzero().flatten()
            rows.append(tokens)
            send_counts.append(tokens.numel())
            local = (ids_s[tokens] - r * self.local_experts).masked_fill(~to_r[tokens], -1)
            w = ws[tokens].masked_fill(~to_r[tokens], 0.0)
            packed.append(torch.cat((w.view(torch.int32), local.int()), dim=1))  # [n, 2K] int32: weights' bits, ids
        recv_counts = world.all_to_all(torch.tensor(send_counts, device=x.device), [1] * world.size,
                                       [1] * world.size).tolist()
        order = torch.cat(rows)
        x_recv = world.all_to_all(xs[order], send_counts, recv_counts)  # [R, D]
        meta = world.all_to_all(torch.cat(packed), send_counts, recv_counts)  # [R, 2K]
        k = ids.shape[1]
        y_recv = experts(x_recv, meta[:, :k].contiguous().view(torch.float32), meta[:, k:].long())
        y_back = world.all_to_all(y_recv, recv_counts, send_counts)  # [sum(send_counts), D], in `order`
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out[mine.start: mine.stop].index_add_(0, order, y_back.float())
        return out.to(x.dtype)


DISPATCHERS = {"allgather": AllGatherDispatcher, "alltoall": AllToAllDispatcher}


def make_dispatcher(parallel: ParallelState, num_experts: int, kind: str, device: torch.device) -> TokenDispatcher:
    """kind "auto": all-to-all with expert parallelism, all-gather without; at world size 1,
    no dispatch at all."""
    if parallel.world_size == 1:
        return LocalDispatcher(parallel, num_experts, device)
    if kind == "auto":
        kind = "alltoall" if parallel.expert_parallel else "allgather"
    if kind == "alltoall" and not parallel.expert_parallel:
        raise ValueError("--moe-dispatch alltoall needs --enable-expert-parallel (without it every rank "
                         "holds part of every expert, and every token must reach every rank)")
    return DISPATCHERS[kind](parallel, num_experts, device)
