"""Plain-torch references for DeepSeek-V3 MoE routing and expert computation.

These are the ground truth the fused kernels are tested against: a per-expert loop that
reads like the paper (DeepSeek-V3 technical report, section 2.1.2).
Legend: T = tokens, D = hidden size, E = routed experts, I = expert intermediate size,
K = experts per token, G = expert groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp4 import MXFP4Tensor, NVFP4Tensor, dequantize_fp4
from .fp8 import FP8BlockTensor, dequantize_fp8_block


def grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                 n_group: int, topk_group: int, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores, bias-corrected group-limited top-k.

    router_logits [T, E] fp32; correction_bias [E] fp32.
    Groups are ranked by the sum of their two best biased scores; experts are chosen from
    the best `topk_group` groups by biased score; their weights are the unbiased scores,
    normalized to sum 1 if `norm_topk_prob`, then scaled by `routed_scaling_factor`.
    Returns (weights [T, K] fp32, expert ids [T, K] int64).
    """
    scores = router_logits.float().sigmoid()
    biased = scores + correction_bias.float()
    n_tokens, n_experts = scores.shape
    grouped = biased.view(n_tokens, n_group, n_experts // n_group)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(n_tokens, n_experts)
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routed experts, one expert at a time.

    x [T, D]; w13 [E, 2I, D] (gate rows, then up rows); w2 [E, D, I];
    weights [T, K] fp32; ids [T, K] int64, -1 for an expert held elsewhere (skipped).
    Returns [T, D] in x's dtype: sum over k of weights[t, k] * down(silu(gate(x)) * up(x))
    with expert ids[t, k].
    """
    return _expert_loop(x, lambda e: (w13[e], w2[e]), weights, ids)


def moe_reference_fp4(x: torch.Tensor, w13: NVFP4Tensor | MXFP4Tensor, w2: NVFP4Tensor | MXFP4Tensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routed experts with FP4 weights that stay packed: the per-expert loop of `moe_reference`,
    dequantizing (to x's dtype) only the experts the batch routes to, one at a time.

    x [T, D]; w13 [E, 2I, D] (gate rows, then up rows) and w2 [E, D, I], both NVFP4Tensor or
    both MXFP4Tensor; weights [T, K] fp32; ids [T, K] int64. Returns [T, D] in x's dtype, equal
    to `triton_fused_moe.fused_moe_reference` (which dequantizes every expert first).
    Peak extra memory: one expert's dense w13 and w2. Ids of -1 are skipped, as there.
    """
    return _expert_loop(x, lambda e: (dequantize_fp4(fp4_expert(w13, e), x.dtype),
                                      dequantize_fp4(fp4_expert(w2, e), x.dtype)), weights, ids)


def moe_reference_fp8(x: torch.Tensor, w13: FP8BlockTensor, w2: FP8BlockTensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routed experts with DeepSeek block-FP8 weights that stay FP8: as `moe_reference_fp4`,
    each routed expert dequantized (to x's dtype) when the batch needs it.

    x [T, D]; w13 FP8BlockTensor [E, 2I, D] (gate rows, then up rows, parts 1 or 2); w2
    FP8BlockTensor [E, D, I]; weights [T, K] fp32; ids [T, K] int64 (-1 skipped). Returns
    [T, D] in x's dtype, equal to dequantizing every expert first, then `moe_reference`.
    """
    return _expert_loop(x, lambda e: (dequantize_fp8_block(w13.expert(e), x.dtype),
                                      dequantize_fp8_block(w2.expert(e), x.dtype)), weights, ids)


def _expert_loop(x: torch.Tensor, expert_weights, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loop of the references: expert_weights(e) -> (w13 [2I, D], w2 [D, I]) of expert e."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in held_experts(ids):
        token, slot = (ids == expert).nonzero(as_tuple=True)
        w13, w2 = expert_weights(expert)
        h = x[token] @ w13.t()
        h = F.silu(h[:, :w2.shape[-1]]) * h[:, w2.shape[-1]:]
        y = h @ w2.t()
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


ExpertWeights = torch.Tensor | FP8BlockTensor | NVFP4Tensor | MXFP4Tensor  # a stacked [E, N, K] weight


def dequantize_experts(w: ExpertWeights, dtype: torch.dtype) -> torch.Tensor:
    """A stacked weight in any format -> dense [E, N, K] in dtype."""
    if isinstance(w, FP8BlockTensor):
        return dequantize_fp8_block(w, dtype)
    if isinstance(w, (NVFP4Tensor, MXFP4Tensor)):
        return dequantize_fp4(w, dtype)
    return w.to(dtype)


def held_experts(ids: torch.Tensor) -> list[int]:
    """The distinct expert ids in ids [T, K], without -1 (an expert another rank holds)."""
    return [e for e in ids.unique().tolist() if e >= 0]


def fp4_expert(w: NVFP4Tensor | MXFP4Tensor, expert: int) -> NVFP4Tensor | MXFP4Tensor:
    """Expert `expert` of a stacked [E, N, K] FP4 weight, as an [N, K] one (views, no copy)."""
    if isinstance(w, NVFP4Tensor):
        return NVFP4Tensor(w.packed[expert], w.scale[expert], w.global_scale[expert], w.shape[1:])
    return MXFP4Tensor(w.packed[expert], w.scale[expert], w.shape[1:])
