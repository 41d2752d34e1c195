"""Routed experts held in FP4: the formats `--quantization` asks for, and the loader slots
that fill them (from an NVFP4 checkpoint, or quantizing a dense / FP8 one as it loads).

Only the routed experts are quantized (they are ~97% of DeepSeek-R1's weights); attention,
dense layers, shared experts, router and head stay in the serving dtype. Weights are FP4
only: activations stay in the serving dtype (no FP4 activations, so a checkpoint's
`input_scale` has no use here). `moe_backends` computes with them.

Legend: T = tokens, D = hidden, E = experts, I = expert intermediate, K = experts per token.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, NamedTuple

import torch

from kernels.fp4 import NVFP4_BLOCK, MXFP4Tensor, NVFP4Tensor, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4

from .config import CheckpointError

FP4Tensor = NVFP4Tensor | MXFP4Tensor
log = logging.getLogger(__name__)


class ExpertQuantization(enum.Enum):
    """What `--quantization` asks for: the format the routed experts are quantized to at load."""

    NVFP4 = "nvfp4"
    MXFP4 = "mxfp4"

    @classmethod
    def parse(cls, name: str | None) -> "ExpertQuantization | None":
        """None or "" -> None (no FP4: experts stay in the serving dtype, or FP8 from an FP8 checkpoint);
        unknown -> CheckpointError."""
        if not name:
            return None
        try:
            return cls(name)
        except ValueError:
            raise CheckpointError(f"--quantization {name!r} is not supported "
                                  f"(choose {', '.join(q.value for q in cls)})") from None

    def quantize(self, w: torch.Tensor) -> FP4Tensor:
        """w [E, N, K] float -> FP4, one global scale per expert (NVFP4).

        Expert by expert, so the fp32 temporaries stay one expert's size."""
        return stack_experts([self.quantize_expert(w[e]) for e in range(w.shape[0])])

    def quantize_expert(self, w: torch.Tensor) -> FP4Tensor:
        """w [N, K] float -> FP4 (NVFP4 with its own global scale)."""
        return (quantize_nvfp4 if self is ExpertQuantization.NVFP4 else quantize_mxfp4)(w)


def stack_experts(parts: list[FP4Tensor]) -> FP4Tensor:
    """E [N, K] FP4 weights of one format -> one [E, N, K]."""
    packed, scale = torch.stack([p.packed for p in parts]), torch.stack([p.scale for p in parts])
    shape = (len(parts), *parts[0].shape)
    if isinstance(parts[0], NVFP4Tensor):
        return NVFP4Tensor(packed, scale, torch.stack([p.global_scale for p in parts]), shape)
    return MXFP4Tensor(packed, scale, shape)


class ExpertSlot(NamedTuple):
    """Where one checkpoint tensor of an expert goes: `target`, whose dimension `dim` runs
    along the expert's intermediate size (None: a scalar, whole on every rank), `per` entries
    of the intermediate size to one element there (2 for packed FP4 values, 16 for NVFP4
    scales); tensor parallelism then loads the slice of it that holds this rank's part."""

    target: Any
    dim: int | None
    per: int = 1


