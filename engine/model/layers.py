"""Small building blocks: a bias-free linear layer, RMSNorm and the SwiGLU MLP, each
split over a tensor-parallel group where the model spans several ranks.

Parameters are allocated uninitialized: every one of them is overwritten by the
checkpoint loader, which also checks that none is left out. A parameter that holds only a
part of a checkpoint tensor says which part through a `Shard` slot, and the loader reads
just that slice from the file.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import Group, ParallelState, shard_range
from kernels.cpu_gemm import PackedWeight


class Shard(NamedTuple):
    """A loader slot for part of a checkpoint tensor: `target` takes indices [start, stop)
    of the tensor's dimension `dim`, of size `full` (and all of the other dimensions)."""

    target: Any  # a tensor, or a slot object with shape, dtype, dim() and copy_()
    dim: int
    start: int
    stop: int
    full: int


def shard_slot(target, dim: int, part: range, full: int):
    """`target` as the slot for indices `part` of a dimension of size `full`: the plain
    tensor where the part is the whole."""
    return target if (part.start, part.stop) == (0, full) else Shard(target, dim, part.start, part.stop, full)


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T, W [out, in]. `pack()` switches to a prepacked CPU GEMM where one exists."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.packed: PackedWeight | None = None

    def pack(self) -> None:
        self.packed = PackedWeight.of(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x) if self.packed is not None else F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """`fused`, set after loading on a bf16 CPU (kernels/csrc/cpu_decode.cpp's rms_norm), takes
    2-D bf16 rows in one pass with the same roundings; the composite op makes five."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.fused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim]: normalized in fp32, scaled by the weight in x's dtype (as the reference)."""
        if self.fused is not None and x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(-1) == 1:
            return self.fused(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts.

    gate_proj and up_proj are one [2I, D] matrix (one GEMM instead of two); the checkpoint's
    separate tensors fill its two halves. Over a TP group of size n each rank holds I/n of
    the intermediate dimension (gate and up column-parallel, down row-parallel) and the
    partial outputs are summed over the group: in `forward`, or by the caller when it has
    other partial sums to add first (`forward(x, reduce=False)`, as the MoE layer does).
    """

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device, group: Group | None = None) -> None:
        super().__init__()
        self.group = group or ParallelState.single().tp
        if inter % self.group.size:
            raise ValueError(f"--tensor-parallel-size {self.group.size} does not divide the MLP's intermediate "
                             f"size {inter}")
        self.full_inter, self.inter = inter, inter // self.group.size
        self.part = range(self.group.rank * self.inter, (self.group.rank + 1) * self.inter)
        self.gate_up_proj = Linear(hidden, 2 * self.inter, dtype, device)
        self.down_proj = Linear(self.inter, hidden, dtype, device)

    def checkpoint_slots(self, prefix: str) -> dict[str, Any]:
        w, full = self.gate_up_proj.weight, self.full_inter
        return {prefix + "gate_proj.weight": shard_slot(w[: self.inter], 0, self.part, full),
                prefix + "up_proj.weight": shard_slot(w[self.inter:], 0, self.part, full),
                prefix + "down_proj.weight": shard_slot(self.down_proj.weight, 1, self.part, full)}

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return self.group.all_reduce(out) if reduce else out


class _VocabSplit(nn.Module):
    """A [V, D] weight split by vocabulary over a TP group in ceil(V/n)-row pieces (the last
    piece may be short: its padding rows are zero, never read and never loaded)."""

    def __init__(self, vocab: int, group: Group) -> None:
        super().__init__()
        self.group, self.vocab = group, vocab
        self.part = shard_range(vocab, group.size, group.rank)
        self.rows = -(-vocab // group.size)

    def _zero_padding(self) -> None:
        self.weight.data[len(self.part):] = 0

    def checkpoint_slots(self, prefix: str) -> dict[str, Any]:
        return {prefix + "weight": shard_slot(self.weight[: len(self.part)], 0, self.part, self.vocab)}


class VocabParallelEmbedding(_VocabSplit):
    """The token embedding: each rank looks up the ids in its piece, zeros elsewhere, and the
    group sums."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device, group: Group) -> None:
        super().__init__(vocab, group)
        self.weight = empty_param(self.rows, hidden, dtype=dtype, device=device)
        self._zero_padding()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, D]."""
        if self.group.size == 1:
            return self.weight[ids]
        local = ids - self.part.start
        outside = (local < 0) | (local >= len(self.part))
        x = self.weight[local.masked_fill(outside, 0)].masked_fill(outside[:, None], 0)
        return self.group.all_reduce(x)


class ParallelLMHead(_VocabSplit):
    """The output projection, split like the embedding; each rank's logits are gathered over
    the TP group, so every rank ends with all V."""

    def __init__(self, hidden: int, vocab: int, dtype: torch.dtype, device, group: Group) -> None:
        super().__init__(vocab, group)
        self.proj = Linear(hidden, self.rows, dtype, device)
        self._zero_padding()

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] fp32."""
        logits = self.proj(hidden).float()
        if self.group.size == 1:
            return logits
        return self.group.all_gather(logits, dim=-1)[:, : self.vocab]
