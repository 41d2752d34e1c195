"""Loading a DeepSeek-V3 checkpoint directory into `DeepseekV3ForCausalLM`.

Reads safetensors (one file, or shards listed by `model.safetensors.index.json`), casts
to the serving dtype, stacks the per-expert tensors into the MoE layer's w13 / w2, and
skips the multi-token-prediction layers (indices >= num_hidden_layers). Every failure is a
`CheckpointError` that names the file or tensor at fault.

DeepSeek's FP8 block format (e4m3 weights with a `weight_scale_inv` per 128 x 128 block):
the routed experts stay FP8, values and scales copied as they are into the stacked layout
(see `engine.model.fp8_experts`), so they take the memory of their FP8 form; every other
linear is dequantized to the serving dtype here. `quantization="nvfp4" | "mxfp4"` turns the
experts into FP4 instead.

FP4 experts, two ways (see `engine.model.fp4_experts`):
- `quantization="nvfp4" | "mxfp4"` quantizes the routed experts of a bf16 / fp32 / FP8
  checkpoint as they are loaded (FP8 ones dequantized first), and keeps only the packed
  weights.
- An NVFP4 checkpoint as NVIDIA ModelOpt exports it (config.json `quantization_config`
  {"quant_method": "modelopt", "quant_algo": "NVFP4"}, or the same in hf_quant_config.json)
  has, per quantized linear `X`, `X.weight` uint8 [N, K/2], `X.weight_scale` float8_e4m3fn
  [N, K/16] and fp32 scalars `X.weight_scale_2` and `X.input_scale`. Routed experts load
  packed into the stacked layout; any other quantized linear (attention, dense MLP, shared
  experts) is dequantized to the serving dtype here. `input_scale` (the activation scale of
  W4A4 kernels) is not used: FP4 here is weight-only, activations stay in the serving dtype.
  Which linears are quantized is read off the tensors (a `weight_scale` beside the weight),
  which is what `exclude_modules` in the config describes; routed experts must be NVFP4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from engine.attention import default_attention_backend
from engine.checkpoint import fp8_block_dequantize
from engine.distributed import ParallelState
from engine.model import CheckpointError, DeepseekV3ForCausalLM, ModelConfig
from engine.model.layers import Shard
from engine.model.fp4_experts import ExpertQuantization
from kernels.fp4 import NVFP4Tensor, dequantize_nvfp4

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Read together with the weight they scale (FP8: `_scale_inv`; ModelOpt NVFP4: the rest),
# unless they have a slot of their own (the packed routed experts).
_SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 matmuls natively (several times faster than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype, except fp32 on a CPU without native bf16 matmuls,
    where bf16 is emulated and gains nothing but rounding."""
    if name == "auto":
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        name = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16"
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu",
               attention: str = "auto", progress: bool = True,
               quantization: str | None = None, parallel: ParallelState | None = None,
               moe_dispatch: str = "auto") -> DeepseekV3ForCausalLM:
    """attention "auto": the fast backend for the device ("cpu" on CPUs, "flashinfer" on CUDA where
    installed); "torch" is the reference.
    quantization None, "nvfp4" or "mxfp4": the format of the routed experts (see above; None keeps
    an FP8 checkpoint's experts FP8 and a bf16 / fp32 one's in the serving dtype).
    parallel: this rank's place in a layout; only its part of each tensor is read (the counts
    of bytes read end up in `model.load_bytes`)."""
    quant = ExpertQuantization.parse(quantization)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.nvfp4_checkpoint and quant not in (None, ExpertQuantization.NVFP4):
        raise CheckpointError(f"{model_dir}: the checkpoint's experts are NVFP4 already; "
                              f"--quantization {quantization} cannot apply")
    dev = torch.device(device)
    if attention == "auto":
        attention = default_attention_backend(dev)
    try:
        model = DeepseekV3ForCausalLM(cfg, resolve_dtype(dtype, cfg, dev), dev, attention,
                                      None if cfg.nvfp4_checkpoint else quant, parallel, moe_dispatch)
    except ValueError as exc:  # a layout the model's shapes do not divide into
        raise CheckpointError(str(exc)) from None
    filler = _Filler(model, cfg)
    filler.fill(checkpoint_files(model_dir), progress)
    model.load_bytes = filler.bytes_read
    model.finish_loading()
    return model.eval()


