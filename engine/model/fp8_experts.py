"""Routed experts of a DeepSeek FP8 checkpoint, kept in FP8 (`kernels.fp8`).

DeepSeek released V3 and R1 with every linear of the decoder in e4m3 with one fp32
`weight_scale_inv` per 128 x 128 block. The routed experts (~97% of the weights) load as
they are, values and scales, into the stacked layout, so they take 1 byte per weight (plus
4 per block) rather than the 2 of bf16; `moe_backends` dequantizes them in registers (CUDA)
or one routed expert at a time (CPU). The other linears are dequantized by the loader.

Over a tensor-parallel group each rank holds a slice of every expert's intermediate
dimension; its scale blocks must be its own, so the slice must be a whole number of blocks
(checked by RoutedExperts). Under expert parallelism whole experts load, unsliced.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8BlockTensor

from .fp4_experts import ExpertSlot


class FP8ExpertSlots:
    """Stacked FP8 storage that a DeepSeek FP8 checkpoint's per-expert tensors load into.

    Per expert e the checkpoint has gate_proj / up_proj / down_proj, each `weight`
    float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [ceil(N / bn), ceil(K / bk)]. Gate and up
    fill the two halves of w13 [E, 2I, D], each with its own block rows (FP8BlockTensor
    parts = 2); down fills w2 [E, D, I].
    """

    def __init__(self, experts: int, inter: int, hidden: int, block: tuple[int, int], device) -> None:
        (bn, bk), self.block = block, tuple(block)
        self.inter, self.rows = inter, -(-inter // bn)  # scale rows of gate (and of up)

        def storage(rows: int, cols: int, scale_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.empty(experts, rows, cols, dtype=torch.float8_e4m3fn, device=device),
                    torch.empty(experts, scale_rows, -(-cols // bk), dtype=torch.float32, device=device))
        self.w13, self.w13_scale = storage(2 * inter, hidden, 2 * self.rows)
        self.w2, self.w2_scale = storage(hidden, inter, -(-hidden // bn))

    def expert_slots(self, e: int) -> dict[str, ExpertSlot]:
        """Local expert e's checkpoint tensors (by name suffix) and where they go: values and
        scales of gate and up run along the intermediate size in their rows (bn of them per
        scale row), those of down in their columns (bk per scale column)."""
        (bn, bk), i, r = self.block, self.inter, self.rows
        slots = {}
        for half, proj in enumerate(("gate_proj", "up_proj")):
            slots.update({f"{proj}.weight": ExpertSlot(self.w13[e, half * i:(half + 1) * i], 0),
                          f"{proj}.weight_scale_inv": ExpertSlot(self.w13_scale[e, half * r:(half + 1) * r], 0, bn)})
        slots.update({"down_proj.weight": ExpertSlot(self.w2[e], 1),
                      "down_proj.weight_scale_inv": ExpertSlot(self.w2_scale[e], 1, bk)})
        return slots

    def finish(self) -> tuple[FP8BlockTensor, FP8BlockTensor]:
        """After loading: (w13 [E, 2I, D], w2 [E, D, I])."""
        return (FP8BlockTensor(self.w13, self.w13_scale, self.block, parts=2),
                FP8BlockTensor(self.w2, self.w2_scale, self.block))
