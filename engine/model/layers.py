"""Small building blocks: a bias-free linear layer, RMSNorm and the SwiGLU MLP.

Parameters are allocated uninitialized: every one of them is overwritten by the
checkpoint loader, which also checks that none is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_gemm import PackedWeight


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
    separate tensors fill its two halves.
    """

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up_proj = Linear(hidden, 2 * inter, dtype, device)
        self.down_proj = Linear(inter, hidden, dtype, device)

    def checkpoint_slots(self, prefix: str) -> dict[str, torch.Tensor]:
        w = self.gate_up_proj.weight
        return {prefix + "gate_proj.weight": w[: self.inter], prefix + "up_proj.weight": w[self.inter:],
                prefix + "down_proj.weight": self.down_proj.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)
