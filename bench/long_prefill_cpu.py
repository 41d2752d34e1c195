"""Long-prefill attention on the CPU: time and peak memory of one layer's prefill attention
(MLA's naive form) for a whole prompt of 4k, 16k and 32k tokens, at the demo model's
attention dims (engine/demo.py: 4 heads, kv_lora 512, rope 64, nope 128, v 128; bf16 cache).

Two paths in the same run:
- chunked: `CpuAttention.naive` now (engine/attention/chunked.py): context in chunks,
  log-sum-exp merge, scores [H, rows, K] per block;
- unchunked: the CPU path before it (kept below as `unchunked_naive`): the whole context
  up-projected at once, then [H, Q, S] fp32 scores and an additive [Q, S] mask per sequence.
  It is skipped where its estimated peak exceeds 80% of the memory available.

Each measurement runs in a fresh process (`--one PATH TOKENS` prints one JSON line), and its
peak is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs
where the kernel allows, else ru_maxrss) minus its resident memory just before the call:
the memory the attention call itself added on top of its inputs. Beside wall-clock seconds
it reports the process's CPU seconds (all threads), which other load on a shared machine
changes far less than wall time.

    python bench/long_prefill_cpu.py [--tokens 4096 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.attention import AttentionMetadata  # noqa: E402
from engine.attention.cpu_backend import CpuAttention  # noqa: E402
from engine.demo import DEMO_CONFIG  # noqa: E402

BLOCK = 64
HEADS, NOPE, ROPE, V_DIM, LATENT = (DEMO_CONFIG[k] for k in ("num_attention_heads", "qk_nope_head_dim",
                                                          "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))


def unchunked_naive(q_nope, q_pe, cache, w_kv_b, meta, scale):
    """The CPU backend's naive form before chunking, unchanged in substance: every context
    gathered and up-projected in one bf16 GEMM, then per sequence fp32 [H, Q, S] scores."""
    heads, nope_dim, latent_dim = q_nope.shape[1], q_nope.shape[-1], w_kv_b.shape[-1]
    v_dim = w_kv_b.shape[1] - nope_dim
    block_size = cache.shape[1]
    offsets = torch.arange(block_size)
    rows = torch.cat([(meta.block_tables[i, : -(-s // block_size)].long()[:, None] * block_size + offsets)
                      .flatten()[:s] for i, s in enumerate(meta.seq_lens)])
    ctx = cache.view(-1, cache.shape[-1]).index_select(0, rows)
    kv = F.linear(ctx[:, :latent_dim], w_kv_b.flatten(0, 1).to(cache.dtype)).view(-1, heads, nope_dim + v_dim)
    q = torch.cat((q_nope, q_pe), dim=-1).float().transpose(0, 1)
    out = q_nope.new_empty(q_nope.shape[0], heads, v_dim)
    q_start = k_start = 0
    for q_len, seq_len in zip(meta.query_lens, meta.seq_lens):
        ks = slice(k_start, k_start + seq_len)
        k = torch.cat((kv[ks, :, :nope_dim], ctx[ks, None, latent_dim:].expand(-1, heads, -1)), dim=-1)
        mask = torch.zeros(q_len, seq_len).masked_fill_(
            torch.ones(q_len, seq_len, dtype=torch.bool).triu_(seq_len - q_len + 1), float("-inf"))
        scores = torch.baddbmm(mask, q[:, q_start:q_start + q_len], k.float().permute(1, 2, 0), alpha=scale)
        o = torch.bmm(scores.softmax(dim=-1), kv[ks, :, nope_dim:].float().transpose(0, 1))
        out[q_start:q_start + q_len] = o.transpose(0, 1)
        q_start, k_start = q_start + q_len, k_start + seq_len
    return out


def unchunked_bytes(tokens: int) -> int:
    """The unchunked path's peak estimate: scores and probabilities [H, Q, S] fp32, mask [Q, S]."""
    return 2 * HEADS * tokens * tokens * 4 + tokens * tokens * 4


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Resets this process's VmHWM to its current RSS, where the kernel lets us."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes(was_reset: bool) -> int:
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(path: str, tokens: int) -> dict:
    """One prompt of `tokens` tokens through one layer's naive attention: seconds and the
    bytes the call added to the process's peak resident memory."""
    torch.manual_seed(0)
    blocks = -(-tokens // BLOCK)
    cache = torch.randn(blocks, BLOCK, LATENT + ROPE, dtype=torch.bfloat16)
    meta = AttentionMetadata((tokens,), (tokens,), torch.arange(blocks, dtype=torch.int32)[None], torch.arange(tokens))
    q_nope = torch.randn(tokens, HEADS, NOPE, dtype=torch.bfloat16)
    q_pe = torch.randn(tokens, HEADS, ROPE, dtype=torch.bfloat16)
    w_kv_b = torch.randn(HEADS, NOPE + V_DIM, LATENT) / LATENT ** 0.5
    run = unchunked_naive if path == "unchunked" else CpuAttention().naive
    warm = AttentionMetadata((64,), (64,), meta.block_tables, meta.slot_mapping[:64])
    run(q_nope[:64], q_pe[:64], cache, w_kv_b, warm, NOPE ** -0.5)  # warm-up: oneDNN's kernels, the bf16 weight
    before, was_reset = rss_bytes(), reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(q_nope, q_pe, cache, w_kv_b, meta, (NOPE + ROPE) ** -0.5)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    added = peak_bytes(was_reset) - before
    assert out.shape == (tokens, HEADS, V_DIM) and bool(torch.isfinite(out).all())
    return {"path": path, "tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_bytes": max(added, 0), "reset": was_reset}


def run_one(path: str, tokens: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", path, str(tokens)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--one", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
        return
    print(f"one layer's prefill attention, demo dims (H={HEADS}, C={LATENT}, R={ROPE}, Dn={NOPE}, Dv={V_DIM}), "
          f"bf16 cache, {torch.get_num_threads()} threads")
    print(f"{'':>7} | {'chunked':^26} | {'unchunked (before)':^26} |")
    print(f"{'tokens':>7} | {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} | {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} | "
          "cpu-time ratio")
    for tokens in args.tokens:
        new = run_one("chunked", tokens)
        cells = [f"{new['seconds']:>7.2f} {new['cpu_seconds']:>7.2f} {new['peak_bytes'] / 2**20:>9.0f}"]
        need = unchunked_bytes(tokens)
        if need > 0.8 * available_bytes():
            free = available_bytes()
            cells.append(f"{'skipped':>26} | needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available")
        else:
            old = run_one("unchunked", tokens)
            cells.append(f"{old['seconds']:>7.2f} {old['cpu_seconds']:>7.2f} {old['peak_bytes'] / 2**20:>9.0f} | "
                         f"{old['cpu_seconds'] / new['cpu_seconds']:.2f}x faster")
        print(f"{tokens:>7} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
