"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1; DeepSeek-V3 report, 2.1.1).

Keys and values are compressed into one latent c_kv per token (`kv_lora_rank` wide) plus a
rope key k_pe shared by all heads; only those two are cached. Two equivalent forms:

- naive (prefill): up-project the cached latents with kv_b_proj into per-head keys and
  values, then ordinary attention. Cheap when many queries share one context.
- absorbed (decode): fold kv_b_proj's key half W_UK into the query and its value half
  W_UV into the output, so attention runs directly against the latent cache and no
  per-head key or value is ever materialized.

Legend: T = tokens, H = heads, Dn = qk_nope_head_dim, R = qk_rope_head_dim,
Dv = v_head_dim, C = kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata, MLAPath

from .config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, dtype, device)
        else:
            self.q_proj = Linear(d, h * cfg.qk_head_dim, dtype, device)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_cache_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, device)
        self.o_proj = Linear(h * cfg.v_head_dim, d, dtype, device)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        return q.view(x.shape[0], self.cfg.num_attention_heads, self.cfg.qk_head_dim)  # [T, H, Dn + R]

    def _kv_b(self) -> torch.Tensor:
        """kv_b_proj's weight as [H, Dn + Dv, C]."""
        return self.kv_b_proj.weight.view(self.cfg.num_attention_heads, -1, self.cfg.kv_lora_rank)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """x [T, D]; rope = (cos, sin) [T, R/2]; cache [N, B, C + R] for this layer. Returns [T, D]."""
        cfg = self.cfg
        q = self._queries(x)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        backend.write_kv(cache, self.kv_a_layernorm(latent), apply_rope(k_pe, *rope), meta)

        out = x.new_empty(x.shape[0], cfg.num_attention_heads, cfg.v_head_dim)  # [T, H, Dv]
        n_absorbed = {MLAPath.AUTO: meta.num_decodes, MLAPath.ABSORBED: len(meta.query_lens),
                      MLAPath.NAIVE: 0}[meta.path]
        if n_absorbed:
            rows = meta.token_range(0, n_absorbed)
            out[rows] = self._absorbed(q_nope[rows], q_pe[rows], cache, meta.sequences(0, n_absorbed), backend)
        if n_absorbed < len(meta.query_lens):
            rows = meta.token_range(n_absorbed, len(meta.query_lens))
            sub = meta.sequences(n_absorbed, len(meta.query_lens))
            out[rows] = backend.naive(q_nope[rows], q_pe[rows], cache, self._kv_b(), sub, cfg.softmax_scale)
        return self.o_proj(out.flatten(1))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                  meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """q_nope [T, H, Dn], q_pe [T, H, R] -> [T, H, Dv] through the latent space."""
        w = self._kv_b()
        w_uk, w_uv = w[:, : self.cfg.qk_nope_head_dim], w[:, self.cfg.qk_nope_head_dim:]
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, H, C]
        o_latent = backend.absorbed(q_latent, q_pe, cache, meta, self.cfg.softmax_scale)  # [T, H, C]
        return torch.einsum("thc,hvc->thv", o_latent, w_uv)