class NVFP4ExpertSlots:
    """Stacked NVFP4 storage that a ModelOpt checkpoint's per-expert tensors load into.

    Per expert e, the checkpoint has gate_proj / up_proj / down_proj, each `weight` uint8
    [N, K/2], `weight_scale` float8_e4m3fn [N, K/16] and `weight_scale_2` fp32 [] (see
    `checkpoint_slots`). Gate and up fuse into w13 [E, 2I, D], which has one global scale
    per expert, so `finish` reconciles their two weight_scale_2: ModelOpt exports them
    equal (it ties the amax of layers it expects to be fused); where a checkpoint from
    another tool has them differ, that expert's w13 is dequantized with its own scales and
    requantized with one common global scale (a second rounding, on that expert only, with a
    warning) rather than refused or served with one half mis-scaled.
    """

    def __init__(self, experts: int, inter: int, hidden: int, device) -> None:
        def storage(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
            padded = -(-cols // NVFP4_BLOCK) * NVFP4_BLOCK
            return (torch.empty(experts, rows, padded // 2, dtype=torch.uint8, device=device),
                    torch.empty(experts, rows, padded // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=device))
        self.inter, self.hidden = inter, hidden
        self.w13_packed, self.w13_scale = storage(2 * inter, hidden)
        self.w2_packed, self.w2_scale = storage(hidden, inter)
        self.w13_scale_2 = torch.empty(experts, 2, dtype=torch.float32, device=device)  # gate, up
        self.w2_scale_2 = torch.empty(experts, dtype=torch.float32, device=device)

    def expert_slots(self, e: int) -> dict[str, ExpertSlot]:
        """Local expert e's checkpoint tensors (by name suffix) and where they go."""
        slots, i = {}, self.inter
        for k, (proj, rows) in enumerate((("gate_proj", slice(0, i)), ("up_proj", slice(i, 2 * i)))):
            slots.update({f"{proj}.weight": ExpertSlot(self.w13_packed[e, rows], 0),
                          f"{proj}.weight_scale": ExpertSlot(self.w13_scale[e, rows], 0),
                          f"{proj}.weight_scale_2": ExpertSlot(self.w13_scale_2[e, k], None)})
        # down_proj's reduction axis is the intermediate one: 2 values per byte, 16 per scale
        slots.update({"down_proj.weight": ExpertSlot(self.w2_packed[e], 1, 2),
                      "down_proj.weight_scale": ExpertSlot(self.w2_scale[e], 1, NVFP4_BLOCK),
                      "down_proj.weight_scale_2": ExpertSlot(self.w2_scale_2[e], None)})
        return slots

    def finish(self) -> tuple[NVFP4Tensor, NVFP4Tensor]:
        """After loading: (w13 [E, 2I, D], w2 [E, D, I]), gate and up sharing a global scale."""
        experts, (i, d) = self.w13_packed.shape[0], (self.inter, self.hidden)
        for e in (self.w13_scale_2[:, 0] != self.w13_scale_2[:, 1]).nonzero().flatten().tolist():
            self._requantize_w13(e)
        w13 = NVFP4Tensor(self.w13_packed, self.w13_scale, self.w13_scale_2[:, 0].contiguous(), (experts, 2 * i, d))
        w2 = NVFP4Tensor(self.w2_packed, self.w2_scale, self.w2_scale_2, (experts, d, i))
        return w13, w2

    def _requantize_w13(self, e: int) -> None:
        i, d = self.inter, self.hidden
        halves = [dequantize_nvfp4(NVFP4Tensor(self.w13_packed[e, rows], self.w13_scale[e, rows],
                                               self.w13_scale_2[e, k], (i, d)))
                  for k, rows in enumerate((slice(0, i), slice(i, 2 * i)))]
        log.warning("expert %d: gate and up weight_scale_2 differ (%.3g, %.3g); requantizing its fused "
                    "gate/up with one global scale", e, *self.w13_scale_2[e].tolist())
        q = quantize_nvfp4(torch.cat(halves))
        self.w13_packed[e], self.w13_scale[e] = q.packed, q.scale
        self.w13_scale_2[e] = q.global_scale


class _ExpertPart:
    """A loader slot for one dense expert tensor: it has the shape and dtype the loader checks
    against, and hands what is copied into it to its `QuantizingExpertSlots`."""

    def __init__(self, owner: "QuantizingExpertSlots", expert: int, part: str, shape: tuple[int, int]) -> None:
        self.owner, self.expert, self.part, self.shape = owner, expert, part, shape
        self.dtype = owner.dtype

    def dim(self) -> int:
        return len(self.shape)

    def copy_(self, tensor: torch.Tensor) -> None:
        self.owner.receive(self.expert, self.part, tensor)


class QuantizingExpertSlots:
    """Dense expert tensors quantized to FP4 as the loader delivers them (`--quantization`).

    An expert is quantized as soon as its gate, up and down projections have all arrived,
    and its dense tensors are dropped, so loading never holds more dense expert weights
    than those of the experts still incomplete (checkpoints store an expert's tensors
    together, so about one) -- a bf16 or FP8 DeepSeek-R1 whose dense experts would not fit
    loads into the memory of its FP4 form. The result equals quantizing the stacked dense
    weights after loading (`ExpertQuantization.quantize`), bit for bit.
    """

    def __init__(self, experts: int, inter: int, hidden: int, dtype: torch.dtype, device,
                 quantization: ExpertQuantization) -> None:
        self.experts, self.inter, self.hidden = experts, inter, hidden
        self.dtype, self.device, self.quantization = dtype, torch.device(device), quantization
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.w13: list[FP4Tensor | None] = [None] * experts
        self.w2: list[FP4Tensor | None] = [None] * experts

    def expert_slots(self, e: int) -> dict[str, ExpertSlot]:
        """Local expert e's checkpoint tensors (by name suffix) and where they go."""
        i, d = self.inter, self.hidden
        return {f"{part}.weight": ExpertSlot(_ExpertPart(self, e, part, shape), dim)
                for part, shape, dim in (("gate_proj", (i, d), 0), ("up_proj", (i, d), 0), ("down_proj", (d, i), 1))}

    def receive(self, expert: int, part: str, tensor: torch.Tensor) -> None:
        parts = self.pending.setdefault(expert, {})
        parts[part] = tensor.to(self.device, self.dtype)
        if len(parts) == 3:
            del self.pending[expert]
            w13 = torch.cat((parts["gate_proj"], parts["up_proj"]))  # [2I, D]: gate rows, then up rows
            self.w13[expert] = self.quantization.quantize_expert(w13)
            self.w2[expert] = self.quantization.quantize_expert(parts["down_proj"])

    def finish(self) -> tuple[FP4Tensor, FP4Tensor]:
        """After loading: (w13 [E, 2I, D], w2 [E, D, I])."""
        missing = [e for e in range(self.experts) if self.w13[e] is None]
        if missing:  # the loader refuses a checkpoint lacking a tensor before this
            raise CheckpointError(f"routed expert {missing[0]} was never fully loaded")
        return stack_experts(self.w13), stack_experts(self.w2)
