"""Small random DeepSeek-V3 checkpoints for the tests, and a reference runner on top of
Hugging Face transformers' DeepseekV3ForCausalLM (the ground truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.attention import AttentionMetadata, MLAPath
from engine.checkpoint import random_weights, write_checkpoint

# q LoRA, YaRN (with a short original context so the ramp bites), several routing groups.
LORA_YARN = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=320, hidden_size=64,
    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
    v_head_dim=48, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
    topk_method="noaux_tc", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1280,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=32, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    num_nextn_predict_layers=0, torch_dtype="float32", rope_interleave=True, attention_bias=False)

# Plain q projection, one routing group, no YaRN, two shared experts, no top-k renormalization.
PLAIN_ONE_GROUP = dict(
    LORA_YARN, q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2, norm_topk_prob=False,
    routed_scaling_factor=1.0, rope_scaling=None, qk_rope_head_dim=16, kv_lora_rank=64,
    num_hidden_layers=4, first_k_dense_replace=2, num_experts_per_tok=2, n_routed_experts=8)


def make_checkpoint(path: Path, cfg: dict[str, Any], seed: int = 0, **kwargs) -> Path:
    return write_checkpoint(path, cfg, random_weights(cfg, seed=seed), **kwargs)


def hf_model(path: Path):
    from transformers import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] fp32 logits of one sequence from the reference."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def contiguous_meta(query_lens, seq_lens, block_size: int, blocks_per_seq: int, num_decodes: int = 0,
                    path: MLAPath = MLAPath.AUTO) -> AttentionMetadata:
    """Metadata for sequences whose blocks are laid out back to back, sequence i owning
    blocks [i * blocks_per_seq, (i + 1) * blocks_per_seq), in reverse order to prove the
    block table (not memory order) decides where a token lives."""
    tables = torch.stack([torch.arange((i + 1) * blocks_per_seq - 1, i * blocks_per_seq - 1, -1)
                          for i in range(len(seq_lens))]).int()
    slots = []
    for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(s - q, s):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    return AttentionMetadata(tuple(query_lens), tuple(seq_lens), tables, torch.tensor(slots), num_decodes, path)


# A tiny model with the real tokenizer, for engine and server tests: fast steps, real text.
SERVING = dict(LORA_YARN, vocab_size=129280, num_hidden_layers=2, kv_lora_rank=128, qk_rope_head_dim=32,
               max_position_embeddings=4096)


def make_serving_checkpoint(path: Path, cfg: dict[str, Any] = SERVING) -> Path:
    from engine.tokenizer import write_demo_tokenizer
    make_checkpoint(path, cfg, seed=11)
    write_demo_tokenizer(path)
    return path
