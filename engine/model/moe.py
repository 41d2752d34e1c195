"""DeepSeekMoE: shared experts plus sigmoid-routed, group-limited top-k routed experts.

Routed expert weights are stacked per layer so fused kernels can index them:
    w13 [E, 2I, D]  gate_proj rows then up_proj rows of each expert
    w2  [E, D, I]   down_proj of each expert
The checkpoint's per-expert tensors are copied into these slices by the loader. With FP4
experts (see `fp4_experts`) or a DeepSeek FP8 checkpoint's (see `fp8_experts`) the same
stacked layout is kept quantized; `moe_backends` computes with any of them.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import ParallelState
from engine.distributed.moe_dispatch import LocalDispatcher, TokenDispatcher
from kernels.fp4 import NVFP4_BLOCK
from kernels.moe_cpu import DENSE_MAX_TOKENS, DenseExperts
from kernels.moe_ref import grouped_topk, moe_reference

from .config import ModelConfig
from .fp4_experts import ExpertQuantization, ExpertSlot, NVFP4ExpertSlots, QuantizingExpertSlots
from .fp8_experts import FP8ExpertSlots
from .layers import MLP, Shard, empty_param
from .moe_backends import MoEBackend, TritonMoE, moe_backend_for


class Router(nn.Module):
    """The `gate`: router weight [E, D] and the aux-loss-free balancing bias [E], both fp32.
    Grouped top-k runs as one Triton kernel on CUDA (`kernels.triton_routing`, imported only
    there), the torch reference it is tested against elsewhere."""

    def __init__(self, cfg: ModelConfig, device) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = empty_param(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32, device=device)
        self.e_score_correction_bias = empty_param(cfg.n_routed_experts, dtype=torch.float32, device=device)
        self.grouped_topk = grouped_topk
        if torch.device(device).type == "cuda":
            from kernels.triton_routing import triton_grouped_topk
            self.grouped_topk = triton_grouped_topk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] fp32, expert ids [T, K] int64)."""
        cfg = self.cfg
        logits = x.float() @ self.weight.t()
        return self.grouped_topk(logits, self.e_score_correction_bias, cfg.num_experts_per_tok,
                                 cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)


