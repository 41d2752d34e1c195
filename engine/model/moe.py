"""DeepSeekMoE: shared experts plus sigmoid-routed, group-limited top-k routed experts.

Routed expert weights are stacked per layer so fused kernels can index them:
    w13 [E, 2I, D]  gate_proj rows then up_proj rows of each expert
    w2  [E, D, I]   down_proj of each expert
The checkpoint's per-expert tensors are copied into these slices by the loader. With FP4
experts (see `fp4_experts`) the same stacked layout is kept packed.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.moe_cpu import DENSE_MAX_TOKENS, DenseExperts
from kernels.moe_ref import grouped_topk, moe_reference

from .config import ModelConfig
from .fp4_experts import ExpertQuantization, FP4MoE, NVFP4ExpertSlots, QuantizingExpertSlots, fp4_moe_for
from .layers import MLP, empty_param


class Router(nn.Module):
    """The `gate`: router weight [E, D] and the aux-loss-free balancing bias [E], both fp32."""

    def __init__(self, cfg: ModelConfig, device) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = empty_param(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32, device=device)
        self.e_score_correction_bias = empty_param(cfg.n_routed_experts, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] fp32, expert ids [T, K] int64)."""
        cfg = self.cfg
        logits = x.float() @ self.weight.t()
        return grouped_topk(logits, self.e_score_correction_bias, cfg.num_experts_per_tok,
                            cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)


class RoutedExperts(nn.Module):
    """The routed experts of one layer, in one of two forms:
    - dense: parameters w13 / w2 in the serving dtype, the per-expert loop (or on a bf16 CPU
      the dense small-batch path);
    - FP4: quantized at load (`quantization`) or loaded from an NVFP4 checkpoint
      (`cfg.nvfp4_checkpoint`): w13 / w2 are None, the loader fills `staged`, and after
      `finish_loading` `fp4`, an `FP4MoE` backend, holds the only (packed) copy.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device,
                 quantization: ExpertQuantization | None = None) -> None:
        super().__init__()
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.dense: DenseExperts | None = None
        self.fp4: FP4MoE | None = None
        self.staged: NVFP4ExpertSlots | QuantizingExpertSlots | None = None
        if cfg.nvfp4_checkpoint:
            self.w13 = self.w2 = None
            self.staged = NVFP4ExpertSlots(e, i, d, device)
        elif quantization is not None:
            self.w13 = self.w2 = None
            self.staged = QuantizingExpertSlots(e, i, d, dtype, device, quantization)
        else:
            self.w13 = empty_param(e, 2 * i, d, dtype=dtype, device=device)
            self.w2 = empty_param(e, d, i, dtype=dtype, device=device)

    def use_dense_for_small_batches(self) -> None:
        """After loading: small batches compute every expert in two GEMMs (see moe_cpu).
        Not for FP4 experts: it would need them dense."""
        if self.fp4 is None:
            self.dense = DenseExperts(self.w13, self.w2)

    def finish_loading(self) -> None:
        """After loading FP4 experts: the staged tensors become the FP4 backend."""
        if self.staged is not None:
            self.fp4, self.staged = fp4_moe_for(*self.staged.finish()), None

    def nbytes(self) -> int:
        """Bytes of expert weights resident."""
        if self.fp4 is not None:
            return self.fp4.nbytes()
        return sum(w.numel() * w.element_size() for w in (self.w13, self.w2))

    def checkpoint_slots(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint's per-expert tensors fill slices of the stacked weights."""
        if self.staged is not None:
            return self.staged.checkpoint_slots(prefix)
        inter, slots = self.w2.shape[-1], {}
        for e in range(self.w13.shape[0]):
            p = f"{prefix}{e}."
            slots[p + "gate_proj.weight"] = self.w13[e, :inter]
            slots[p + "up_proj.weight"] = self.w13[e, inter:]
            slots[p + "down_proj.weight"] = self.w2[e]
        return slots

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64 -> [T, D]."""
        if self.fp4 is not None:
            return self.fp4(x, weights, ids)
        if self.dense is not None and x.shape[0] <= DENSE_MAX_TOKENS:
            return self.dense(x, weights, ids)
        return moe_reference(x, self.w13, self.w2, weights, ids)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device,
                 quantization: ExpertQuantization | None = None) -> None:
        super().__init__()
        self.gate = Router(cfg, device)
        self.experts = RoutedExperts(cfg, dtype, device, quantization)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared, dtype, device) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)
