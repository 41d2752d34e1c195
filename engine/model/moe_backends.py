"""How a layer's routed experts are computed, for every format they are held in: dense
(the serving dtype), DeepSeek's block FP8 (`kernels.fp8`), NVFP4 or MXFP4 (`kernels.fp4`).

Two backends behind `MoEBackend`, chosen by the device the weights live on:
- CPU: `TorchMoE`, the per-expert loops of `kernels.moe_ref`; FP8 and FP4 experts are
  dequantized one at a time, only those a batch routes to, so the stored (packed) weights
  are all that stays resident.
- CUDA: `TritonMoE`, `kernels.triton_fused_moe.fused_moe` (every format dequantized in
  registers, no host synchronization, so CUDA graphs can record it), imported lazily so that
  a CPU process never imports Triton.

Legend: T = tokens, D = hidden, E = experts, I = expert intermediate, K = experts per token.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch

from kernels.fp4 import MXFP4Tensor, NVFP4Tensor
from kernels.fp8 import FP8BlockTensor
from kernels.moe_ref import ExpertWeights, moe_reference, moe_reference_fp4, moe_reference_fp8


def weight_tensors(w: ExpertWeights) -> list[torch.Tensor]:
    """The tensors that hold a weight: itself, or its values and scales."""
    if torch.is_tensor(w):
        return [w]
    return [v for f in dataclasses.fields(w) if torch.is_tensor(v := getattr(w, f.name))]


def weight_nbytes(w: ExpertWeights) -> int:
    """Bytes resident for a weight in any format (values, block scales, global scales)."""
    return sum(t.numel() * t.element_size() for t in weight_tensors(w))


class MoEBackend(ABC):
    """Routed experts computed from stacked weights in one format.

    Owns w13 [E, 2I, D] (gate rows, then up rows) and w2 [E, D, I]: both dense tensors of the
    serving dtype, both FP8BlockTensor, both NVFP4Tensor or both MXFP4Tensor, on one device;
    read-only once the backend is built. Calls are not thread-safe (the engine runs one step
    at a time).
    """

    def __init__(self, w13: ExpertWeights, w2: ExpertWeights) -> None:
        self.w13, self.w2 = w13, w2

    @abstractmethod
    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64 -> [T, D] in x's dtype:
        sum over k of weights[t, k] * down(silu(gate(x)) * up(x)) with expert ids[t, k];
        an id of -1 (an expert another rank holds) adds nothing."""

    def nbytes(self) -> int:
        return weight_nbytes(self.w13) + weight_nbytes(self.w2)


class TorchMoE(MoEBackend):
    """The reference (and the CPU backend): per routed expert, dequantize if stored
    quantized, and multiply."""

    def __call__(self, x, weights, ids):
        if isinstance(self.w13, FP8BlockTensor):
            return moe_reference_fp8(x, self.w13, self.w2, weights, ids)
        if isinstance(self.w13, (NVFP4Tensor, MXFP4Tensor)):
            return moe_reference_fp4(x, self.w13, self.w2, weights, ids)
        return moe_reference(x, self.w13, self.w2, weights, ids)


class TritonMoE(MoEBackend):
    """The fused grouped GEMM, weights dequantized in registers (CUDA)."""

    def __init__(self, w13: ExpertWeights, w2: ExpertWeights) -> None:
        super().__init__(w13, w2)
        from kernels.triton_fused_moe import fused_moe
        self._fused = fused_moe

    def __call__(self, x, weights, ids):
        held = ids >= 0  # an expert held elsewhere: routed to expert 0 with weight 0
        return self._fused(x, self.w13, self.w2, weights * held, ids.clamp(min=0))


def moe_backend_for(w13: ExpertWeights, w2: ExpertWeights) -> MoEBackend:
    """The backend for the device the weights live on: Triton on CUDA, the reference elsewhere."""
    backend = TritonMoE if weight_tensors(w13)[0].device.type == "cuda" else TorchMoE
    return backend(w13, w2)