class RoutedExperts(nn.Module):
    """The routed experts of one layer that this rank holds, in one of three forms:
    - dense: parameters w13 / w2 in the serving dtype; on a bf16 CPU the dense small-batch
      path, else the per-expert loop (CPU) or the fused Triton kernel (CUDA);
    - FP4: quantized at load (`quantization`) or loaded from an NVFP4 checkpoint
      (`cfg.nvfp4_checkpoint`);
    - FP8: loaded as they are from a DeepSeek FP8 checkpoint (`cfg.fp8_checkpoint`) unless
      `quantization` asks for FP4.
    Quantized, w13 / w2 are None, the loader fills `staged`, and after `finish_loading`
    `backend` (a `MoEBackend`) holds the only copy.

    Over several ranks (see engine.distributed.moe_dispatch): with expert parallelism this
    rank holds the whole experts `expert_ids`; without, the slice `inter_part` of every
    expert's intermediate dimension. The loader reads only those.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device,
                 quantization: ExpertQuantization | None = None, parallel: ParallelState | None = None) -> None:
        super().__init__()
        parallel = parallel or ParallelState.single()
        world, e, i, d = parallel.world, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        if parallel.expert_parallel:
            if e % world.size:
                raise ValueError(f"--enable-expert-parallel: the {e} routed experts do not divide over "
                                 f"{world.size} ranks (--tensor-parallel-size x --data-parallel-size)")
            e //= world.size
            self.expert_ids, self.inter_part = range(world.rank * e, (world.rank + 1) * e), range(i)
        else:
            if i % world.size:
                raise ValueError(f"the routed experts' intermediate size {i} does not divide over {world.size} "
                                 "ranks (--tensor-parallel-size x --data-parallel-size); --enable-expert-parallel "
                                 "splits whole experts instead")
            i //= world.size
            self.expert_ids, self.inter_part = range(e), range(world.rank * i, (world.rank + 1) * i)
        self.num_experts, self.full_inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.device = torch.device(device)
        self.dense: DenseExperts | None = None
        self.backend: MoEBackend | None = None
        self.staged = self._staging(cfg, e, i, d, dtype, quantization, world.size)
        if self.staged is not None:
            self.w13 = self.w2 = None
        else:
            self.w13 = empty_param(e, 2 * i, d, dtype=dtype, device=device)
            self.w2 = empty_param(e, d, i, dtype=dtype, device=device)

    def _staging(self, cfg: ModelConfig, e: int, i: int, d: int, dtype: torch.dtype,
                 quantization: ExpertQuantization | None, ranks: int):
        """The loader slots of quantized experts, or None for dense ones. A tensor-parallel
        slice of quantized experts must cover whole scale blocks."""
        sliced = len(self.inter_part) < self.full_inter
        if cfg.nvfp4_checkpoint:
            if sliced and i % NVFP4_BLOCK:
                raise ValueError(f"NVFP4 experts split over {ranks} ranks leave {i} of their intermediate "
                                 f"size per rank, not a multiple of {NVFP4_BLOCK}; use --enable-expert-parallel")
            return NVFP4ExpertSlots(e, i, d, self.device)
        if quantization is not None:
            return QuantizingExpertSlots(e, i, d, dtype, self.device, quantization)
        if cfg.fp8_checkpoint:
            bn, bk = cfg.weight_block_size
            if sliced and (i % bn or i % bk):
                raise ValueError(f"FP8 experts split over {ranks} ranks leave {i} of their intermediate size per "
                                 f"rank, not a whole number of the checkpoint's {bn} x {bk} scale blocks; use "
                                 "--enable-expert-parallel (or --quantization nvfp4)")
            return FP8ExpertSlots(e, i, d, cfg.weight_block_size, self.device)
        return None

    def use_dense_for_small_batches(self) -> None:
        """After loading: small batches compute every expert in two GEMMs (see moe_cpu).
        Only for dense experts: FP4 / FP8 ones would need a dense copy."""
        if self.w13 is not None:
            self.dense = DenseExperts(self.w13, self.w2)

    def finish_loading(self) -> None:
        """After loading: quantized experts' staged tensors become their backend; on CUDA
        dense experts run through the fused kernel too."""
        if self.staged is not None:
            self.backend, self.staged = moe_backend_for(*self.staged.finish()), None
        elif self.device.type == "cuda":
            self.backend = TritonMoE(self.w13, self.w2)

    def nbytes(self) -> int:
        """Bytes of expert weights resident."""
        if self.w13 is None:
            return self.backend.nbytes()
        return sum(w.numel() * w.element_size() for w in (self.w13, self.w2))

    def expert_slots(self, e: int) -> dict[str, ExpertSlot]:
        """Local expert e's checkpoint tensors (by name suffix) and where they go."""
        if self.staged is not None:
            return self.staged.expert_slots(e)
        inter = self.w2.shape[-1]
        return {"gate_proj.weight": ExpertSlot(self.w13[e, :inter], 0),
                "up_proj.weight": ExpertSlot(self.w13[e, inter:], 0),
                "down_proj.weight": ExpertSlot(self.w2[e], 1)}

    def checkpoint_slots(self, prefix: str) -> dict[str, object]:
        """The checkpoint's per-expert tensors fill slices of the stacked weights; those of
        the experts other ranks hold map to None (the loader skips them unread)."""
        slots, part = {}, self.inter_part
        whole = len(part) == self.full_inter
        for local, expert in enumerate(self.expert_ids):
            for suffix, (target, dim, per) in self.expert_slots(local).items():
                slots[f"{prefix}{expert}.{suffix}"] = target if whole or dim is None else Shard(
                    target, dim, part.start // per, part.stop // per, self.full_inter // per)
        others = [e for e in range(self.num_experts) if e not in self.expert_ids]
        suffixes = list(self.expert_slots(0)) if others else []
        slots.update({f"{prefix}{e}.{suffix}": None for e in others for suffix in suffixes})
        return slots

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64, local (-1: held elsewhere) -> [T, D]."""
        if self.dense is not None and x.shape[0] <= DENSE_MAX_TOKENS:
            return self.dense(x, weights, ids)
        if self.backend is not None:
            return self.backend(x, weights, ids)
        return moe_reference(x, self.w13, self.w2, weights, ids)


class MoE(nn.Module):
    """Router, routed experts (through the model's dispatcher) and shared experts; over
    several ranks, both kinds of expert leave partial sums that one TP all-reduce adds."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device,
                 quantization: ExpertQuantization | None = None, parallel: ParallelState | None = None,
                 dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__()
        parallel = parallel or ParallelState.single()
        self.tp = parallel.tp
        self.dispatcher = dispatcher or LocalDispatcher(parallel, cfg.n_routed_experts, torch.device(device))
        self.gate = Router(cfg, device)
        self.experts = RoutedExperts(cfg, dtype, device, quantization, parallel)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared, dtype, device, parallel.tp) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        weights, ids = self.gate(x)
        out = self.dispatcher(x, weights, ids, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, reduce=False)
        return self.tp.all_reduce(out)
