"""The fused MoE grouped GEMM for every expert weight format, dequantized in registers.

Formats (`WeightFormat`): dense bf16 / fp16 / fp32 experts; DeepSeek's block FP8 (e4m3
values, one fp32 scale per 128 x 128 block, `kernels.fp8`); NVFP4 and MXFP4 (`kernels.fp4`).
Two kernels walk the blocks of `triton_align.moe_align_block_size` (BLOCK_M routed slots
of one expert each) and read the weights straight from memory:
1. gate/up: for each slot, gate = x W_gate^T and up = x W_up^T over the same BLOCK_N
   columns, then silu(gate) * up in the epilogue -> h fp32 [T*K, I], row = slot.
2. down: h W_down^T, times the slot's routing weight (and the NVFP4 global scale) -> y fp32
   [T*K, D]; y.view(T, K, D).sum(1) then reduces the K slots of each token (a separate,
   deterministic reduction rather than atomics).
Per K-step each format loads its own weight tile:
- dense: the [BLOCK_K, BLOCK_N] tile as it is.
- FP8: the e4m3 bytes decoded exactly to fp16 (value * 2^-8) by shifting their bits into
  place, one dot, then the partial sum times each column's block scale (x 2^8): BLOCK_K
  divides the block's 128 columns, so one K-step lies inside one scale column.
- FP4: a packed byte holds elements 2j (low nibble) and 2j+1 (high nibble) of a row (see
  `fp4`), so instead of interleaving the two nibbles in registers each K-step does two
  dots: the activations' even columns with the low nibbles, the odd columns with the high
  ones. The per-block scale multiplies the decoded e2m1 values (exact in bf16: at most 6
  significant bits); the per-matrix NVFP4 global scale factors out of the sum and is
  applied in the epilogue.

Natively the dots take bf16 operands (fp16 for fp16 experts, fp32 for fp32 experts) with
fp32 accumulation. The Triton interpreter (TRITON_INTERPRET=1 when the kernels are imported)
computes bf16 `tl.dot` wrongly, so interpreted launches take fp32 operands instead (the
DOT_FP32 constexpr).

Legend: T = tokens, D = hidden, E = experts, I = expert intermediate, K = experts per token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .fp4 import MXFP4Tensor, NVFP4Tensor
from .fp8 import FP8BlockTensor
from .moe_ref import ExpertWeights, dequantize_experts, moe_reference
from .triton_align import BlockAlignment, moe_align_block_size

class WeightFormat(enum.IntEnum):
    """The kernels' FORMAT constexpr (the _DENSE.. globals below are the same numbers)."""

    DENSE = 0  # bf16 / fp16 / fp32 values
    FP8 = 1  # e4m3 values, fp32 scale per block (DeepSeek)
    NVFP4 = 2  # e2m1 pairs, e4m3 scale per 16, fp32 global scale
    MXFP4 = 3  # e2m1 pairs, e8m0 scale per 32


_DENSE, _FP8, _NVFP4, _MXFP4 = (tl.constexpr(int(f)) for f in WeightFormat)


