"""The fused bf16 CPU decode step (kernels/csrc/cpu_decode.cpp) wired to a loaded model.

The decodes of a step (one new token per sequence, at most MAX_TOKENS of them) of a bf16
model on the CPU run every layer in one C++ call that shares the model's own tensors: the
prepacked GEMM weights, MLA's absorbed matrices, the routed experts' packed copies. The
step's prefill chunks, and every step of a model it cannot take (no q LoRA, FP4 or FP8 experts),
go through the Python forward, the reference it is tested against. A mixed step runs as
two forwards, its decodes fused and its chunks in Python: they are different sequences, so
nothing in one depends on the other, and continuous batching keeps most steps mixed
while requests arrive.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, MLAPath
from kernels import cpu_decode
from kernels.cpu_gemm import PackedWeight
from kernels.moe_cpu import DENSE_MAX_TOKENS

from .moe import MoE

MAX_TOKENS = DENSE_MAX_TOKENS  # the extension runs batches of 2+ through the dense all-experts MoE


def unsupported(model) -> str | None:
    """Why `model` cannot decode through the extension, or None when it can."""
    cfg = model.cfg
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "only bf16 models on the CPU"
    if not cfg.q_lora_rank:
        return "the model has no q LoRA"
    if model.kv_cache_dtype != model.dtype:
        return f"the KV cache is {str(model.kv_cache_dtype).removeprefix('torch.')}; the C++ step reads a bf16 cache"
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.fused_a_proj.packed is None or attn.w_uk is None:
            return "weights are not prepacked (oneDNN)"
        experts = layer.mlp.experts if isinstance(layer.mlp, MoE) else None
        if experts is not None and (experts.dense is None or not isinstance(experts.dense.up, PackedWeight)):
            return "routed experts are not dense bf16 (FP4 or FP8)"
    return cpu_decode.disabled_reason()


class FusedCpuDecoder:
    def __init__(self, model, ext) -> None:
        cfg = model.cfg
        dims = [cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group,
                cfg.topk_group, cfg.moe_intermediate_size]
        scalars = [cfg.routed_scaling_factor, cfg.rms_norm_eps, cfg.softmax_scale, model.rotary.attention_factor]
        body = model.model
        self.ext = ext
        self.decoder = ext.Decoder(dims, cfg.norm_topk_prob, scalars, body.embed_tokens.weight, body.norm.weight,
                                   model.rotary.inv_freq)
        for layer in body.layers:
            attn = layer.self_attn
            tensors = dict(in_norm=layer.input_layernorm.weight, qa_norm=attn.q_a_layernorm.weight,
                           kva_norm=attn.kv_a_layernorm.weight, w_uk=attn.w_uk, w_uv_t=attn.w_uv_t,
                           post_norm=layer.post_attention_layernorm.weight)
            linears = dict(fused_a=attn.fused_a_proj, q_b=attn.q_b_proj, o_proj=attn.o_proj)
            mlp, experts = layer.mlp, ([], [], [], [])
            if isinstance(mlp, MoE):
                dense, routed = mlp.experts.dense, mlp.experts
                tensors.update(router_w=mlp.gate.weight, router_bias=mlp.gate.e_score_correction_bias,
                               up_all=dense.up.packed, down_all=dense.down.packed)
                experts = ([w.packed for w in dense.expert_up], [w.packed for w in dense.expert_down],
                           list(routed.w13), list(routed.w2))
                mlp = mlp.shared_experts
            if mlp is not None:
                linears.update(gate_up=mlp.gate_up_proj, down=mlp.down_proj)
            for name, module in linears.items():  # each weight prepacked, and plain for small batches
                tensors[name], tensors[name + "_w"] = module.packed.packed, module.weight
            self.decoder.add_layer(tensors, *experts)

    @classmethod
    def of(cls, model) -> tuple["FusedCpuDecoder | None", str | None]:
        """(the decoder, None) or (None, why not)."""
        reason = unsupported(model)
        if reason is not None:
            return None, reason
        ext = cpu_decode.load()
        if ext is None:
            return None, cpu_decode.why_unavailable()
        return cls(model, ext), None

    @staticmethod
    def decodes(meta: AttentionMetadata) -> int:
        """How many of the step's leading sequences (its decodes) the fused step runs: all of
        them, or 0 where it cannot (forced MLA path, a CUDA-graph recording, too many)."""
        n = meta.num_decodes
        return n if n <= MAX_TOKENS and meta.path is MLAPath.AUTO and meta.seq_lens_tensor is None else 0

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """As DeepseekV3ForCausalLM.forward for a decode-only step (one token per sequence): hidden [T, D]."""
        lens = torch.tensor(meta.seq_lens, dtype=torch.int64)
        return self.decoder.forward(input_ids, positions, meta.slot_mapping, meta.block_tables.contiguous(), lens,
                                    kv_cache)
