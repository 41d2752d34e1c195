"""DeepSeek-V3 (and R1) decoder for serving: a flat batch of tokens from many sequences,
their positions, and a paged latent KV cache.

Module and parameter names follow the Hugging Face checkpoint layout
(`model.layers.N.self_attn.q_a_proj.weight`, ...), except the routed experts, which are
stacked per layer (see `moe.py`).

Legend: T = tokens in the step, D = hidden size, V = vocabulary, L = layers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata, get_attention_backend
from engine.attention.base import FP8_KV_DTYPE, KV_CACHE_DTYPES
from engine.distributed import ParallelState
from engine.distributed.moe_dispatch import TokenDispatcher, make_dispatcher

from .config import ModelConfig
from .layers import MLP, Linear, ParallelLMHead, RMSNorm, VocabParallelEmbedding
from .mla import MLA
from .fp4_experts import ExpertQuantization
from .fused_cpu import FusedCpuDecoder, unsupported
from .moe import MoE, RoutedExperts
from .rope import RotaryEmbedding

log = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, device,
                 quantization: ExpertQuantization | None, parallel: ParallelState,
                 dispatcher: TokenDispatcher) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLA(cfg, dtype, device, parallel.tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MoE(cfg, dtype, device, quantization, parallel, dispatcher) if cfg.is_moe_layer(layer) else MLP(
            cfg.hidden_size, cfg.intermediate_size, dtype, device, parallel.tp)

    def forward(self, x, rope, cache, meta, backend):
        h = x + self.self_attn(self.input_layernorm(x), rope, cache, meta, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3Body(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, quantization: ExpertQuantization | None,
                 parallel: ParallelState, dispatcher: TokenDispatcher) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, parallel.tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device, quantization, parallel, dispatcher)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", attention: str = "torch",
                 quantization: ExpertQuantization | None = None, parallel: ParallelState | None = None,
                 moe_dispatch: str = "auto") -> None:
        """quantization: the routed experts are quantized to that FP4 format as the loader
        fills them, expert by expert, so their dense weights never all exist at once.
        parallel: this rank's place in a TP / DP / EP layout (default: one process holds it
        all); moe_dispatch: how MoE layers reach experts on other ranks
        (engine.distributed.moe_dispatch: auto, allgather, alltoall)."""
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.parallel = parallel or ParallelState.single()
        self.dispatcher = make_dispatcher(self.parallel, cfg.n_routed_experts, moe_dispatch, self.device)
        self.model = DeepseekV3Body(cfg, dtype, device, quantization, self.parallel, self.dispatcher)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, dtype, device, self.parallel.tp)
        self.rotary = RotaryEmbedding(cfg, device)
        self.attention: AttentionBackend = get_attention_backend(attention)
        self.fused_decode: FusedCpuDecoder | None = None  # set by finish_loading where it applies
        self.kv_cache_dtype = dtype  # what allocate_kv_cache makes: the model dtype, or FP8 (set_kv_cache_dtype)

    def checkpoint_slots(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor name (Hugging Face layout) -> the tensor it is copied into.

        Mostly parameters by their own name; fused and stacked parameters (MLA's fused
        down-projection, gate+up, the routed experts) expose the slices the checkpoint's
        separate tensors fill.
        """
        slots, covered = {}, set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "checkpoint_slots"):
                slots.update(module.checkpoint_slots(prefix + "."))
                covered.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
        for name, param in self.named_parameters():
            if name not in covered:
                slots[name] = param
        return slots

    def routed_experts(self) -> list[RoutedExperts]:
        return [m for m in self.modules() if isinstance(m, RoutedExperts)]

    def finish_loading(self) -> None:
        """Derives what the forward pass precomputes from the loaded weights: MLA's absorbed
        matrices, FP4 experts from an NVFP4 checkpoint, and on a bf16 CPU prepacked GEMM
        weights, dense small-batch MoE and the fused decode step."""
        # fp32 absorbed matrices on the CPU only: elsewhere they would cost 2x kv_b_proj's bytes per layer
        absorbed = torch.float32 if self.device.type == "cpu" else self.dtype
        for layer in self.model.layers:
            layer.self_attn.absorb_weights(absorbed)
        for experts in self.routed_experts():
            experts.finish_loading()
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return
        for name, module in self.named_modules():
            if isinstance(module, Linear) and not name.endswith("kv_b_proj"):  # kv_b_proj is only read as a matrix
                module.pack()
            if isinstance(module, RoutedExperts):
                module.use_dense_for_small_batches()
        if self.parallel.world_size > 1:  # its collectives would have to live in C++
            log.info("decode steps: Python model (the fused C++ step runs one rank only)")
            return
        self.fused_decode, reason = FusedCpuDecoder.of(self)
        if self.fused_decode is not None:  # its one-pass RMSNorm serves the Python path's steps too
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.fused = self.fused_decode.ext.rms_norm
        log.info("decode steps: %s", "fused C++ (kernels/csrc/cpu_decode.cpp)" if reason is None
                 else f"Python model ({reason})")

    def set_kv_cache_dtype(self, name: str) -> None:
        """--kv-cache-dtype: "auto" keeps the cache in the model dtype; "fp8_e4m3" keeps it in
        float8_e4m3fn with the backend's per-tensor scale, which every attention backend writes
        and reads. The fused C++ decode step reads a bf16 cache, so with FP8 the decodes go
        through the Python model. Raises ValueError for an unknown name."""
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
        self.kv_cache_dtype = self.dtype if name == "auto" else FP8_KV_DTYPE
        if self.fused_decode is not None and (reason := unsupported(self)) is not None:
            self.fused_decode = None
            log.info("decode steps: Python model (%s)", reason)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """The paged cache for every layer: [L, N, B, kv_lora_rank + rope dim] in kv_cache_dtype, zeroed."""
        cfg = self.cfg
        return torch.zeros(cfg.num_hidden_layers, num_blocks, block_size, cfg.kv_cache_dim,
                           dtype=self.kv_cache_dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] int64; positions [T] int64; kv_cache [L, N, B, C]. Returns hidden [T, D].

        Writes the new tokens' latents into kv_cache at meta.slot_mapping.
        """
        n = self.fused_decode.decodes(meta) if self.fused_decode is not None else 0
        if n == len(meta.query_lens):
            return self.fused_decode(input_ids, positions, kv_cache, meta)
        if n:  # the decodes fused, the prefill chunks through the layers below
            seqs = len(meta.query_lens)
            return torch.cat((self.fused_decode(input_ids[:n], positions[:n], kv_cache, meta.sequences(0, n)),
                              self.forward(input_ids[n:], positions[n:], kv_cache, meta.sequences(n, seqs))))
        self.dispatcher.begin_step(len(input_ids))
        self.attention.plan(meta)
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions)
        for layer, cache in zip(self.model.layers, kv_cache):
            x = layer(x, rope, cache, meta, self.attention)
        return self.model.norm(x)

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """A step with no tokens on this DP group while others have some: joins the MoE
        layers' collectives (there is no attention or sampling to do)."""
        self.dispatcher.begin_step(0)
        x = torch.empty(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] fp32 (gathered over the TP group)."""
        return self.lm_head(hidden)
