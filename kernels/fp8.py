"""DeepSeek's FP8 weight format in plain torch: float8_e4m3fn values with one fp32
`weight_scale_inv` per block of bn x bk values (128 x 128 in the V3 and R1 releases).

A value is float(e4m3) * scale_inv[row // bn, col // bk]; a weight whose sides are not
multiples of the block has smaller blocks at its edges (the scale grid is rounded up).
The routed experts' gate and up projections are stacked as one w13 [E, 2I, D] (see
engine/model/moe.py); each keeps the block rows of its own checkpoint tensor, so w13 is
`parts` = 2 matrices of I rows, and its scale has 2 * ceil(I / bn) rows, gate's first.

Legend: E = experts, N = output rows, K = reduction length, P = parts, bn x bk = block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
DEEPSEEK_BLOCK = (128, 128)


@dataclass(frozen=True)
class FP8BlockTensor:
    """A [..., N, K] weight in DeepSeek's block FP8.

    weight float8_e4m3fn [..., N, K]; scale_inv fp32 [..., P * ceil(N / P / bn), ceil(K / bk)];
    block (bn, bk); parts P: N is P stacked matrices of N / P rows, each with its own
    block rows (1 for one checkpoint tensor, 2 for gate and up fused)."""

    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] = DEEPSEEK_BLOCK
    parts: int = 1

    def __post_init__(self) -> None:
        if self.weight.dim() < 2 or self.weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight must be float8_e4m3fn [..., N, K], got {self.weight.dtype} "
                             f"{list(self.weight.shape)}")
        n, k = self.weight.shape[-2:]
        if self.parts < 1 or n % self.parts:
            raise ValueError(f"{n} rows do not split into {self.parts} parts")
        want = (*self.weight.shape[:-2], self.parts * _cdiv(n // self.parts, self.block[0]), _cdiv(k, self.block[1]))
        if self.scale_inv.dtype != torch.float32 or tuple(self.scale_inv.shape) != want:
            raise ValueError(f"scale_inv must be fp32 {list(want)} for blocks of {self.block[0]} x {self.block[1]}, "
                             f"got {self.scale_inv.dtype} {list(self.scale_inv.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def expert(self, e: int) -> "FP8BlockTensor":
        """Matrix `e` of a stacked [E, N, K] weight, as an [N, K] one (views, no copy)."""
        return FP8BlockTensor(self.weight[e], self.scale_inv[e], self.block, self.parts)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = DEEPSEEK_BLOCK, parts: int = 1) -> FP8BlockTensor:
    """w [..., N, K] float -> FP8BlockTensor, as DeepSeek's release quantizes: each block is
    scaled so its largest magnitude maps to 448 (scale_inv = amax / 448; an all-zero block
    gets amax 1e-12)."""
    *lead, n, k = w.shape
    bn, bk = block
    rows = n // parts
    w = w.float().reshape(*lead, parts, rows, k)
    padded = torch.zeros(*lead, parts, _cdiv(rows, bn) * bn, _cdiv(k, bk) * bk, device=w.device)
    padded[..., :rows, :k] = w
    blocks = padded.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # [..., P, N/bn, bn, K/bk, bk]
    scale_inv = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / E4M3_MAX  # [..., P, N/bn, K/bk]
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.flatten(-2).flatten(-3, -2)[..., :rows, :k].reshape(*lead, n, k)
    return FP8BlockTensor(q.contiguous(), scale_inv.flatten(-3, -2).contiguous(), tuple(block), parts)


def block_scales(t: FP8BlockTensor) -> torch.Tensor:
    """Each value's scale: fp32 [..., N, K]."""
    *lead, n, k = t.shape
    bn, bk = t.block
    rows = n // t.parts
    scale = t.scale_inv.unflatten(-2, (t.parts, -1))  # [..., P, ceil(rows/bn), ceil(K/bk)]
    scale = scale.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :k]
    return scale.reshape(*lead, n, k)


def dequantize_fp8_block(t: FP8BlockTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8BlockTensor -> [..., N, K] in dtype: float(e4m3) * scale_inv, in fp32, then cast."""
    *lead, n, k = t.shape
    (bn, bk), rows = t.block, n // t.parts
    if rows % bn or k % bk:  # edge blocks: expand the scales to every value
        return (t.weight.float() * block_scales(t)).to(dtype)
    blocks = t.weight.float().reshape(*lead, n // bn, bn, k // bk, bk)
    return (blocks * t.scale_inv[..., :, None, :, None]).reshape(*lead, n, k).to(dtype)
