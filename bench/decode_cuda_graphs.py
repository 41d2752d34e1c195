"""Decode step time with and without CUDA graphs, through the engine's model runner.

    .venv/bin/python bench/decode_cuda_graphs.py [--model DIR] [--batches 1,2,4] [--context N]
        [--dtype bfloat16] [--quantization nvfp4|mxfp4]

Per batch of B sequences, each with --context tokens in the cache: the median time of one
decode step (`ModelRunner.run`: host-side inputs, the forward, the logits, and a device
sync) on the eager runner and on one that replays recorded CUDA graphs (`engine.cuda_graphs`),
measured in the same run on the same model and block tables, and the speed-up. The model
is the demo model (DeepSeek-V3 dims for attention: kv_lora 512, rope 64; small elsewhere,
so launches weigh most) unless --model names a checkpoint. Recording needs the routed
experts in FP4 (the Triton MoE), hence --quantization nvfp4 by default.

On a machine without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from engine.cuda_graphs import capture_blocker, cuda_graph_config
from engine.demo import build_demo_model
from engine.kv_manager import KVCacheManager
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from timing import timed  # bench/ is on sys.path when a script there runs

BLOCK = 64


def decode_batch(kv: KVCacheManager, batch: int, context: int) -> list[tuple[Sequence, int]]:
    """B sequences whose first `context` tokens count as cached; each is about to decode one."""
    scheduled = []
    for i in range(batch):
        seq = Sequence(f"b{batch}/{i}", [7] * (context + 1), SamplingParams(max_tokens=1), 1)
        assert kv.allocate_slots(seq, context + 1), "the benchmark's cache is too small"
        seq.num_computed_tokens = context
        scheduled.append((seq, 1))
    return scheduled


def step_time(runner: ModelRunner, scheduled) -> float:
    def step():
        runner.run(scheduled)
        torch.cuda.synchronize()
    return timed(step, 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quantization", default="nvfp4", choices=["nvfp4", "mxfp4", "none"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: CUDA graphs record GPU work; nothing to measure here")
        return
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_demo_model(Path(tmp) / "demo")
        model = load_model(path, dtype=args.dtype, device="cuda", progress=False,
                           quantization=None if args.quantization == "none" else args.quantization)
    reason = capture_blocker(model)
    if reason is not None:
        sys.exit(f"cannot record this model's decode step: {reason}")
    blocks_per_seq = -(-(args.context + 1) // BLOCK)
    num_blocks = sum(batches) * blocks_per_seq
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=False)
    eager = ModelRunner(model, kv, num_blocks)
    graphs = ModelRunner(model, kv, num_blocks, cuda_graph_config(model, max(batches), args.context + 1, BLOCK))
    print(f"device {torch.cuda.get_device_name()}, {args.dtype}, experts {args.quantization}, "
          f"attention {model.attention.name}, context {args.context}, model {path}")
    print(f"recorded batch sizes: {', '.join(map(str, graphs.graphs.sizes))}")
    for batch in batches:
        scheduled = decode_batch(kv, batch, args.context)
        t_eager, t_graph = step_time(eager, scheduled), step_time(graphs, scheduled)
        print(f"batch {batch:3d}: eager {t_eager * 1e3:7.3f} ms, CUDA graph {t_graph * 1e3:7.3f} ms, "
              f"x{t_eager / t_graph:.2f}")


if __name__ == "__main__":
    main()
