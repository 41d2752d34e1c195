"""The fused MoE grouped GEMM with FP4 expert weights dequantized in registers.

Two kernels walk the blocks of `triton_align.moe_align_block_size` (BLOCK_M routed slots
of one expert each) and read the packed weights straight from memory:
1. gate/up: for each slot, gate = x W_gate^T and up = x W_up^T over the same BLOCK_N
   columns, then silu(gate) * up in the epilogue -> h fp32 [T*K, I], row = slot.
2. down: h W_down^T, times the global scale and the slot's routing weight -> y fp32
   [T*K, D]; y.view(T, K, D).sum(1) then reduces the K slots of each token (a separate,
   deterministic reduction rather than atomics).
A packed byte holds elements 2j (low nibble) and 2j+1 (high nibble) of a row (see
`fp4`), so instead of interleaving the two nibbles in registers each K-step does two dots:
the activations' even columns with the low nibbles, the odd columns with the high ones.
The per-block scale multiplies the decoded e2m1 values (exact in bf16: at most 6
significant bits); the per-matrix NVFP4 global scale factors out of the sum and is
applied in the epilogue.

Natively the dots take bf16 operands with fp32 accumulation. The Triton interpreter
(TRITON_INTERPRET=1 when the kernels are imported) computes bf16 `tl.dot` wrongly, so
interpreted launches take fp32 operands instead (the DOT_FP32 constexpr).

Legend: T = tokens, D = hidden, E = experts, I = expert intermediate, K = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .fp4 import MXFP4Tensor, NVFP4Tensor, dequantize_fp4
from .moe_ref import moe_reference
from .triton_align import BlockAlignment, moe_align_block_size


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
def _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP: tl.constexpr, E8M0: tl.constexpr):
    """Weights of rows n [BLOCK_N], columns k0 .. k0+BLOCK_K, as two fp32 [BLOCK_K/2, BLOCK_N]
    tiles: even columns (low nibbles) and odd columns (high nibbles), times their block scale.
    w_ptr/s_ptr point at the expert's packed uint8 [N, Kp/2] and scale bytes [N, Kp/GROUP]."""
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
def _dot2(acc, a_even, a_odd, w_even, w_odd, DOT_FP32: tl.constexpr):
    """acc += a_even @ w_even + a_odd @ w_odd, in fp32 (interpreter) or bf16 (native)."""
    if DOT_FP32:
        acc = tl.dot(a_even.to(tl.float32), w_even, acc, input_precision="ieee")
        acc = tl.dot(a_odd.to(tl.float32), w_odd, acc, input_precision="ieee")
    else:
        acc = tl.dot(a_even.to(tl.bfloat16), w_even.to(tl.bfloat16), acc)
        acc = tl.dot(a_odd.to(tl.bfloat16), w_odd.to(tl.bfloat16), acc)
    return acc


