"""How far FP4 routed experts move the demo model's next-token distributions.

    .venv/bin/python bench/fp4_quality.py [--model DIR] [--dtype bfloat16] [--prompts 8] [--length 64]

Loads the checkpoint unquantized and with its routed experts quantized at load (NVFP4 and
MXFP4), runs the same random-token prompts through each, and prints per format the mean
KL(unquantized || quantized) of the next-token distributions over every prompt position
(nats), and how often the top-1 token agrees. The demo model's weights are random, so
this measures quantization error on Gaussian weights, not on a trained model's; its
distributions are nearly flat, which makes top-1 agreement a weak signal (KL is the figure).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata
from engine.demo import build_demo_model
from engine.loader import load_model

BLOCK = 16


def prompt_logits(model, prompts: torch.Tensor) -> torch.Tensor:
    """prompts [P, S] int64 -> fp32 logits [P * S, V], each prompt prefilled in one step."""
    n, length = prompts.shape
    per_seq = -(-length // BLOCK)
    tables = torch.arange(n * per_seq, dtype=torch.int32).view(n, per_seq)
    slots = torch.cat([torch.arange(length) + i * per_seq * BLOCK for i in range(n)])
    meta = AttentionMetadata((length,) * n, (length,) * n, tables, slots, 0)
    cache = model.allocate_kv_cache(n * per_seq, BLOCK)
    return model.compute_logits(model(prompts.flatten(), meta.positions(), cache, meta))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model, built if needed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    args = p.parse_args()
    model_dir = args.model or build_demo_model(Path(tempfile.mkdtemp()) / "demo")
    gen = torch.Generator().manual_seed(0)
    base = load_model(model_dir, args.dtype, progress=False)
    prompts = torch.randint(2, base.cfg.vocab_size, (args.prompts, args.length), generator=gen)
    ref = F.log_softmax(prompt_logits(base, prompts), dim=-1)
    entropy = -(ref.exp() * ref).sum(-1).mean()
    print(f"{model_dir} {args.dtype}: {args.prompts} prompts x {args.length} tokens; unquantized next-token "
          f"entropy {entropy:.2f} nats (uniform: {torch.tensor(float(base.cfg.vocab_size)).log():.2f})")
    for quantization in ("nvfp4", "mxfp4"):
        model = load_model(model_dir, args.dtype, progress=False, quantization=quantization)
        out = F.log_softmax(prompt_logits(model, prompts), dim=-1)
        kl = F.kl_div(out, ref, log_target=True, reduction="none").sum(-1)
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean()
        nbytes = sum(e.nbytes() for e in model.routed_experts()) / sum(e.nbytes() for e in base.routed_experts())
        print(f"{quantization}: mean KL {kl.mean():.4f} nats (max {kl.max():.4f}), top-1 agreement "
              f"{100 * top1:.1f}%, expert bytes {100 * nbytes:.1f}% of {args.dtype}")


if __name__ == "__main__":
    main()
