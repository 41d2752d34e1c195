"""Output tokens/s of `engine serve` over gRPC at concurrency 1 and 16, against Hugging Face
`generate()` at batch 1 and 16 on the same random checkpoint, in the same run.

    .venv/bin/python bench/engine_grpc.py [--requests-per-client 4] [--skip-hf]

Workload (issue 3): prompts of 128 random token ids, 64 new tokens, greedy, ignore_eos,
bf16. Checkpoint: hidden 512, 4 layers (first dense), intermediate 1024, 16 routed experts
top-4 in 4 groups (top 2 groups), 1 shared expert, moe_intermediate 256, q_lora 128,
kv_lora 512, rope 64, nope 32, v 32, 8 heads, vocab 4096.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engine.checkpoint import random_weights, write_checkpoint  # noqa: E402
from engine.tokenizer import write_demo_tokenizer  # noqa: E402
from engine_server import EngineProcess, tokens  # noqa: E402

BENCH_CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=4096, hidden_size=512,
    intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64,
    qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
    topk_method="noaux_tc", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, rope_scaling=None, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    num_nextn_predict_layers=0, torch_dtype="bfloat16", rope_interleave=True, attention_bias=False)
PROMPT_LEN, NEW_TOKENS = 128, 64


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, BENCH_CONFIG["vocab_size"]) for _ in range(PROMPT_LEN)] for _ in range(count)]


async def one_client(stub, batch: list[list[int]]) -> int:
    produced = 0
    for ids in batch:
        async for chunk in stub.StreamGenerate(tokens(ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)):
            produced += sum(len(c.token_ids) for c in chunk.choices)
    return produced


async def measure_engine(engine: EngineProcess, concurrency: int, per_client: int, seed: int) -> float:
    stub = engine.aio_stub()
    work = prompts(concurrency * per_client, seed)
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one_client(stub, work[i::concurrency]) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    assert sum(counts) == concurrency * per_client * NEW_TOKENS
    return sum(counts) / elapsed


def measure_hf(path: Path, batch: int) -> float:
    from transformers import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts(batch, seed=7))
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t0
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return batch * NEW_TOKENS / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--engine-flags", default="", help="extra flags for engine serve")
    ap.add_argument("--engine-threads", type=int, default=None, help="OMP threads of the engine (default: torch's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "bench", BENCH_CONFIG, random_weights(BENCH_CONFIG, 3, torch.bfloat16))
        write_demo_tokenizer(path)
        engine = EngineProcess(path, "--dtype", "bfloat16", "--max-model-len", "1024", "--kv-cache-memory", "1",
                               *args.engine_flags.split(), threads=args.engine_threads)
        try:
            asyncio.run(measure_engine(engine, 4, 1, seed=1))  # warm-up
            ours = {c: asyncio.run(measure_engine(engine, c, args.requests_per_client, seed=c)) for c in (1, 16)}
        finally:
            engine.stop()
        print(f"cpu threads {torch.get_num_threads()}; prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy, bf16")
        for c, tps in ours.items():
            line = f"concurrency {c:2d}: moeserve {tps:7.1f} tok/s"
            if not args.skip_hf:
                ref = measure_hf(path, c)
                line += f" | transformers generate() batch {c:2d}: {ref:7.1f} tok/s | x{tps / ref:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
