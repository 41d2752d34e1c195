"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1; DeepSeek-V3 report, 2.1.1).

Keys and values are compressed into one latent c_kv per token (`kv_lora_rank` wide) plus a
rope key k_pe shared by all heads; only those two are cached. Two equivalent forms:

- naive (prefill): up-project the cached latents with kv_b_proj into per-head keys and
  values, then ordinary attention. Cheap when many queries share one context.
- absorbed (decode): fold kv_b_proj's key half W_UK into the query and its value half
  W_UV into the output, so attention runs directly against the latent cache and no
  per-head key or value is ever materialized.

Tensor parallelism (as DeepSeek's and vLLM's MLA do it): the heads are split over the TP
group. Each rank holds its heads' rows of q_b_proj and kv_b_proj and their columns of
o_proj (row-parallel: the partial outputs are summed over the group); the down-projections
and the latent cache are the same on every rank, each computing and caching them itself.

Legend: T = tokens, H = heads (this rank's), Dn = qk_nope_head_dim, R = qk_rope_head_dim,
Dv = v_head_dim, C = kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata

from engine.distributed import Group, ParallelState

from .config import ModelConfig
from .layers import Linear, RMSNorm, shard_slot
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, group: Group | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.group = group or ParallelState.single().tp
        if cfg.num_attention_heads % self.group.size:
            raise ValueError(f"--tensor-parallel-size {self.group.size} does not divide the "
                             f"{cfg.num_attention_heads} attention heads")
        self.heads = h = cfg.num_attention_heads // self.group.size
        self.head_part = range(self.group.rank * h, (self.group.rank + 1) * h)
        d = cfg.hidden_size
        # Both down-projections read x: one [q_lora_rank + C + R, D] GEMM (q_lora_rank 0 without q LoRA).
        self.q_rank = cfg.q_lora_rank or 0
        self.fused_a_proj = Linear(d, self.q_rank + cfg.kv_cache_dim, dtype, device)
        if cfg.q_lora_rank:
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, dtype, device)
        else:
            self.q_proj = Linear(d, h * cfg.qk_head_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, device)
        self.o_proj = Linear(h * cfg.v_head_dim, d, dtype, device)
        self.w_kv_b: torch.Tensor | None = None  # set by absorb_weights once the weights are loaded
        self.w_uk: torch.Tensor | None = None
        self.w_uv_t: torch.Tensor | None = None

    def checkpoint_slots(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint's q_a_proj and kv_a_proj_with_mqa fill rows of fused_a_proj."""
        w = self.fused_a_proj.weight
        slots = {prefix + "kv_a_proj_with_mqa.weight": w[self.q_rank:]}
        if self.q_rank:
            slots[prefix + "q_a_proj.weight"] = w[: self.q_rank]
        for name, param in self.named_parameters():
            if not name.startswith("fused_a_proj."):
                slots[prefix + name] = param
        cfg, heads, full = self.cfg, self.head_part, self.cfg.num_attention_heads
        for name, dim, per_head in (("q_b_proj" if self.q_rank else "q_proj", 0, cfg.qk_head_dim),
                                    ("kv_b_proj", 0, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                    ("o_proj", 1, cfg.v_head_dim)):
            rows = range(heads.start * per_head, heads.stop * per_head)
            key = f"{prefix}{name}.weight"
            slots[key] = shard_slot(slots[key], dim, rows, full * per_head)
        return slots

    def _queries(self, x: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        """x [T, D]; q_a [T, q_lora_rank] -> q [T, H, Dn + R]."""
        q = self.q_b_proj(self.q_a_layernorm(q_a)) if self.q_rank else self.q_proj(x)
        return q.view(x.shape[0], self.heads, self.cfg.qk_head_dim)

    def absorb_weights(self, dtype: torch.dtype) -> None:
        """After loading: W_UK [H, Dn, C] and W_UV^T [H, C, Dv] for the absorbed form, and
        kv_b_proj as [H, Dn + Dv, C] for the naive one, in `dtype`.

        In the weights' own dtype they are views of kv_b_proj's weight: no memory at all, and
        the GEMMs read the transposes through their strides (the GPU path, bf16 with fp32
        accumulation). In another dtype (fp32 on the CPU, where the fused C++ decode step
        and the comparison with transformers read fp32) they are contiguous copies, so that
        decode folds them in with two small batched GEMMs instead of converting each step."""
        w = self._kv_b()  # [H, Dn + Dv, C]
        nope = self.cfg.qk_nope_head_dim
        if dtype == w.dtype:
            self.w_kv_b, self.w_uk, self.w_uv_t = w, w[:, :nope], w[:, nope:].transpose(1, 2)
            return
        self.w_kv_b = w = w.to(dtype)
        self.w_uk = w[:, :nope].contiguous()
        self.w_uv_t = w[:, nope:].transpose(1, 2).contiguous()

    def _kv_b(self) -> torch.Tensor:
        """kv_b_proj's weight as [H, Dn + Dv, C]."""
        return self.kv_b_proj.weight.view(self.heads, -1, self.cfg.kv_lora_rank)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """x [T, D]; rope [T, R/2] complex64; cache [N, B, C + R] for this layer. Returns [T, D]."""
        cfg = self.cfg
        q_a, latent, k_pe = self.fused_a_proj(x).split([self.q_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        q_nope, q_pe = self._queries(x, q_a).split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        # one rotation for the queries' rope parts and the shared rope key (as an extra head)
        pe = apply_rope(torch.cat((q_pe, k_pe[:, None]), dim=1), rope)
        q_pe, k_pe = pe[:, :-1], pe[:, -1]
        backend.write_kv(cache, self.kv_a_layernorm(latent), k_pe, meta)

        # the forms cover the step's tokens in order, absorbed rows first: their outputs concatenate
        parts = [self._absorbed(q_nope[rows], q_pe[rows], cache, sub, backend) if absorbed else
                 backend.naive(q_nope[rows], q_pe[rows], cache, self.w_kv_b, sub, cfg.softmax_scale)
                 for rows, sub, absorbed in meta.forms]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, Dv]
        return self.group.all_reduce(self.o_proj(out.flatten(1)))  # [T, H * Dv] -> [T, D]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                  meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """q_nope [T, H, Dn], q_pe [T, H, R] -> [T, H, Dv] through the latent space."""
        if self.w_uk is None:
            raise RuntimeError("MLA.absorb_weights() must run once the weights are loaded (finish_loading)")
        dtype = self.w_uk.dtype
        q_latent = torch.bmm(q_nope.to(dtype).transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, C]
        o_latent = backend.absorbed(q_latent, q_pe.to(dtype), cache, meta, self.cfg.softmax_scale)  # [T, H, C]
        return torch.bmm(o_latent.to(dtype).transpose(0, 1), self.w_uv_t).transpose(0, 1).to(q_nope.dtype)