@triton.jit
def _load_pair(a_ptr, rows, row_ok, stride_a, k0, K, BLOCK_K: tl.constexpr):
    """Even and odd columns k0 .. k0+BLOCK_K of rows `rows` of a row-major activation."""
    k = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    base = a_ptr + rows[:, None] * stride_a + k[None, :]
    even = tl.load(base, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
    odd = tl.load(base + 1, mask=row_ok[:, None] & ((k + 1) < K)[None, :], other=0.0)
    return even, odd


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, h_ptr, sorted_ptr, expert_ptr, used_ptr,
                    D, I, num_slots, stride_x, stride_we, stride_wn, stride_se, stride_sn,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, E8M0: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    """h[slot, n] = silu(x[t] . gate_n) * (x[t] . up_n) for the BLOCK_M slots of block pid 0.

    x [T, D] (fp32/bf16/fp16); w13 packed uint8 [E, 2I, Dp/2], scale [E, 2I, Dp/GROUP]
    (float8_e4m3fn or e8m0 bytes), global scale fp32 [E] (NVFP4) or unused (MXFP4);
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
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        x_even, x_odd = _load_pair(x_ptr, token, slot_ok, stride_x, k0, D, BLOCK_K)
        g_even, g_odd = _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, D, BLOCK_N, BLOCK_K, GROUP, E8M0)
        gate = _dot2(gate, x_even, x_odd, g_even, g_odd, DOT_FP32)
        u_even, u_odd = _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n + I, n_ok, k0, D, BLOCK_N, BLOCK_K, GROUP, E8M0)
        up = _dot2(up, x_even, x_odd, u_even, u_odd, DOT_FP32)
    if not E8M0:
        global_scale = tl.load(gs_ptr + expert)
        gate *= global_scale
        up *= global_scale
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot.to(tl.int64)[:, None] * I + n[None, :], h, mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, gs_ptr, rw_ptr, y_ptr, sorted_ptr, expert_ptr, used_ptr,
                 I, D, num_slots, stride_we, stride_wn, stride_se, stride_sn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr, E8M0: tl.constexpr, DOT_FP32: tl.constexpr):
    """y[slot, n] = routing_weight[slot] * (h[slot] . down_n) for the BLOCK_M slots of block pid 0.

    h fp32 [T*K, I]; w2 packed uint8 [E, D, Ip/2], scale [E, D, Ip/GROUP], global scale
    fp32 [E] (NVFP4); routing weights fp32 [T*K]; y fp32 [T*K, D]; sorted/expert/used as above.
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
        h_even, h_odd = _load_pair(h_ptr, slot, slot_ok, I, k0, I, BLOCK_K)
        w_even, w_odd = _fp4_tile(w_ptr, s_ptr, stride_wn, stride_sn, n, n_ok, k0, I, BLOCK_N, BLOCK_K, GROUP, E8M0)
        acc = _dot2(acc, h_even, h_odd, w_even, w_odd, DOT_FP32)
    scale = tl.load(rw_ptr + slot, mask=slot_ok, other=0.0)[:, None]
    if not E8M0:
        scale *= tl.load(gs_ptr + expert)
    tl.store(y_ptr + slot[:, None] * D + n[None, :], acc * scale, mask=slot_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class FusedMoEConfig:
    """Tile sizes. block_k is a multiple of 32 (both formats' scale blocks) and >= 32 so
    each half-tile dot has K >= 16; block_m >= 16 for tl.dot."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 32 or self.block_k % 32:
            raise ValueError(f"unsupported tile sizes {self}")


# Native tiles: the largest for which neither kernel spills registers when compiled for
# sm_90 (ptxas, checked without a GPU); their speed is not yet measured on one.
DECODE_CONFIG = FusedMoEConfig(block_m=16, block_n=64, block_k=128, num_warps=8)
PREFILL_CONFIG = FusedMoEConfig(block_m=64, block_n=64, block_k=64, num_warps=8)
INTERPRETER_CONFIG = FusedMoEConfig(block_m=16, block_n=32, block_k=32, num_warps=1)


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1
    when it was imported: @triton.jit chooses at decoration time)."""
    return not isinstance(_gate_up_kernel, JITFunction)


def default_config(num_slots: int) -> FusedMoEConfig:
    """Small tiles for the interpreter; natively 16-slot blocks up to 1024 routed slots
    (decode), 64 beyond (prefill)."""
    if interpreted():
        return INTERPRETER_CONFIG
    return DECODE_CONFIG if num_slots <= 1024 else PREFILL_CONFIG


def _check_shapes(x: torch.Tensor, w13: NVFP4Tensor | MXFP4Tensor, w2: NVFP4Tensor | MXFP4Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> None:
    if type(w13) is not type(w2) or not isinstance(w13, (NVFP4Tensor, MXFP4Tensor)):
        raise TypeError(f"w13 and w2 must both be NVFP4Tensor or both MXFP4Tensor, got "
                        f"{type(w13).__name__} and {type(w2).__name__}")
    if x.dim() != 2 or len(w13.shape) != 3 or len(w2.shape) != 3:
        raise ValueError(f"expected x [T, D], w13 [E, 2I, D], w2 [E, D, I]; got {list(x.shape)}, "
                         f"{list(w13.shape)}, {list(w2.shape)}")
    (e, two_i, d), inter = w13.shape, w13.shape[1] // 2
    if two_i % 2 or d != x.shape[1] or w2.shape != (e, d, inter):
        raise ValueError(f"shapes do not agree: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    if weights.shape != ids.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"weights and ids must both be [T, K] with T = {x.shape[0]}, got "
                         f"{list(weights.shape)} and {list(ids.shape)}")


class _Operand(NamedTuple):
    """An FP4 weight as the kernels take it."""

    packed: torch.Tensor  # uint8 [E, N, Kp/2]
    scale: torch.Tensor  # uint8 [E, N, Kp/GROUP]: e4m3 or e8m0 bytes
    global_scale: torch.Tensor  # fp32 [E]; MXFP4 has none and passes its scale, never read
    strides: tuple[int, int, int, int]  # packed expert and row, scale expert and row
    group: int
    e8m0: bool


def _operand(w: NVFP4Tensor | MXFP4Tensor) -> _Operand:
    packed, scale = w.packed.contiguous(), w.scale.contiguous().view(torch.uint8)
    nv = isinstance(w, NVFP4Tensor)
    return _Operand(packed, scale, w.global_scale.contiguous() if nv else scale,
                    (packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1)), w.block, not nv)


def fused_moe_fp4(x: torch.Tensor, w13: NVFP4Tensor | MXFP4Tensor, w2: NVFP4Tensor | MXFP4Tensor,
                  weights: torch.Tensor, ids: torch.Tensor, config: FusedMoEConfig | None = None) -> torch.Tensor:
    """Routed experts with FP4 weights: the fused twin of `fused_moe_fp4_reference`.

    x [T, D] bf16/fp16/fp32; w13 [E, 2I, D] (gate rows, then up rows) and w2 [E, D, I], both
    NVFP4Tensor or both MXFP4Tensor; weights [T, K] fp32 routing weights; ids [T, K] int
    expert ids in [0, E) (not checked on the device). Returns [T, D] in x's dtype.
    No host synchronization: buffer sizes follow from the shapes alone.
    """
    _check_shapes(x, w13, w2, weights, ids)
    (tokens, d), (e, two_i, _), top_k = x.shape, w13.shape, ids.shape[1]
    inter, slots = two_i // 2, tokens * top_k
    if slots == 0:
        return torch.zeros_like(x)
    cfg = config or default_config(slots)
    align: BlockAlignment = moe_align_block_size(ids, e, cfg.block_m)
    blocks = align.sorted_token_ids, align.expert_ids, align.num_tokens_post_padded
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = torch.empty((slots, inter), dtype=torch.float32, device=x.device)
    y = torch.empty((slots, d), dtype=torch.float32, device=x.device)
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_FP32=interpreted(),
                 num_warps=cfg.num_warps)
    up, down = _operand(w13), _operand(w2)
    _gate_up_kernel[(align.expert_ids.numel(), triton.cdiv(inter, cfg.block_n))](
        x, up.packed, up.scale, up.global_scale, h, *blocks, d, inter, slots, x.stride(0), *up.strides,
        TOP_K=top_k, GROUP=up.group, E8M0=up.e8m0, **tiles)
    _down_kernel[(align.expert_ids.numel(), triton.cdiv(d, cfg.block_n))](
        h, down.packed, down.scale, down.global_scale, weights.float().contiguous(), y, *blocks, inter, d, slots,
        *down.strides, GROUP=down.group, E8M0=down.e8m0, **tiles)
    return y.view(tokens, top_k, d).sum(dim=1).to(x.dtype)


def fused_moe_fp4_reference(x: torch.Tensor, w13: NVFP4Tensor | MXFP4Tensor, w2: NVFP4Tensor | MXFP4Tensor,
                            weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The spec: dequantize the weights to x's dtype, then the per-expert loop `moe_reference`.
    Same arguments and result as `fused_moe_fp4`."""
    _check_shapes(x, w13, w2, weights, ids)
    return moe_reference(x, dequantize_fp4(w13, x.dtype), dequantize_fp4(w2, x.dtype), weights, ids)
