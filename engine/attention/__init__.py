"""Attention backends behind one interface, picked by name with lazy imports so a CPU
process never imports CUDA libraries."""

from __future__ import annotations

from .base import AttentionBackend, AttentionMetadata, MLAPath

__all__ = ["AttentionBackend", "AttentionMetadata", "MLAPath", "get_attention_backend"]


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from .torch_backend import TorchAttention
        return TorchAttention()
    if name == "cpu":
        from .cpu_backend import CpuAttention
        return CpuAttention()
    raise ValueError(f"unknown attention backend {name!r} (available: torch, cpu)")
