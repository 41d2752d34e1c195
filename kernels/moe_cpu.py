"""Routed experts for small CPU batches: every expert on every token, as two GEMMs.

At decode, a batch of T tokens touches up to T*K of E experts, and the per-expert loop
of `moe_ref.moe_reference` pays two small GEMMs (plus indexing) per touched expert. On a
CPU with bf16 matrix units the weights of all E experts stream through one [T, D] x
[D, E*2I] GEMM about as fast as through a few small ones, so for T up to a few dozen it
is cheaper to compute all experts and zero the unselected ones before the down
projection: silu(gate) * up is scaled by the token's routing weight (0 when not routed),
and the down projection over all experts [D, E*I] sums the experts inside the GEMM.

A single token (batch-1 decode) is the exception: it needs only K of the E experts, and
streaming all E experts' weights costs more than K pairs of small GEMMs on per-expert
packed weights, so that case runs only its routed experts (measured at E=16, K=4, D=512,
I=256 on 2 cores: 0.27 ms against 0.42 ms per layer, weights hot in cache).

Legend: T = tokens, D = hidden, E = experts, I = expert intermediate, K = experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_gemm import PackedWeight

DENSE_MAX_TOKENS = 256  # measured crossover with the per-expert loop: ~300 tokens (16 experts, bf16, AMX)


class DenseExperts:
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """w13 [E, 2I, D]; w2 [E, D, I]. Keeps packed copies laid out for the two GEMMs."""
        e, two_i, d = w13.shape
        self.experts, self.inter = e, two_i // 2
        up = w13.reshape(e * two_i, d)
        down = w2.permute(1, 0, 2).reshape(d, e * self.inter)  # [D, E*I]: experts side by side
        self.up = _linear(up)
        self.down = _linear(down.contiguous())
        self.expert_up = [_linear(w13[i]) for i in range(e)]
        self.expert_down = [_linear(w2[i]) for i in range(e)]

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64 (-1: held elsewhere) -> [T, D] in x's dtype."""
        t = x.shape[0]
        if t == 1:
            return self._one_token(x, weights, ids)
        h = self.up(x).view(t, self.experts, 2, self.inter)  # [T, E, 2, I]: gate, up
        act = F.silu(h[:, :, 0]) * h[:, :, 1]  # [T, E, I]
        held = ids >= 0
        combine = torch.zeros(t, self.experts, dtype=torch.float32, device=x.device).scatter_add_(
            1, ids.clamp(min=0), weights * held)
        act = act * combine.to(act.dtype)[..., None]
        return self.down(act.reshape(t, self.experts * self.inter))

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [1, D] -> [1, D]: the token's K experts only, summed in fp32 like the reference."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert, weight in zip(ids[0].tolist(), weights[0].tolist(), strict=True):
            if expert < 0:
                continue
            h = self.expert_up[expert](x)  # [1, 2I]
            y = self.expert_down[expert](F.silu(h[:, : self.inter]) * h[:, self.inter:])
            out.add_(y.float(), alpha=weight)
        return out.to(x.dtype)


def _linear(weight: torch.Tensor):
    """weight [out, in] as a callable x -> F.linear(x, weight), prepacked for oneDNN where it can be."""
    return PackedWeight.of(weight) or (lambda x: F.linear(x, weight))
