"""MLA attention on a GPU: the device's fast backend (FlashInfer) against the torch reference,
at DeepSeek-R1's dims, through the engine's `AttentionBackend` interface.

    .venv/bin/python bench/attention_gpu.py [--batches 1,8,32,64] [--context 4096]
        [--prefill 4096,32768,131072] [--heads 128]

- decode (the absorbed form, one query per sequence, every sequence --context tokens long):
  per batch, one layer's attention time on each backend (the step's plan done beforehand, as
  every layer after the first finds it), and the largest difference of the fast backend's
  output from the reference's;
- long prefill (the naive form, one sequence whose whole prompt is the step): per prompt
  length, one layer's time and the peak memory the call adds on top of its inputs, on each
  backend; "OOM" where a backend runs out of memory (an unchunked [H, Q, S] score tensor
  grows with the square of the prompt).

One R1 layer on one GPU: 128 heads, kv_lora 512, rope 64, nope 128, v 128; bf16 cache with
blocks of 64 tokens; random inputs with a fixed seed. Times are medians (bench/timing.py).

On a machine without a CUDA GPU it says so and exits 0; `--device cpu` runs the same
comparison on the CPU backends (small sizes, for the test that keeps this script working).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention import AttentionMetadata, default_attention_backend, get_attention_backend  # noqa: E402
from timing import timed  # noqa: E402  (bench/ is on sys.path when a script there runs)

CKV, ROPE, NOPE, V = 512, 64, 128, 128  # DeepSeek-V3/R1
BLOCK = 64


def paged(seq_lens: list[int], query_lens: list[int], device: torch.device) -> AttentionMetadata:
    """Sequences on consecutive blocks; the new tokens are each sequence's last ones."""
    widths = [-(-s // BLOCK) for s in seq_lens]
    firsts = [sum(widths[:i]) for i in range(len(widths))]
    tables = torch.tensor([[f + j if j < w else 0 for j in range(max(widths))] for f, w in zip(firsts, widths)],
                          dtype=torch.int32, device=device)  # [S, M]
    slots = torch.cat([torch.arange(s - q, s) + f * BLOCK for f, s, q in zip(firsts, seq_lens, query_lens)])
    decodes = len(seq_lens) if all(q == 1 for q in query_lens) else 0
    return AttentionMetadata(tuple(query_lens), tuple(seq_lens), tables, slots.to(device), decodes)


def random_cache(seq_lens: list[int], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """One layer's cache [N, B, Ckv + R] bf16, every row written."""
    blocks = sum(-(-s // BLOCK) for s in seq_lens)
    return torch.randn(blocks, BLOCK, CKV + ROPE, generator=gen, device=device).to(torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode(backends: dict, batch: int, context: int, heads: int, device: torch.device) -> str:
    gen = torch.Generator(device=device).manual_seed(batch)
    meta = paged([context] * batch, [1] * batch, device)
    cache = random_cache(meta.seq_lens, device, gen)
    q_latent = torch.randn(batch, heads, CKV, generator=gen, device=device).to(torch.bfloat16)  # [S, H, Ckv]
    q_pe = torch.randn(batch, heads, ROPE, generator=gen, device=device).to(torch.bfloat16)  # [S, H, R]
    scale = (NOPE + ROPE) ** -0.5
    times, outs = {}, {}
    for name, backend in backends.items():
        backend.plan(meta)
        outs[name] = backend.absorbed(q_latent, q_pe, cache, meta, scale).float()

        def layer(backend=backend):
            backend.absorbed(q_latent, q_pe, cache, meta, scale)
            sync(device)
        times[name] = timed(layer, 10)
    return _row(f"{batch:>6} {context:>8}", times, outs)


def prefill(backends: dict, tokens: int, heads: int, device: torch.device) -> str:
    gen = torch.Generator(device=device).manual_seed(tokens)
    meta = paged([tokens], [tokens], device)
    cache = random_cache(meta.seq_lens, device, gen)
    q_nope = torch.randn(tokens, heads, NOPE, generator=gen, device=device).to(torch.bfloat16)  # [T, H, Dn]
    q_pe = torch.randn(tokens, heads, ROPE, generator=gen, device=device).to(torch.bfloat16)  # [T, H, R]
    w_kv_b = (torch.randn(heads, NOPE + V, CKV, generator=gen, device=device) / CKV ** 0.5).to(torch.bfloat16)
    scale = (NOPE + ROPE) ** -0.5
    times, outs, peaks = {}, {}, {}
    for name, backend in backends.items():
        def layer(backend=backend):
            out = backend.naive(q_nope, q_pe, cache, w_kv_b, meta, scale)
            sync(device)
            return out
        try:
            backend.plan(meta)
            before = _reset_peak(device)
            outs[name] = layer().float()
            peaks[name] = _peak(device) - before
            times[name] = timed(layer, 3 if tokens <= 32768 else 1)
        except torch.OutOfMemoryError:
            outs.pop(name, None)
            times[name] = peaks[name] = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    peak_cols = " ".join(f"{'OOM' if p is None else f'{p / 2**30:.2f}' if device.type == 'cuda' else '-':>9}"
                         for p in peaks.values())
    return _row(f"{tokens:>7}", times, outs) + f" {peak_cols}"


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _row(head: str, times: dict, outs: dict) -> str:
    cols = " ".join(f"{'OOM' if t is None else f'{t * 1e3:.3f}':>9}" for t in times.values())
    names = list(outs)
    diff = f"{(outs[names[1]] - outs[names[0]]).abs().max().item():.2e}" if len(names) == 2 else "-"
    return f"{head} {cols} {diff:>9}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", default="4096,32768,131072", help="prompt lengths of the long-prefill table")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU: FlashInfer runs only there; nothing to measure here")
        return
    fast = default_attention_backend(device)
    backends = {"reference": get_attention_backend("torch")}
    if fast != "torch":
        backends[fast] = get_attention_backend(fast)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {where}; {args.heads} heads, kv_lora {CKV}, rope {ROPE}, nope {NOPE}, v {V}; bf16 cache, "
          f"block {BLOCK}; backends: {', '.join(backends)}; diff = max |{fast} - reference|")
    label = {"reference": "ref", "flashinfer": "fi"}
    names = " ".join(f"{label.get(n, n) + ' ms':>9}" for n in backends)
    print(f"decode (absorbed), one layer\n{'batch':>6} {'context':>8} {names} {'diff':>9}")
    for batch in map(int, args.batches.split(",")):
        print(decode(backends, batch, args.context, args.heads, device), flush=True)
    gib = " ".join(f"{label.get(n, n) + ' GiB':>9}" for n in backends)
    print(f"long prefill (naive), one layer\n{'tokens':>7} {names} {'diff':>9} {gib}")
    for tokens in map(int, args.prefill.split(",")):
        print(prefill(backends, tokens, args.heads, device), flush=True)


if __name__ == "__main__":
    main()