class _Filler:
    """Copies checkpoint tensors into the model (see `checkpoint_slots`), and checks that
    every slot is filled exactly from a tensor of the right shape."""

    def __init__(self, model: DeepseekV3ForCausalLM, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.slots = model.checkpoint_slots()
        self.pending = set(self.slots)
        self.bytes_read = {"routed experts": 0, "other": 0}  # what came off the files, by kind

    def fill(self, files: list[Path], progress: bool) -> None:
        with tqdm(desc="loading weights", unit="tensor", disable=not progress) as bar:
            for path in files:
                try:
                    with safe_open(str(path), framework="pt") as f:
                        names = list(f.keys())
                        bar.total = (bar.total or 0) + len(names)
                        for name in names:
                            if name in self.slots or not name.endswith(_SCALE_SUFFIXES):
                                self._load(name, f, names)
                            bar.update()
                except SafetensorError as exc:
                    raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        if "lm_head.weight" in self.pending and self.cfg.tie_word_embeddings:
            _target(self.slots["lm_head.weight"]).copy_(_target(self.slots["model.embed_tokens.weight"]))
            self.pending.discard("lm_head.weight")
        if self.pending:
            missing = sorted(self.pending)
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first: {missing[0]}")

    def _load(self, name: str, f, names: list[str]) -> None:
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.cfg.num_hidden_layers:
            return  # multi-token-prediction layer: not used for plain decoding yet
        if name not in self.slots:
            raise CheckpointError(f"unexpected tensor {name} in checkpoint")
        slot = self.slots[name]
        self.pending.discard(name)
        if slot is None:
            return  # another rank's expert: never read
        shard = slot if isinstance(slot, Shard) else None
        target = _target(slot)
        if name + "_scale" in names and target.dtype != torch.uint8:
            tensor = _nvfp4_dequantize(name, self._read(name, f, None), f, _full_shape(target, shard))
            tensor = tensor if shard is None else tensor.narrow(shard.dim, shard.start, shard.stop - shard.start)
        else:
            tensor = self._read(name, f, shard)
        if name + "_scale_inv" in names and target.dtype != torch.float8_e4m3fn:  # FP8 experts stay FP8
            offset = (0, 0) if shard is None else ((shard.start, 0) if shard.dim == 0 else (0, shard.start))
            tensor = fp8_block_dequantize(tensor, f.get_tensor(name + "_scale_inv"), self.cfg.weight_block_size, offset)
        if target.dim() == 0 and tensor.numel() == 1:
            tensor = tensor.reshape(())  # a scale written as [1] rather than []
        if (target.dtype in _STORED_AS_IS or tensor.dtype == torch.uint8) and tensor.dtype != target.dtype:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, expected {target.dtype}")
        if tuple(tensor.shape) != tuple(target.shape):
            got = tuple(tensor.shape) if shard is None else _shape_of(f, name)
            raise CheckpointError(f"tensor {name} has shape {got}, expected {_full_shape(target, shard)}")
        target.copy_(tensor.to(target.dtype))

    def _read(self, name: str, f, shard: Shard | None) -> torch.Tensor:
        """The tensor, or only the slice `shard` names (the rest of the file is never read)."""
        if shard is None:
            tensor = f.get_tensor(name)
        else:
            full = f.get_slice(name)
            shape = full.get_shape()
            if len(shape) <= shard.dim or shape[shard.dim] != shard.full:
                raise CheckpointError(f"tensor {name} has shape {tuple(shape)}, expected {shard.full} along "
                                      f"dimension {shard.dim}")
            tensor = full[(slice(None),) * shard.dim + (slice(shard.start, shard.stop),)]
        kind = "routed experts" if ".mlp.experts." in name else "other"
        self.bytes_read[kind] += tensor.numel() * tensor.element_size()
        return tensor


def _target(slot):
    return slot.target if isinstance(slot, Shard) else slot


def _full_shape(target, shard: Shard | None) -> tuple[int, ...]:
    shape = list(target.shape)
    if shard is not None:
        shape[shard.dim] = shard.full
    return tuple(shape)


def _shape_of(f, name: str) -> tuple[int, ...]:
    return tuple(f.get_slice(name).get_shape())


_STORED_AS_IS = (torch.uint8, torch.float8_e4m3fn)  # packed FP4 and its block scales: never cast


def _nvfp4_dequantize(name: str, packed: torch.Tensor, f, shape: tuple[int, ...]) -> torch.Tensor:
    """A ModelOpt NVFP4 linear `name` (uint8 [N, K/2]) -> fp32 [N, K] of logical `shape`.
    Read whole, then sliced by the caller: these (attention, dense, shared) are small."""
    try:
        w = NVFP4Tensor(packed, f.get_tensor(name + "_scale"),
                        f.get_tensor(name + "_scale_2").float().reshape(()), shape)
    except (ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"tensor {name}: not NVFP4 of logical shape {shape} ({exc})") from None
    return dequantize_nvfp4(w)