@triton.jit
def _e2m1_to_f32_over_2_14(code):
    """uint8 e2m1 codes (low 4 bits) -> fp32 value * 2^-14.

    The code's bits go straight into a float16: sign to bit 15, exponent and mantissa to
    bits 9-11. e2m1's exponent bias (1) and its subnormal (0.5) then read as fp16's, 2^14
    smaller, which the block scale undoes: two shifts, two ands and an or per value.
    """
    code = code.to(tl.int32)
    bits = (((code & 7) << 9) | ((code & 8) << 12)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_to_f16_over_2_8(byte):
    """float8_e4m3fn bytes (as uint8) -> float16 value * 2^-8, exactly.

    The same move for e4m3: exponent and mantissa (bits 0-6) go to fp16's bits 7-13, the
    sign to bit 15. e4m3's bias (7) and subnormals then read as fp16's (bias 15), 2^8
    smaller; the block scale undoes it. NaN (0x7f / 0xff) is not decoded.
    """
    byte = byte.to(tl.uint16)
    return (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _e4m3_to_f32(byte):
    """float8_e4m3fn bytes -> fp32 (bias 7; exponent 0 is subnormal: m * 2^-9; NaN not decoded)."""
    byte = byte.to(tl.int32)
    exp, mant = (byte >> 3) & 15, byte & 7
    normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(exp == 0, mant.to(tl.float32) * 0.001953125, normal)
    return tl.where((byte & 128) != 0, -mag, mag)


@triton.jit
def _e8m0_to_f32(byte):
    """e8m0 bytes -> fp32 2^(byte - 127); byte 0 is the subnormal 2^-127 (NaN, 255, not decoded)."""
    byte = byte.to(tl.int32)
    return tl.where(byte == 0, 0x400000, byte << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dot(acc, a, w, DOT_FP32: tl.constexpr):
    """acc + a @ w, fp32 accumulation: fp32 operands (interpreter, or fp32 weights), fp16
    operands for fp16 weights, bf16 otherwise."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif w.dtype == tl.float16:
        acc = tl.dot(a.to(tl.float16), w, acc)
    else:
        acc = tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    return acc


@triton.jit
def _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP: tl.constexpr, E8M0: tl.constexpr):
    """Weights of rows n [BLOCK_N], columns k0 .. k0+BLOCK_K, as two fp32 [BLOCK_K/2, BLOCK_N]
    tiles: even columns (low nibbles) and odd columns (high nibbles), times their block scale.
    w_ptr/s_ptr point at the matrix's packed uint8 [N, Kp/2] and scale bytes [N, Kp/GROUP]."""
    j = tl.arange(0, BLOCK_K // 2)
    byte = tl.load(w_ptr + n[None, :] * stride_wn + (k0 // 2 + j)[:, None],
                   mask=n_ok[None, :] & ((k0 + 2 * j) < K)[:, None], other=0)
    b = tl.arange(0, BLOCK_K // GROUP)
    raw = tl.load(s_ptr + n[None, :] * stride_sn + (k0 // GROUP + b)[:, None],
                  mask=n_ok[None, :] & ((k0 + b * GROUP) < K)[:, None], other=0)
    # [BLOCK_K/GROUP, BLOCK_N]; 2^14 undoes the decode's 2^-14 (e8m0 scales past 2^113 would
    # overflow: no weight comes near)
    scale = (_e8m0_to_f32(raw) if E8M0 else _e4m3_to_f32(raw)) * 16384.0
    lo = tl.reshape(_e2m1_to_f32_over_2_14(byte & 15), (BLOCK_K // GROUP, GROUP // 2, BLOCK_N))
    hi = tl.reshape(_e2m1_to_f32_over_2_14(byte >> 4), (BLOCK_K // GROUP, GROUP // 2, BLOCK_N))
    lo = tl.reshape(lo * scale[:, None, :], (BLOCK_K // 2, BLOCK_N))
    hi = tl.reshape(hi * scale[:, None, :], (BLOCK_K // 2, BLOCK_N))
    return lo, hi


@triton.jit
def _load_pair(a_ptr, rows, row_ok, stride_a, k0, K, BLOCK_K: tl.constexpr):
    """Even and odd columns k0 .. k0+BLOCK_K of rows `rows` of a row-major activation."""
    k = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    base = a_ptr + rows[:, None] * stride_a + k[None, :]
    even = tl.load(base, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
    odd = tl.load(base + 1, mask=row_ok[:, None] & ((k + 1) < K)[None, :], other=0.0)
    return even, odd


@triton.jit
def _fp4_step(acc, a_ptr, rows, row_ok, stride_a, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, E8M0: tl.constexpr,
              DOT_FP32: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + a[rows, k0:k0+BLOCK_K] @ W[n, k0:k0+BLOCK_K]^T, W in FP4."""
    a_even, a_odd = _load_pair(a_ptr, rows, row_ok, stride_a, k0, K, BLOCK_K)
    w_even, w_odd = _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K, BLOCK_N, BLOCK_K, GROUP, E8M0)
    return _dot(_dot(acc, a_even, w_even, DOT_FP32), a_odd, w_odd, DOT_FP32)


@triton.jit
def _dense_step(acc, a_ptr, rows, row_ok, stride_a, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K,
                BLOCK_K: tl.constexpr, FP8: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + a[rows, k0:k0+BLOCK_K] @ W[n, k0:k0+BLOCK_K]^T, W dense, or FP8
    with fp32 scales [N/SCALE_N, K/SCALE_K] at s_ptr (SCALE_K a multiple of BLOCK_K)."""
    k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * stride_a + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
    w = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & (k < K)[:, None], other=0)
    if FP8:
        scale = tl.load(s_ptr + (n // SCALE_N) * stride_sn + k0 // SCALE_K, mask=n_ok, other=0.0) * 256.0
        w = _e4m3_to_f16_over_2_8(w).to(tl.bfloat16)  # exact: 4 significant bits
        acc += _dot(tl.zeros_like(acc), a, w, DOT_FP32) * scale[None, :]
    else:
        acc = _dot(acc, a, w, DOT_FP32)
    return acc


@triton.jit
def _gemm_step(acc, a_ptr, rows, row_ok, stride_a, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr,
               SCALE_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """One K-step of either GEMM in weight format FORMAT (GROUP: values per scale along K)."""
    if FORMAT >= _NVFP4:
        acc = _fp4_step(acc, a_ptr, rows, row_ok, stride_a, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K,
                        BLOCK_N, BLOCK_K, GROUP, FORMAT == _MXFP4, DOT_FP32)
    else:
        acc = _dense_step(acc, a_ptr, rows, row_ok, stride_a, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K,
                          BLOCK_K, FORMAT == _FP8, SCALE_N, GROUP, DOT_FP32)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, h_ptr, sorted_ptr, expert_ptr, used_ptr,
                    D, I, num_slots, stride_x, stride_we, stride_wn, stride_se, stride_sn, up_scale_row,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr, SCALE_N: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    """h[slot, n] = silu(x[t] . gate_n) * (x[t] . up_n) for the BLOCK_M slots of block pid 0.

    x [T, D] (fp32/bf16/fp16); w13 [E, 2I, D] in FORMAT (see `_Operand`), its up half's
    scales from row up_scale_row of each expert's; global scale fp32 [E] (NVFP4) or unused;
    h fp32 [T*K, I]; sorted int32 [P], expert int32 [P/BLOCK_M], used int32 [1] (BlockAlignment).
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(used_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_ok = slot < num_slots
    token = (slot // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    w_ptr += expert * stride_we
    s_ptr += expert * stride_se
    w_up, s_up = w_ptr + I * stride_wn, s_ptr + up_scale_row * stride_sn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        gate = _gemm_step(gate, x_ptr, token, slot_ok, stride_x, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0,
                          D, BLOCK_N, BLOCK_K, FORMAT, GROUP, SCALE_N, DOT_FP32)
        up = _gemm_step(up, x_ptr, token, slot_ok, stride_x, w_up, s_up, stride_wn, stride_sn, n, n_ok, k0,
                        D, BLOCK_N, BLOCK_K, FORMAT, GROUP, SCALE_N, DOT_FP32)
    if FORMAT == _NVFP4:
        global_scale = tl.load(gs_ptr + expert)
        gate *= global_scale
        up *= global_scale
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot.to(tl.int64)[:, None] * I + n[None, :], h, mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, gs_ptr, rw_ptr, y_ptr, sorted_ptr, expert_ptr, used_ptr,
                 I, D, num_slots, stride_we, stride_wn, stride_se, stride_sn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FORMAT: tl.constexpr, GROUP: tl.constexpr, SCALE_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """y[slot, n] = routing_weight[slot] * (h[slot] . down_n) for the BLOCK_M slots of block pid 0.

    h fp32 [T*K, I]; w2 [E, D, I] in FORMAT, global scale fp32 [E] (NVFP4); routing weights
    fp32 [T*K]; y fp32 [T*K, D]; sorted/expert/used as above.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(used_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    slot_ok = slot < num_slots
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    w_ptr += expert * stride_we
    s_ptr += expert * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        acc = _gemm_step(acc, h_ptr, slot, slot_ok, I, w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, I,
                         BLOCK_N, BLOCK_K, FORMAT, GROUP, SCALE_N, DOT_FP32)
    scale = tl.load(rw_ptr + slot, mask=slot_ok, other=0.0)[:, None]
    if FORMAT == _NVFP4:
        scale *= tl.load(gs_ptr + expert)
    tl.store(y_ptr + slot[:, None] * D + n[None, :], acc * scale, mask=slot_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class FusedMoEConfig:
    """Tile sizes. block_k is a multiple of 32 (both FP4 formats' scale blocks) and >= 32 so
    each FP4 half-tile dot has K >= 16; block_m >= 16 for tl.dot. FP8 runs with
    min(block_k, the FP8 block's columns) so that a K-step lies inside one scale column."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 32 or self.block_k % 32:
            raise ValueError(f"unsupported tile sizes {self}")


# Native tiles: the largest for which neither kernel spills registers when compiled for
# sm_90 (ptxas -v, checked without a GPU); their speed is not yet measured on one. Dense and
# FP8 tiles hold a value per register where FP4 holds two, so their decode tiles are half as deep.
DECODE_CONFIG = FusedMoEConfig(block_m=16, block_n=64, block_k=128, num_warps=8)
DENSE_DECODE_CONFIG = FusedMoEConfig(block_m=16, block_n=64, block_k=64, num_warps=8)
PREFILL_CONFIG = FusedMoEConfig(block_m=64, block_n=64, block_k=64, num_warps=8)
INTERPRETER_CONFIG = FusedMoEConfig(block_m=16, block_n=32, block_k=32, num_warps=1)


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1
    when it was imported: @triton.jit chooses at decoration time)."""
    return not isinstance(_gate_up_kernel, JITFunction)


def default_config(num_slots: int, fmt: WeightFormat = WeightFormat.NVFP4) -> FusedMoEConfig:
    """Small tiles for the interpreter; natively 16-slot blocks up to 1024 routed slots
    (decode), 64 beyond (prefill)."""
    if interpreted():
        return INTERPRETER_CONFIG
    if num_slots > 1024:
        return PREFILL_CONFIG
    return DENSE_DECODE_CONFIG if fmt in (WeightFormat.DENSE, WeightFormat.FP8) else DECODE_CONFIG


class _Operand(NamedTuple):
    """One stacked expert weight [E, N, K] as the kernels take it."""

    weight: torch.Tensor  # dense [E, N, K]; FP8 bytes uint8 [E, N, K]; FP4 packed uint8 [E, N, Kp/2]
    scale: torch.Tensor  # FP8 fp32 [E, N/SCALE_N, K/GROUP]; FP4 bytes uint8 [E, N, Kp/GROUP]; dense: unread
    global_scale: torch.Tensor  # NVFP4 fp32 [E]; otherwise `scale`, never read
    strides: tuple[int, int, int, int]  # weight expert and row, scale expert and row
    format: WeightFormat
    group: int  # values per scale along K (FP8: the block's columns)
    scale_n: int  # rows per scale (FP8: the block's rows; 1 otherwise)
    up_scale_row: int  # w13: the scale row where the up half's begin (dense: unused)
    dot_fp32: bool  # fp32 dot operands: interpreted, or fp32 dense weights

    @classmethod
    def of(cls, w: ExpertWeights, inter: int) -> "_Operand":
        """w, and for a w13 [E, 2I, D] its intermediate size I."""
        if isinstance(w, FP8BlockTensor):
            weight, scale = w.weight.contiguous().view(torch.uint8), w.scale_inv.contiguous()
            up_row = scale.shape[1] // 2 if w.parts == 2 else inter // w.block[0]
            fmt, group, scale_n = WeightFormat.FP8, w.block[1], w.block[0]
        elif isinstance(w, (NVFP4Tensor, MXFP4Tensor)):
            weight, scale = w.packed.contiguous(), w.scale.contiguous().view(torch.uint8)
            up_row, group, scale_n = inter, w.block, 1
            fmt = WeightFormat.NVFP4 if isinstance(w, NVFP4Tensor) else WeightFormat.MXFP4
        else:
            weight = scale = w.contiguous()
            fmt, group, scale_n, up_row = WeightFormat.DENSE, 1, 1, 0
        gs = w.global_scale.contiguous() if fmt is WeightFormat.NVFP4 else scale
        return cls(weight, scale, gs, (weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1)), fmt,
                   group, scale_n, up_row, interpreted() or weight.dtype == torch.float32)

    def constexprs(self) -> dict:
        return dict(FORMAT=int(self.format), GROUP=self.group, SCALE_N=self.scale_n, DOT_FP32=self.dot_fp32)


def weight_format(w: ExpertWeights) -> WeightFormat:
    """The format of a stacked expert weight; TypeError for anything else."""
    if torch.is_tensor(w):
        return WeightFormat.DENSE
    for kind, fmt in ((FP8BlockTensor, WeightFormat.FP8), (NVFP4Tensor, WeightFormat.NVFP4),
                      (MXFP4Tensor, WeightFormat.MXFP4)):
        if isinstance(w, kind):
            return fmt
    raise TypeError(f"expert weights must be a tensor, FP8BlockTensor, NVFP4Tensor or MXFP4Tensor, "
                    f"got {type(w).__name__}")


def _check_shapes(x: torch.Tensor, w13: ExpertWeights, w2: ExpertWeights,
                  weights: torch.Tensor, ids: torch.Tensor) -> None:
    if weight_format(w13) is not weight_format(w2):
        raise TypeError(f"w13 and w2 must be of one format (both tensors, FP8BlockTensor, NVFP4Tensor or "
                        f"MXFP4Tensor), got {type(w13).__name__} and {type(w2).__name__}")
    if x.dim() != 2 or len(w13.shape) != 3 or len(w2.shape) != 3:
        raise ValueError(f"expected x [T, D], w13 [E, 2I, D], w2 [E, D, I]; got {list(x.shape)}, "
                         f"{list(w13.shape)}, {list(w2.shape)}")
    (e, two_i, d), inter = w13.shape, w13.shape[1] // 2
    if two_i % 2 or d != x.shape[1] or tuple(w2.shape) != (e, d, inter):
        raise ValueError(f"shapes do not agree: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    if weights.shape != ids.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"weights and ids must both be [T, K] with T = {x.shape[0]}, got "
                         f"{list(weights.shape)} and {list(ids.shape)}")
    if torch.is_tensor(w13) and (not w13.is_floating_point() or w13.dtype != w2.dtype):
        raise TypeError(f"dense experts must be one floating dtype, got {w13.dtype} and {w2.dtype}")
    if isinstance(w13, FP8BlockTensor):
        _check_fp8(w13, w2, inter)


def _check_fp8(w13: FP8BlockTensor, w2: FP8BlockTensor, inter: int) -> None:
    """The FP8 blocks the kernels can take: one block size, a power of two of at least 16
    columns (a K-step of 16 to 128 columns lies inside one); w13's halves on their own block
    rows (parts 2) or on a shared grid (I a multiple of the block's rows)."""
    (bn, bk), parts_ok = w13.block, w13.parts == 2 or inter % w13.block[0] == 0
    if w2.block != w13.block or w2.parts != 1 or not parts_ok or bk < 16 or bk & (bk - 1) or bn < 1:
        raise ValueError(f"unsupported FP8 layout: w13 blocks {w13.block} in {w13.parts} part(s), w2 blocks "
                         f"{w2.block} in {w2.parts} (need one power-of-two block of >= 16 columns, w2 in one "
                         f"part, w13's gate and up on their own block rows)")


def fused_moe(x: torch.Tensor, w13: ExpertWeights, w2: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor,
              config: FusedMoEConfig | None = None) -> torch.Tensor:
    """Routed experts in one format: the fused twin of `fused_moe_reference`.

    x [T, D] bf16/fp16/fp32; w13 [E, 2I, D] (gate rows, then up rows) and w2 [E, D, I], both
    dense tensors of one dtype, both FP8BlockTensor, both NVFP4Tensor or both MXFP4Tensor;
    weights [T, K] fp32 routing weights; ids [T, K] int expert ids in [0, E) (not checked
    on the device). Returns [T, D] in x's dtype.
    No host synchronization: buffer sizes follow from the shapes alone.
    """
    _check_shapes(x, w13, w2, weights, ids)
    (tokens, d), (e, two_i, _), top_k = x.shape, w13.shape, ids.shape[1]
    inter, slots = two_i // 2, tokens * top_k
    if slots == 0:
        return torch.zeros_like(x)
    cfg = config or default_config(slots, weight_format(w13))
    block_k = min(cfg.block_k, w13.block[1]) if isinstance(w13, FP8BlockTensor) else cfg.block_k
    align: BlockAlignment = moe_align_block_size(ids, e, cfg.block_m)
    blocks = align.sorted_token_ids, align.expert_ids, align.num_tokens_post_padded
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = torch.empty((slots, inter), dtype=torch.float32, device=x.device)
    y = torch.empty((slots, d), dtype=torch.float32, device=x.device)
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps)
    up, down = _Operand.of(w13, inter), _Operand.of(w2, inter)
    _gate_up_kernel[(align.expert_ids.numel(), triton.cdiv(inter, cfg.block_n))](
        x, up.weight, up.scale, up.global_scale, h, *blocks, d, inter, slots, x.stride(0), *up.strides,
        up.up_scale_row, TOP_K=top_k, **up.constexprs(), **tiles)
    _down_kernel[(align.expert_ids.numel(), triton.cdiv(d, cfg.block_n))](
        h, down.weight, down.scale, down.global_scale, weights.float().contiguous(), y, *blocks, inter, d, slots,
        *down.strides, **down.constexprs(), **tiles)
    return y.view(tokens, top_k, d).sum(dim=1).to(x.dtype)


def fused_moe_reference(x: torch.Tensor, w13: ExpertWeights, w2: ExpertWeights,
                        weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The spec: dequantize the weights to x's dtype, then the per-expert loop `moe_reference`.
    Same arguments and result as `fused_moe`."""
    _check_shapes(x, w13, w2, weights, ids)
    return moe_reference(x, dequantize_experts(w13, x.dtype), dequantize_experts(w2, x.dtype), weights, ids)
