"""Routed experts for small CPU batches: every expert on every token, as two GEMMs.

At decode, a batch of T tokens touches up to T*K of E experts, and the per-expert loop
of `moe_ref.moe_reference` pays two small GEMMs (plus indexing) per touched expert. On a
CPU with bf16 matrix units the weights of all E experts stream through one [T, D] x
[D, E*2I] GEMM about as fast as through a few small ones, so for T up to a few dozen it
is cheaper to compute all experts and zero the unselected ones before the down
projection: silu(gate) * up is scaled by the token's routing weight (0 when not routed),
and the down projection over all experts [D, E*I] sums the experts inside the GEMM.

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
        self.up = PackedWeight.of(up) or (lambda x, w=up: F.linear(x, w))
        self.down = PackedWeight.of(down) or (lambda x, w=down.contiguous(): F.linear(x, w))

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]; weights [T, K] fp32; ids [T, K] int64 -> [T, D] in x's dtype."""
        t = x.shape[0]
        h = self.up(x).view(t, self.experts, 2, self.inter)  # [T, E, 2, I]: gate, up
        act = F.silu(h[:, :, 0]) * h[:, :, 1]  # [T, E, I]
        combine = torch.zeros(t, self.experts, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
        act = act * combine.to(act.dtype)[..., None]
        return self.down(act.reshape(t, self.experts * self.inter))
