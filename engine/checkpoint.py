"""Writing DeepSeek-V3 checkpoints in the Hugging Face layout: random weights for the demo
model and the tests, the original FP8 block format (e4m3 weights with one fp32
`weight_scale_inv` per 128x128 block, as DeepSeek released V3 and R1), and NVFP4 as NVIDIA
ModelOpt exports it (as nvidia/DeepSeek-R1-FP4).

Everything here is deterministic: the same config and seed give the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kernels.fp8 import quantize_fp8_block


def hf_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a DeepSeek-V3 checkpoint (without MTP layers) and its shape."""
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    c, qr = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], d),
                                          "model.norm.weight": (d,), "lm_head.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if qr:
            shapes.update({a + "q_a_proj.weight": (qr, d), a + "q_a_layernorm.weight": (qr,),
                           a + "q_b_proj.weight": (h * (nope + rope), qr)})
        else:
            shapes[a + "q_proj.weight"] = (h * (nope + rope), d)
        shapes.update({a + "kv_a_proj_with_mqa.weight": (c + rope, d), a + "kv_a_layernorm.weight": (c,),
                       a + "kv_b_proj.weight": (h * (nope + v), c), a + "o_proj.weight": (d, h * v)})
        if i < cfg["first_k_dense_replace"]:
            shapes.update(_mlp_shapes(p + "mlp.", d, cfg["intermediate_size"]))
            continue
        shapes[p + "mlp.gate.weight"] = (cfg["n_routed_experts"], d)
        shapes[p + "mlp.gate.e_score_correction_bias"] = (cfg["n_routed_experts"],)
        for e in range(cfg["n_routed_experts"]):
            shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", d, cfg["moe_intermediate_size"]))
        if cfg.get("n_shared_experts"):
            shapes.update(_mlp_shapes(p + "mlp.shared_experts.", d, cfg["moe_intermediate_size"] * cfg["n_shared_experts"]))
    return shapes


def _mlp_shapes(prefix: str, d: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, d), prefix + "up_proj.weight": (inter, d),
            prefix + "down_proj.weight": (d, inter)}


def random_weights(cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights scaled so activations stay O(1) through the layers (1/sqrt(fan_in)).

    Norm weights sit near 1, the routing bias is small and non-zero so that it changes
    some expert choices, and the router and its bias are fp32 as in the released models.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            t = torch.rand(shape, generator=gen) * 0.1
        elif name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        keep_fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        tensors[name] = t.to(torch.float32 if keep_fp32 else dtype).contiguous()
    return tensors


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (float8_e4m3fn [O, I], weight_scale_inv [ceil(O/bo), ceil(I/bi)] fp32).

    Each block is scaled so its largest magnitude maps to 448; dequantization multiplies
    the block by its weight_scale_inv (kernels.fp8 holds the format).
    """
    q = quantize_fp8_block(w, block)
    return q.weight, q.scale_inv


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Inverse of `fp8_block_quantize`, in fp32: q [O, I] e4m3, scale_inv [O/bo, I/bi].

    q may be the slice of a larger weight that starts at row and column `offset` (a tensor-
    parallel rank's part), with scale_inv the whole weight's scales."""
    o, i = q.shape
    r0, c0 = offset
    rows = torch.arange(r0, r0 + o) // block[0]
    cols = torch.arange(c0, c0 + i) // block[1]
    return q.float() * scale_inv.float()[rows][:, cols]


def is_fp8_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights inside the decoder layers, as in DeepSeek's FP8 release: not the
    embeddings, head, norms or router."""
    return (tensor.dim() == 2 and name.startswith("model.layers.") and name.endswith("proj.weight")
            and ".gate.weight" not in name)


def to_fp8_checkpoint(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Converts a checkpoint to DeepSeek's FP8 block format: returns (config, tensors)."""
    out = {}
    for name, t in tensors.items():
        if is_fp8_quantizable(name, t):
            out[name], out[name + "_scale_inv"] = fp8_block_quantize(t)
        else:
            out[name] = t
    cfg = dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]})
    return cfg, out


def to_modelopt_nvfp4_checkpoint(cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                                 other_linears: bool = False) -> tuple[dict, dict]:
    """Converts a checkpoint to NVFP4 as NVIDIA ModelOpt exports it: returns (config, tensors).

    The routed experts are quantized (and, with `other_linears`, every other linear weight
    inside the decoder layers: attention, dense MLPs, shared experts); each quantized `X.weight`
    becomes uint8 [N, K/2] with `X.weight_scale` float8_e4m3fn [N, K/16], `X.weight_scale_2`
    fp32 [] and `X.input_scale` fp32 [] (a placeholder 1.0: no activations are calibrated).
    gate_proj and up_proj of one MLP share one weight_scale_2, as ModelOpt exports layers it
    expects to be fused: they are quantized as one [2I, D] matrix.
    """
    from kernels.fp4 import quantize_nvfp4

    out = {n: t for n, t in tensors.items()}
    chosen = [n for n, t in tensors.items() if is_fp8_quantizable(n, t)
              and (other_linears or (".mlp.experts." in n))]
    for name in chosen:
        if ".up_proj." in name:
            continue  # quantized with its gate_proj
        pair = [name, name.replace(".gate_proj.", ".up_proj.")] if ".gate_proj." in name else [name]
        q = quantize_nvfp4(torch.cat([tensors[n].float() for n in pair]))
        rows = tensors[name].shape[0]
        for k, n in enumerate(pair):
            part = slice(k * rows, (k + 1) * rows)
            out[n], out[n + "_scale"] = q.packed[part].contiguous(), q.scale[part].contiguous()
            out[n + "_scale_2"] = q.global_scale.clone()
            out[n.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)
    cfg = dict(cfg, quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                         "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]})
    return cfg, out


def write_checkpoint(out_dir: str | Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                     shards: int = 1) -> Path:
    """Writes config.json and the weights, one file or `shards` files with an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
