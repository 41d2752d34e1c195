"""Attention backends behind one interface, picked by name with lazy imports so a CPU
process never imports CUDA libraries."""

from __future__ import annotations

import importlib.util

import torch

from .base import AttentionBackend, AttentionMetadata, MLAPath

__all__ = ["AttentionBackend", "AttentionMetadata", "MLAPath", "default_attention_backend", "get_attention_backend"]


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from .torch_backend import TorchAttention
        return TorchAttention()
    if name == "cpu":
        from .cpu_backend import CpuAttention
        return CpuAttention()
    if name == "flashinfer":
        from .flashinfer_backend import FlashInferAttention
        return FlashInferAttention()
    raise ValueError(f"unknown attention backend {name!r} (available: torch, cpu, flashinfer)")


def default_attention_backend(device: torch.device) -> str:
    """"cpu" on CPUs; on CUDA "flashinfer" where it is installed, else the torch reference."""
    if device.type == "cpu":
        return "cpu"
    return "flashinfer" if importlib.util.find_spec("flashinfer") is not None else "torch"
