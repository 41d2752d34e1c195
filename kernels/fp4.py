"""FP4 weight formats in plain torch: NVFP4 (NVIDIA ModelOpt) and MXFP4 (OCP microscaling).

Both store e2m1 values (1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6)
two per byte along the last (reduction) axis, the LOWER-index element in the LOW nibble:
byte j of a row holds elements 2j (bits 0-3) and 2j+1 (bits 4-7). That is how ModelOpt
packs (`NVFP4QTensor.quantize`: `(q[..., 1::2] << 4) | q[..., 0::2]`, NVIDIA/Model-Optimizer
modelopt/torch/quantization/qtensor/nvfp4_tensor.py), how vLLM unpacks
(`break_fp4_bytes`: low nibble first, vllm/.../quantization/utils/nvfp4_emulation_utils.py)
and how PyTorch's `float4_e2m1fn_x2` tests pack (`pack_uint4` in test/test_matmul_cuda.py).

- NVFP4 (ModelOpt checkpoints): one float8_e4m3fn scale per 16 values (`weight_scale`) and
  one fp32 scale per matrix (`weight_scale_2` = amax(w) / (6 * 448)); a value is
  e2m1 * float(weight_scale) * weight_scale_2.
- MXFP4 (OCP Microscaling Formats v1.0, section 6.3): one e8m0 scale per 32 values, a
  biased power of two 2^(byte - 127); the shared exponent is floor(log2(amax)) - 2, 2
  being e2m1's largest exponent, so the block maximum lands in [4, 8) and saturates to 6.

Rounding to the e2m1 grid is to nearest, ties to the even code (as ModelOpt's `_cast_fp4`),
and saturates at +-6. A reduction axis that is not a multiple of the block (16 / 32) is
zero-padded to one, as ModelOpt's `reduce_block_padding` does; `packed` and `scale` then
cover the padded length and `shape` keeps the logical one, which dequantization returns.

Legend: E = experts, N = output rows, K = reduction length (Kp: K padded to the block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
E2M1_EMAX = 2  # the largest e2m1 exponent: 6 = 1.5 * 2^2

# Code -> value; bit 3 is the sign, so codes 8-15 mirror 0-7 (code 8 is -0.0).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# Midpoints between neighbouring magnitudes; a tie rounds to the even code.
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
# The midpoints whose upper neighbour has the even code (1.0, 2.0, 4.0); ModelOpt's
# `_cast_fp4` adds 1 at e2m1_bounds[[1, 3, 5]], the same three.
_TIES_ROUNDING_UP = torch.tensor([0.75, 1.75, 3.5])


@dataclass(frozen=True)
class NVFP4Tensor:
    """A [..., N, K] weight in NVFP4, laid out as ModelOpt writes it.

    packed uint8 [..., N, Kp/2]; scale float8_e4m3fn [..., N, Kp/16] (`weight_scale`);
    global_scale fp32 [...] (`weight_scale_2`: a scalar for a matrix, [E] for stacked
    experts, one per linear layer as in the checkpoint); shape: the logical [..., N, K].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    shape: tuple[int, ...]

    block = NVFP4_BLOCK

    def __post_init__(self) -> None:
        _check_layout(self, torch.float8_e4m3fn)
        if self.global_scale.dtype != torch.float32 or tuple(self.global_scale.shape) != self.shape[:-2]:
            raise ValueError(f"NVFP4 global_scale must be fp32 of shape {list(self.shape[:-2])}, got "
                             f"{self.global_scale.dtype} {list(self.global_scale.shape)}")


