"""The DeepSeek-V3 architecture in plain torch."""

from .config import CheckpointError, ModelConfig
from .model import DeepseekV3ForCausalLM

__all__ = ["CheckpointError", "ModelConfig", "DeepseekV3ForCausalLM"]
