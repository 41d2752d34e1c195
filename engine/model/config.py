"""The model's configuration, read once from a checkpoint's `config.json` and validated.

Only the DeepSeek-V3 family (model_type `deepseek_v3`, which also covers R1 and V3.1) is
served. Every inconsistency is reported as a `CheckpointError` naming the field, so the CLI
can print one line and exit 2 instead of failing deep inside a matmul.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class CheckpointError(ValueError):
    """A checkpoint directory, its config or its tensors cannot be served as they are."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` in config.json); factor 1 means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def is_yarn(self) -> bool:
        return self.factor > 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    quant_method: str | None = None  # None, "fp8" (DeepSeek's block FP8) or "modelopt" (NVIDIA ModelOpt)
    quant_algo: str | None = None  # with "modelopt": must be "NVFP4"
    weight_block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise CheckpointError(f"config.json: qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            raise CheckpointError(f"config.json: n_group ({self.n_group}) does not divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise CheckpointError(f"config.json: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise CheckpointError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in "
                f"topk_group groups ({self.topk_group} x {experts_per_group})")
        if self.scoring_func != "sigmoid":
            raise CheckpointError(f"config.json: scoring_func {self.scoring_func!r} is not supported (only 'sigmoid')")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise CheckpointError(f"config.json: first_k_dense_replace ({self.first_k_dense_replace}) is out of range")
        if self.quant_method not in (None, "fp8", "modelopt"):
            raise CheckpointError(f"config.json: quantization_config.quant_method {self.quant_method!r} is not supported")
        if self.quant_method == "modelopt" and self.quant_algo != "NVFP4":
            raise CheckpointError(f"config.json: ModelOpt quant_algo {self.quant_algo!r} is not supported (only 'NVFP4')")

    @property
    def nvfp4_checkpoint(self) -> bool:
        """Whether the checkpoint's linear layers are NVFP4 as ModelOpt exports them."""
        return self.quant_method == "modelopt"

    @property
    def fp8_checkpoint(self) -> bool:
        """Whether the checkpoint's linear layers are DeepSeek's block FP8 (`weight_scale_inv`)."""
        return self.quant_method == "fp8"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per token and layer, the cache holds the latent and the rope key, nothing per head."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d), times mscale^2 under YaRN (DeepSeek-V2 paper, appendix on YaRN)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs.is_yarn and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in names and k not in ("rope_scaling", "weight_block_size")}
        try:
            kwargs["rope_scaling"] = _rope_scaling(raw)
            quant = raw.get("quantization_config") or {}
            kwargs["quant_method"] = quant.get("quant_method")
            kwargs["quant_algo"] = quant.get("quant_algo")
            if quant.get("quant_method") == "modelopt" and quant.get("group_size", 16) != 16:
                raise CheckpointError(f"config.json: NVFP4 group_size {quant['group_size']} is not supported (only 16)")
            if "weight_block_size" in quant:
                kwargs["weight_block_size"] = tuple(quant["weight_block_size"])
            kwargs["eos_token_id"] = _first(raw.get("eos_token_id", 1))
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise CheckpointError(f"config.json: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: not a checkpoint directory (no config.json)")
        raw = _read_json(path)
        hf_quant = Path(model_dir) / "hf_quant_config.json"
        if not raw.get("quantization_config") and hf_quant.is_file():
            raw["quantization_config"] = _modelopt_quantization(_read_json(hf_quant), hf_quant)
        return cls.from_dict(raw)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _modelopt_quantization(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelOpt's older export writes no quantization_config into config.json but a separate
    hf_quant_config.json: {"producer": {"name": "modelopt", ...}, "quantization":
    {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [...]}}; read as the
    quantization_config {"quant_method": "modelopt", **quantization}."""
    quant = raw.get("quantization")
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path}: no 'quantization' section")
    return {"quant_method": "modelopt", **quant}


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else int(value)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = rs.get("type", rs.get("rope_type", "default"))
    if kind in ("default", None) or not rs.get("factor"):
        return RopeScaling()
    if kind != "yarn":
        raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported (only 'yarn')")
    return RopeScaling(
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
        beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
        mscale=float(rs.get("mscale") or 0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
