"""Prefill throughput and decode step latency of the demo model, against Hugging Face
transformers' DeepseekV3ForCausalLM on the same checkpoint in the same run.

    .venv/bin/python bench/model_cpu.py [--model DIR] [--threads N]

Prints one line per measurement. The reference runs batch 1 only (its cache is not
paged); our decode is also measured at larger batches through the paged cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from engine.attention import AttentionMetadata
from engine.demo import build_demo_model
from engine.loader import load_model
from timing import timed  # bench/ is on sys.path when a script there runs

BLOCK = 64


def paged_meta(q_lens: list[int], s_lens: list[int], blocks_per_seq: int, num_decodes: int) -> AttentionMetadata:
    tables = torch.arange(len(s_lens) * blocks_per_seq, dtype=torch.int32).view(len(s_lens), blocks_per_seq)
    slots = [i * blocks_per_seq * BLOCK + p for i, (q, s) in enumerate(zip(q_lens, s_lens)) for p in range(s - q, s)]
    return AttentionMetadata(tuple(q_lens), tuple(s_lens), tables, torch.tensor(slots), num_decodes)


def ours_prefill(model, n: int) -> float:
    blocks = -(-n // BLOCK)
    cache = model.allocate_kv_cache(blocks, BLOCK)
    ids, meta = torch.randint(2, 1000, (n,)), paged_meta([n], [n], blocks, 0)
    return timed(lambda: model.compute_logits(model(ids, meta.positions(), cache, meta)[-1:]), 3)


def ours_decode(model, batch: int, context: int) -> float:
    blocks = -(-(context + 1) // BLOCK)
    cache = model.allocate_kv_cache(blocks * batch, BLOCK)
    meta = paged_meta([1] * batch, [context + 1] * batch, blocks, batch)
    ids = torch.randint(2, 1000, (batch,))
    return timed(lambda: model.compute_logits(model(ids, meta.positions(), cache, meta)), 10)


def hf_prefill(ref, n: int) -> float:
    ids = torch.randint(2, 1000, (1, n))
    with torch.no_grad():
        return timed(lambda: ref(ids, logits_to_keep=1), 3)


def hf_decode(ref, context: int) -> float:
    from transformers import DynamicCache
    with torch.no_grad():
        prompt = torch.randint(2, 1000, (1, context))
        cache = DynamicCache(config=ref.config)
        ref(prompt, cache=cache)
        token = torch.tensor([[7]])

        def step():
            ref(token, cache=cache)
            cache.crop(-1)  # keep the context length fixed across repeats
        return timed(step, 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_demo_model(Path(tmp) / "demo")
        model = load_model(path, dtype=args.dtype, progress=False)
        from transformers import DeepseekV3ForCausalLM
        ref = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
        print(f"device cpu, {torch.get_num_threads()} threads, {args.dtype}, model {path}")
        with torch.inference_mode():
            for n in (128, 512, 2048):
                ours, theirs = ours_prefill(model, n), hf_prefill(ref, n)
                print(f"prefill {n:5d} tokens: moeserve {n / ours:8.0f} tok/s | transformers {n / theirs:8.0f} tok/s"
                      f" | x{theirs / ours:.2f}")
            for ctx in (256, 2048):
                ours, theirs = ours_decode(model, 1, ctx), hf_decode(ref, ctx)
                print(f"decode batch  1, context {ctx:5d}: moeserve {ours * 1e3:6.2f} ms/step | transformers "
                      f"{theirs * 1e3:6.2f} ms/step | x{theirs / ours:.2f}")
            for batch in (8, 32):
                ours = ours_decode(model, batch, 256)
                print(f"decode batch {batch:2d}, context   256: moeserve {ours * 1e3:6.2f} ms/step"
                      f" = {batch / ours:7.0f} tok/s")


if __name__ == "__main__":
    main()
