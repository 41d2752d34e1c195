"""DeepSeek-V3 grouped top-k routing as one Triton kernel.

The reference, and the spec, is `moe_ref.grouped_topk`: sigmoid scores, plus the
correction bias for choosing; groups ranked by the sum of their two best biased scores;
the best `topk_group` groups; the top-k experts in them by biased score; weights are the
unbiased scores, renormalized and scaled. One program routes one token, so a decode batch
is one launch; experts are padded to a power of two inside the kernel.

Legend: T = tokens, E = routed experts, G = expert groups, K = experts per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_scores(biased, e, e_ok, g, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """biased fp32 [E_P2] -> ([G_P2] sum of each group's two best (or one if GROUP_SIZE is 1),
    -inf for padding groups; member bool [G_P2, E_P2])."""
    member = ((e[None, :] // GROUP_SIZE) == g[:, None]) & e_ok[None, :]
    vals = tl.where(member, biased[None, :], float("-inf"))
    best = tl.max(vals, axis=1)
    if GROUP_SIZE > 1:
        first = tl.argmax(vals, axis=1)
        best += tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), vals), axis=1)
    return tl.where(g < NUM_GROUPS, best, float("-inf")), member


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, scaling,
                         E_P2: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, G_P2: tl.constexpr,
                         TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, K_P2: tl.constexpr,
                         NORMALIZE: tl.constexpr):
    """logits fp32 [T, E] (row stride stride_t); bias fp32 [E]; weights fp32 [T, K]; ids int64 [T, K]."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P2)
    e_ok = e < NUM_GROUPS * GROUP_SIZE
    scores = tl.sigmoid(tl.load(logits_ptr + t * stride_t + e, mask=e_ok, other=0.0).to(tl.float32))
    biased = tl.where(e_ok, scores + tl.load(bias_ptr + e, mask=e_ok, other=0.0), float("-inf"))
    g = tl.arange(0, G_P2)
    group_score, member = _group_scores(biased, e, e_ok, g, NUM_GROUPS, GROUP_SIZE)
    chosen = g < 0  # all False
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.argmax(group_score, axis=0)
        chosen = chosen | (g == best)
        group_score = tl.where(g == best, float("-inf"), group_score)
    allowed = tl.max((member & chosen[:, None]).to(tl.int32), axis=0) > 0  # [E_P2]
    candidates = tl.where(allowed, biased, float("-inf"))
    k = tl.arange(0, K_P2)
    top_w = tl.zeros((K_P2,), dtype=tl.float32)
    top_id = tl.zeros((K_P2,), dtype=tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(candidates, axis=0)
        top_w = tl.where(k == i, tl.sum(tl.where(e == best, scores, 0.0), axis=0), top_w)
        top_id = tl.where(k == i, best.to(tl.int64), top_id)
        candidates = tl.where(e == best, float("-inf"), candidates)
    if NORMALIZE:
        top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
    tl.store(weights_ptr + t * TOP_K + k, top_w * scaling, mask=k < TOP_K)
    tl.store(ids_ptr + t * TOP_K + k, top_id, mask=k < TOP_K)


def triton_grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                        n_group: int, topk_group: int, norm_topk_prob: bool = True,
                        routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `moe_ref.grouped_topk`, same arguments and results.

    router_logits [T, E] fp32 (any float; read as fp32); correction_bias [E] fp32.
    Returns (weights [T, K] fp32, expert ids [T, K] int64), experts in descending biased score.
    """
    tokens, experts = router_logits.shape
    if experts % n_group or not 0 < topk_group <= n_group or top_k > topk_group * (experts // n_group):
        raise ValueError(f"cannot choose {top_k} of {experts} experts from {topk_group} of {n_group} groups")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    if tokens:
        _grouped_topk_kernel[(tokens,)](
            logits, correction_bias.float().contiguous(), weights, ids, logits.stride(0),
            float(routed_scaling_factor), E_P2=triton.next_power_of_2(experts), NUM_GROUPS=n_group,
            GROUP_SIZE=experts // n_group,
            G_P2=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, TOP_K=top_k,
            K_P2=triton.next_power_of_2(top_k), NORMALIZE=norm_topk_prob)
    return weights, ids
