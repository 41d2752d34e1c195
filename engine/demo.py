"""The demo model: a small random-weight DeepSeek-V3 checkpoint with the real tokenizer.

Real where it matters for serving: the MLA cache dims (kv_lora_rank 512, rope 64), the
sigmoid + bias + grouped top-k routing (16 experts in 4 groups, 2 groups, top 4), a
dense first layer, YaRN to the 163,840-token context, R1's 129,280-entry vocabulary and
chat tokens. Small everywhere else so it generates quickly on two CPU cores. Its text is
meaningless. Same bytes on every run: fixed seed, sorted JSON, deterministic safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint import random_weights, write_checkpoint
from engine.tokenizer import write_demo_tokenizer

DEMO_SEED = 20250120  # R1's release date
DEMO_CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
    vocab_size=129280, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=192, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, num_nextn_predict_layers=0,
    torch_dtype="bfloat16", rope_interleave=True, attention_bias=False)


def build_demo_model(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    write_checkpoint(out, DEMO_CONFIG, random_weights(DEMO_CONFIG, seed=DEMO_SEED, dtype=torch.bfloat16))
    write_demo_tokenizer(out)
    return out
