"""Loading checkpoints: sharded and single files, the FP8 block format, MTP layers, dtypes,
and one clear error line (exit code 2) for every kind of bad checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.attention import MLAPath
from engine.checkpoint import fp8_block_dequantize, fp8_block_quantize, random_weights, to_fp8_checkpoint, write_checkpoint
from engine.loader import cpu_has_native_bf16, load_model
from engine.model import CheckpointError
from helpers import LORA_YARN, PLAIN_ONE_GROUP, contiguous_meta

ROOT = Path(__file__).resolve().parents[1]


def prefill_logits(model, prompts):
    lens = [len(p) for p in prompts]
    meta = contiguous_meta(lens, lens, block_size=16, blocks_per_seq=2, path=MLAPath.AUTO)
    cache = model.allocate_kv_cache(2 * len(prompts), 16)
    return model.compute_logits(model(torch.tensor(sum(prompts, [])), meta.positions(), cache, meta))


PROMPTS = [[5, 9, 200, 3, 77], [42] * 7]


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    tensors = random_weights(PLAIN_ONE_GROUP, seed=1)
    single = load_model(write_checkpoint(tmp_path / "one", PLAIN_ONE_GROUP, tensors), "float32", progress=False)
    sharded = load_model(write_checkpoint(tmp_path / "three", PLAIN_ONE_GROUP, tensors, shards=3), "float32", progress=False)
    assert len(list((tmp_path / "three").glob("*.safetensors"))) == 3
    assert torch.equal(prefill_logits(single, PROMPTS), prefill_logits(sharded, PROMPTS))


def test_fp8_block_checkpoint_matches_its_dequantized_reference(tmp_path):
    """Weights shaped off the 128 grid (O, I not multiples of 128) go through the block
    format: the routed experts stay FP8 (dequantized per routed expert to the same values),
    every other linear loads to exactly the dequantized weights."""
    cfg = dict(LORA_YARN, hidden_size=160, moe_intermediate_size=72)
    fp8_cfg, fp8_tensors = to_fp8_checkpoint(cfg, random_weights(cfg, seed=3))
    assert fp8_tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert fp8_tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 2)
    dequantized = {n: t for n, t in fp8_tensors.items() if not n.endswith("_scale_inv")}
    for name, t in dequantized.items():
        if t.dtype == torch.float8_e4m3fn:
            dequantized[name] = fp8_block_dequantize(t, fp8_tensors[name + "_scale_inv"])
    fp8 = load_model(write_checkpoint(tmp_path / "fp8", fp8_cfg, fp8_tensors), "float32", progress=False)
    ref = load_model(write_checkpoint(tmp_path / "deq", cfg, dequantized), "float32", progress=False)
    experts = fp8.model.layers[1].mlp.experts
    assert experts.w13 is None and experts.backend.w13.weight.dtype == torch.float8_e4m3fn
    assert fp8.model.layers[1].mlp.shared_experts.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(prefill_logits(fp8, PROMPTS), prefill_logits(ref, PROMPTS), atol=1e-5, rtol=0)


def test_fp8_block_round_trip_is_exact_on_representable_values():
    scale = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    grid = torch.tensor([0.0, 1.0, -1.5, 448.0, 0.125, -3.0]).repeat(43)[:256 * 1]
    w = grid.repeat(200, 1)[:, :200]
    w = w * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :200]
    q, scale_inv = fp8_block_quantize(w)
    torch.testing.assert_close(fp8_block_dequantize(q, scale_inv), w, atol=0, rtol=0)


def test_mtp_layers_are_skipped(tmp_path):
    cfg = dict(PLAIN_ONE_GROUP, num_nextn_predict_layers=1)
    tensors = random_weights(cfg, seed=1)
    base = load_model(write_checkpoint(tmp_path / "base", cfg, tensors), "float32", progress=False)
    mtp = dict(tensors)
    extra = random_weights(dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1), seed=9)
    last = f"model.layers.{cfg['num_hidden_layers']}."
    mtp.update({n: t for n, t in extra.items() if n.startswith(last)})
    mtp[last + "eh_proj.weight"] = torch.randn(64, 128)
    model = load_model(write_checkpoint(tmp_path / "mtp", cfg, mtp), "float32", progress=False)
    assert len(model.model.layers) == cfg["num_hidden_layers"]
    assert torch.equal(prefill_logits(model, PROMPTS), prefill_logits(base, PROMPTS))


def test_bf16_checkpoint_casts_to_requested_dtype(tmp_path):
    cfg = dict(PLAIN_ONE_GROUP, torch_dtype="bfloat16")
    path = write_checkpoint(tmp_path, cfg, random_weights(cfg, dtype=torch.bfloat16))
    model = load_model(path, "bfloat16", progress=False)
    assert model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[3].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert load_model(path, "auto", progress=False).dtype == native
    logits = prefill_logits(model, PROMPTS)
    assert torch.isfinite(logits).all()


def test_missing_tensor_is_named(tmp_path):
    tensors = random_weights(PLAIN_ONE_GROUP)
    del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\), first: model.layers.2.mlp.experts.5.down_proj.weight"):
        load_model(write_checkpoint(tmp_path, PLAIN_ONE_GROUP, tensors), "float32", progress=False)


# --- bad checkpoints through the CLI: one line, exit code 2, no traceback ---------------

def run_generate(model_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(model_dir), "--prompt", "hi"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def corrupt(kind: str, path: Path) -> str:
    """Writes a broken checkpoint of the given kind into path; returns the expected message."""
    cfg = dict(PLAIN_ONE_GROUP)
    if kind == "not-a-checkpoint":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
        return "not a checkpoint directory (no config.json)"
    if kind == "model-type":
        write_checkpoint(path, dict(cfg, model_type="llama"), {})
        return "model_type 'llama' is not supported"
    if kind == "n-group":
        write_checkpoint(path, dict(cfg, n_group=3), {})
        return "n_group (3) does not divide n_routed_experts (8)"
    if kind == "odd-rope":
        write_checkpoint(path, dict(cfg, qk_rope_head_dim=15), {})
        return "qk_rope_head_dim must be a positive even number, got 15"
    tensors = random_weights(cfg)
    if kind == "wrong-shape":
        tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(10, 64)
        write_checkpoint(path, cfg, tensors)
        return "tensor model.layers.1.self_attn.kv_b_proj.weight has shape (10, 64), expected (320, 64)"
    write_checkpoint(path, cfg, tensors)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "not a readable safetensors file"


@pytest.mark.parametrize("kind", ["not-a-checkpoint", "model-type", "n-group", "odd-rope", "wrong-shape", "truncated"])
def test_bad_checkpoint_gives_one_error_line_and_exit_2(tmp_path, kind):
    expected = corrupt(kind, tmp_path / "ckpt")
    result = run_generate(tmp_path / "ckpt")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert result.stdout == ""
