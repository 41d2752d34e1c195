"""FP4 formats (kernels/fp4.py): NVFP4 as ModelOpt writes it and MXFP4 as the OCP MX spec
defines it. Known answers pin the bit layout; round trips on representable values are exact;
random weights stay within half an e2m1 grid step of their scale."""

from __future__ import annotations

import pytest
import torch

from kernels.fp4 import (E2M1_VALUES, MXFP4Tensor, NVFP4Tensor, dequantize_mxfp4, dequantize_nvfp4,
                         e2m1_decode, e2m1_encode, quantize_mxfp4, quantize_nvfp4)

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def test_e2m1_codes_are_sign_bit_then_the_eight_magnitudes():
    assert torch.equal(e2m1_decode(torch.arange(16, dtype=torch.uint8)), E2M1_VALUES)
    assert torch.equal(E2M1_VALUES[:8], GRID) and torch.equal(E2M1_VALUES[8:], -GRID)


def test_e2m1_rounds_to_nearest_ties_to_even_code_and_saturates():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, -2.6, -0.1])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -3.0, -0.0])
    assert torch.equal(e2m1_decode(e2m1_encode(x)), want)


def test_nvfp4_packs_the_lower_index_element_into_the_low_nibble():
    row = torch.zeros(1, 16)
    row[0, :4] = torch.tensor([6.0, 1.0, -0.5, 3.0])  # codes 7, 2, 9, 5; block scale 448 makes them exact
    t = quantize_nvfp4(row)
    assert t.packed[0, :3].tolist() == [0x27, 0x59, 0x00]
    assert t.scale.view(torch.uint8).tolist() == [[0x7E]]  # e4m3 448 = 1.75 * 2^8
    assert t.global_scale.item() == pytest.approx(6.0 / (6 * 448), rel=1e-7)


def test_nvfp4_block_scales_are_e4m3_of_block_amax_over_6_times_global_scale():
    w = torch.zeros(1, 48)
    w[0, 0], w[0, 16] = 6.0, -3.0  # block 2 stays all zero
    t = quantize_nvfp4(w)
    # 448, 224 = 1.75 * 2^7, and 1.0 for the zero block (ModelOpt's rule)
    assert t.scale.view(torch.uint8).tolist() == [[0x7E, 0x76, 0x38]]
    assert t.global_scale.dtype == torch.float32 and t.global_scale.shape == ()


def test_mxfp4_shared_exponent_is_floor_log2_amax_minus_2():
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 32], w[0, 64], w[0, 96] = 6.0, 0.75, 7.0, -8.0
    t = quantize_mxfp4(w)
    assert t.scale.tolist() == [[127, 124, 127, 128]]  # 2^0, 2^-3, 2^0, 2^1
    assert dequantize_mxfp4(t)[0, [0, 32, 64, 96]].tolist() == [6.0, 0.75, 6.0, -8.0]  # 7 saturates to 6
    assert t.packed[0, [0, 16, 32, 48]].tolist() == [0x07, 0x07, 0x07, 0x0E]


