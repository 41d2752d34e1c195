"""Rotary position embedding in DeepSeek's interleaved layout, with YaRN context extension.

DeepSeek rotates the pairs (x0, x1), (x2, x3), ... of the rope dims, each pair by one
frequency (the complex-number form of `inference/model.py`). YaRN (arXiv:2309.00071)
blends interpolated and extrapolated frequencies along a linear ramp between the
correction dims set by beta_fast / beta_slow; the matching softmax correction lives in
`ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [R/2] fp32, attention_factor applied to cos/sin)."""
    dim, base, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rs.is_yarn:
        return inv_freq, 1.0
    low = math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 takes the interpolated one
    inv_freq = inv_freq / rs.factor * (1 - extrapolate) + inv_freq * extrapolate
    if rs.mscale and rs.mscale_all_dim:
        factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        factor = yarn_mscale(rs.factor)
    return inv_freq, factor


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [T] int64 -> rotations [T, R/2] complex64 (attention_factor * e^(i angle))."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs as complex numbers. x [T, H, R]; rotations [T, R/2] complex64.
    Keeps x's dtype."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [T, H, R/2]
    return torch.view_as_real(pairs * rotations[:, None, :]).flatten(-2).to(x.dtype)
