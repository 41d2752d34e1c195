"""The demo model and the offline CLI, as a newcomer meets them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo import build_demo_model
from engine.loader import load_model
from engine.offline import generate
from engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = cli("demo-model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_demo_model_is_a_complete_hf_checkpoint(demo_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(digests(demo_dir))
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (512, 64)
    assert cfg["scoring_func"] == "sigmoid" and cfg["n_group"] > 1 and cfg["topk_group"] < cfg["n_group"]
    assert cfg["max_position_embeddings"] == 163840 and cfg["rope_scaling"]["type"] == "yarn"
    tok = Tokenizer.from_dir(demo_dir)
    assert tok.vocab_size <= cfg["vocab_size"]
    assert "{{" in json.loads((demo_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_demo_model_has_the_same_bytes_on_every_run(demo_dir, tmp_path):
    assert digests(build_demo_model(tmp_path / "again")) == digests(demo_dir)


def test_demo_model_routing_uses_its_bias_and_groups(demo_dir):
    """Random weights must still exercise the real routing: the correction bias changes
    some choices, and every token's experts come from topk_group groups only."""
    import torch
    from kernels.moe_ref import grouped_topk
    model = load_model(demo_dir, progress=False)
    cfg, gate = model.cfg, model.model.layers[1].mlp.gate
    x = model.model.embed_tokens.weight[torch.arange(500, 1500)]
    logits = x.float() @ gate.weight.t()
    args = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group)
    _, ids = grouped_topk(logits, gate.e_score_correction_bias, *args)
    _, ids_unbiased = grouped_topk(logits, torch.zeros_like(gate.e_score_correction_bias), *args)
    assert not torch.equal(ids.sort().values, ids_unbiased.sort().values)
    groups = ids // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(row)) <= cfg.topk_group for row in groups.tolist())


def test_generate_cli_prints_text_and_speed(demo_dir):
    result = cli("generate", "--model", str(demo_dir), "--prompt", "Why is the sky blue?", "--chat",
                 "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "generated" in result.stderr and "decode" in result.stderr and "tok/s" in result.stderr


def test_chat_generation_is_seeded_and_stops_at_max_tokens(demo_dir):
    model, tok = load_model(demo_dir, progress=False), Tokenizer.from_dir(demo_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "hello"}])
    a = generate(model, prompt, max_tokens=9, temperature=1.0, seed=3).token_ids
    b = generate(model, prompt, max_tokens=9, temperature=1.0, seed=3).token_ids
    assert a == b and len(a) == 9
    assert generate(model, prompt, max_tokens=9, temperature=1.0, seed=4).token_ids != a


def test_generate_rejects_nonpositive_max_tokens(demo_dir):
    result = cli("generate", "--model", str(demo_dir), "--prompt", "x", "--max-tokens", "0")
    assert result.returncode == 2 and result.stderr.strip() == "error: --max-tokens must be at least 1"