@dataclass(frozen=True)
class MXFP4Tensor:
    """A [..., N, K] weight in MXFP4 (OCP MX v1.0).

    packed uint8 [..., N, Kp/2]; scale uint8 [..., N, Kp/32], e8m0 (2^(byte - 127));
    shape: the logical [..., N, K].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]

    block = MXFP4_BLOCK

    def __post_init__(self) -> None:
        _check_layout(self, torch.uint8)


def _check_layout(t: NVFP4Tensor | MXFP4Tensor, scale_dtype: torch.dtype) -> None:
    if len(t.shape) < 2:
        raise ValueError(f"FP4 tensors are [..., N, K], got shape {list(t.shape)}")
    padded = _round_up(t.shape[-1], t.block)
    want_packed, want_scale = (*t.shape[:-1], padded // 2), (*t.shape[:-1], padded // t.block)
    if t.packed.dtype != torch.uint8 or tuple(t.packed.shape) != want_packed:
        raise ValueError(f"packed must be uint8 {list(want_packed)}, got {t.packed.dtype} {list(t.packed.shape)}")
    if t.scale.dtype != scale_dtype or tuple(t.scale.shape) != want_scale:
        raise ValueError(f"scale must be {scale_dtype} {list(want_scale)}, got {t.scale.dtype} {list(t.scale.shape)}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [..., N, K] float -> fp32 [..., N, Kp/block, block], zero-padded along K."""
    if w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating [N, K] or [E, N, K] weight, got {w.dtype} {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with inf or nan values")
    w = w.float()
    w = F.pad(w, (0, _round_up(w.shape[-1], block) - w.shape[-1]))
    return w.view(*w.shape[:-1], -1, block)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by their scale) -> uint8 e2m1 codes 0-15.

    Nearest value, ties to the even code, magnitudes beyond 6 saturate to 6
    (the rule of ModelOpt's `NVFP4QTensor._cast_fp4`).
    """
    mag = x.abs()
    code = torch.searchsorted(_E2M1_BOUNDS.to(x.device), mag)  # index of the first bound >= mag
    code = code + torch.isin(mag, _TIES_ROUNDING_UP.to(x.device))
    return (code | (x < 0).long() << 3).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0-15 -> fp32 values."""
    return E2M1_VALUES.to(codes.device)[codes.int()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2M] -> uint8 [..., M]: element 2j in the low nibble, 2j+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., M] -> uint8 codes [..., 2M] (inverse of `pack_nibbles`)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize_nvfp4(w: torch.Tensor) -> NVFP4Tensor:
    """w [N, K] or [E, N, K] float -> NVFP4Tensor, one global scale per matrix.

    ModelOpt's dynamic weight path: weight_scale_2 = amax / (6 * 448); per 16 values
    weight_scale = e4m3(block_amax / (6 * weight_scale_2)), 1.0 for an all-zero block and at
    least 2^-9 (e4m3's smallest subnormal) so no block scale underflows to 0; values are
    divided by the e4m3-rounded block scale times weight_scale_2 and rounded to e2m1.
    An all-zero matrix gets weight_scale_2 = 1 (ModelOpt would divide by zero).
    """
    blocks = _blocks(w, NVFP4_BLOCK)  # [..., N, Kp/16, 16]
    amax = blocks.abs().amax(dim=(-3, -2, -1))  # [...]
    global_scale = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), 1.0)
    g = global_scale[..., None, None]
    block_scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * g)  # [..., N, Kp/16]
    block_scale = block_scale.masked_fill(block_scale == 0, 1.0).clamp(2.0 ** -9, E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn)
    codes = e2m1_encode(blocks / (scale.float() * g)[..., None])
    return NVFP4Tensor(pack_nibbles(codes.flatten(-2)), scale, global_scale, tuple(w.shape))


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4Tensor -> [..., N, K] in dtype: e2m1 * float(weight_scale) * weight_scale_2."""
    values = e2m1_decode(unpack_nibbles(t.packed)).unflatten(-1, (-1, NVFP4_BLOCK))
    values = values * t.scale.float()[..., None] * t.global_scale[..., None, None, None]
    return values.flatten(-2)[..., :t.shape[-1]].to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> MXFP4Tensor:
    """w [N, K] or [E, N, K] float -> MXFP4Tensor.

    Per 32 values, OCP MX v1.0 section 6.3: scale X = 2^(floor(log2(amax)) - 2), stored as
    the e8m0 byte exponent + 127; values are v / X rounded to e2m1 (saturating at 6).
    The exponent is clamped to [-126, 127], so byte 0 (2^-127) and 255 (NaN) are never
    written; an all-zero block gets whatever its clamped exponent is (its codes are 0).
    """
    blocks = _blocks(w, MXFP4_BLOCK)  # [..., N, Kp/32, 32]
    _, exp = torch.frexp(blocks.abs().amax(dim=-1))  # amax = m * 2^exp, m in [0.5, 1)
    shared = ((exp - 1) - E2M1_EMAX).clamp(1 - E8M0_BIAS, E8M0_BIAS)  # floor(log2(amax)) - 2
    codes = e2m1_encode(torch.ldexp(blocks, -shared[..., None]))
    scale = (shared + E8M0_BIAS).to(torch.uint8)
    return MXFP4Tensor(pack_nibbles(codes.flatten(-2)), scale, tuple(w.shape))


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 bytes -> fp32 powers of two 2^(byte - 127) (byte 255, NaN, is not checked)."""
    return torch.ldexp(torch.ones_like(scale, dtype=torch.float32), scale.int() - E8M0_BIAS)


def dequantize_mxfp4(t: MXFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4Tensor -> [..., N, K] in dtype: e2m1 * 2^(scale - 127)."""
    values = e2m1_decode(unpack_nibbles(t.packed)).unflatten(-1, (-1, MXFP4_BLOCK))
    values = values * e8m0_decode(t.scale)[..., None]
    return values.flatten(-2)[..., :t.shape[-1]].to(dtype)


def dequantize_fp4(t: NVFP4Tensor | MXFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Either format -> [..., N, K] in dtype."""
    return dequantize_nvfp4(t, dtype) if isinstance(t, NVFP4Tensor) else dequantize_mxfp4(t, dtype)