def nvfp4_representable(lead: tuple[int, ...], n: int, k: int, seed: int) -> torch.Tensor:
    """e2m1 values x e4m3 block scales x power-of-two global scales that NVFP4 reproduces
    exactly: each block's first element is +-6 so its amax fixes the scale; one block per
    matrix has scale 448 so the matrix amax fixes the global scale; some blocks are zero."""
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // 16) * 16
    values = E2M1_VALUES[torch.randint(0, 16, (*lead, n, kp // 16, 16), generator=gen)]
    values[..., 0] = torch.where(torch.rand(values[..., 0].shape, generator=gen) < 0.5, -6.0, 6.0)
    scale_bytes = torch.randint(0x08, 0x7E, (*lead, n, kp // 16), generator=gen, dtype=torch.uint8)
    scale_bytes.view(-1, n * (kp // 16))[:, 0] = 0x7E
    scales = scale_bytes.view(torch.float8_e4m3fn).float()
    zero_blocks = torch.rand(scales.shape, generator=gen) < 0.1
    zero_blocks.view(-1, n * (kp // 16))[:, 0] = False
    values[zero_blocks] = 0.0
    global_scale = 2.0 ** -torch.randint(4, 12, lead, generator=gen).float()
    w = values * scales[..., None] * global_scale[..., None, None, None]
    return w.flatten(-2)[..., :k]


@pytest.mark.parametrize("lead,n,k", [((), 8, 64), ((3,), 6, 48), ((2,), 5, 40)])
def test_nvfp4_round_trip_is_exact_on_representable_values(lead, n, k):
    w = nvfp4_representable(lead, n, k, seed=k)
    t = quantize_nvfp4(w)
    assert t.shape == tuple(w.shape) and t.packed.shape == (*lead, n, -(-k // 16) * 8)
    assert t.global_scale.shape == lead
    assert torch.equal(dequantize_nvfp4(t), w)
    assert torch.equal(dequantize_nvfp4(t, torch.bfloat16), w.bfloat16())


@pytest.mark.parametrize("lead,n,k", [((), 8, 64), ((3,), 4, 96), ((2,), 5, 40)])
def test_mxfp4_round_trip_is_exact_on_representable_values(lead, n, k):
    gen = torch.Generator().manual_seed(k)
    kp = -(-k // 32) * 32
    values = E2M1_VALUES[torch.randint(0, 16, (*lead, n, kp // 32, 32), generator=gen)]
    values[..., 1, :] = 0.0  # an all-zero block
    w = values * 2.0 ** torch.randint(-20, 20, (*lead, n, kp // 32, 1), generator=gen).float()
    w = w.flatten(-2)[..., :k]
    t = quantize_mxfp4(w)
    assert t.shape == tuple(w.shape) and t.scale.shape == (*lead, n, kp // 32)
    assert torch.equal(dequantize_mxfp4(t), w)


def half_grid_step(q: torch.Tensor) -> torch.Tensor:
    """Half the e2m1 spacing around |q| (0.25 below 2, 0.5 below 4, 1 up to 6), plus how far
    |q| lies beyond 6 (saturation)."""
    a = q.abs()
    step = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))
    return step + (a - 6).clamp(min=0)


@pytest.mark.parametrize("shape", [(16, 100), (3, 8, 256)])
def test_nvfp4_error_is_within_half_a_grid_step_of_the_block_scale(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    t = quantize_nvfp4(w)
    k = shape[-1]
    block_scale = t.scale.float() * t.global_scale[..., None, None]  # [..., N, Kp/16]
    s = block_scale.repeat_interleave(16, dim=-1)[..., :k]
    err = (dequantize_nvfp4(t) - w).abs()
    assert (err <= half_grid_step(w / s) * s * (1 + 1e-6)).all()
    # e4m3 rounds the block scale by at most 1/16, so a block's largest value stays within 6 * 17/16
    assert (w / s).abs().max() <= 6 * 17 / 16
    assert (dequantize_nvfp4(t) - w).norm() / w.norm() < 0.11  # measured 0.095 on Gaussian weights


@pytest.mark.parametrize("shape", [(16, 100), (3, 8, 256)])
def test_mxfp4_error_is_within_half_a_grid_step_of_the_block_scale(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    t = quantize_mxfp4(w)
    s = (2.0 ** (t.scale.double() - 127)).float().repeat_interleave(32, dim=-1)[..., :shape[-1]]
    err = (dequantize_mxfp4(t) - w).abs()
    assert (err <= half_grid_step(w / s) * s).all()
    assert (w / s).abs().max() < 8  # the block maximum lands in [4, 8)
    assert (dequantize_mxfp4(t) - w).norm() / w.norm() < 0.13  # measured 0.115


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_nvfp4(torch.tensor([[1.0, float("nan")] * 8]))
    with pytest.raises(ValueError, match="floating"):
        quantize_mxfp4(torch.ones(32, dtype=torch.int32).view(1, 32))
    with pytest.raises(ValueError, match="floating"):
        quantize_nvfp4(torch.ones(16))
    t = quantize_nvfp4(torch.randn(4, 32))
    with pytest.raises(ValueError, match="scale must be"):
        NVFP4Tensor(t.packed, t.scale.view(torch.uint8), t.global_scale, t.shape)
    with pytest.raises(ValueError, match="packed must be"):
        MXFP4Tensor(t.packed[:, :8], torch.zeros(4, 1, dtype=torch.uint8), t.shape)


def test_an_all_zero_matrix_quantizes_to_zeros():
    t = quantize_nvfp4(torch.zeros(2, 4, 32))
    assert torch.equal(t.global_scale, torch.ones(2)) and not t.packed.any()
    assert not dequantize_nvfp4(t).any()
