"""Step time of the device sampler (engine.sampler) on the CPU against today's per-row
sampler (engine.sampler_reference), in the same run, at batches 1 to 256 and DeepSeek-V3's
vocabulary of 129,280 tokens.

    .venv/bin/python bench/sampler_cpu.py [--threads N] [--batches 1,4,16,64,256]

Four batches of one kind each: all greedy; temperature 0.8 alone; top_p 0.9 at temperature
0.7; top_p plus repetition, frequency and presence penalties over a 1,024-token prompt and
256 generated tokens. Every call is a decode step: each row's token is appended to its
output, as the engine does, so the device sampler's token counts follow incrementally and
the reference rebuilds them from the lists. Rows get distinct seeds. Prints milliseconds
per step (median) and the reference's time over the device sampler's.
"""

from __future__ import annotations

import argparse

import torch

import engine.sampler_reference as reference
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from timing import timed  # bench/ is on sys.path when a script there runs

VOCAB, PROMPT_LEN, OUTPUT_LEN = 129_280, 1024, 256

SCENARIOS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top_p": SamplingParams(temperature=0.7, top_p=0.9),
    "penalties": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3,
                                presence_penalty=0.3),
}


def make_rows(params: SamplingParams, batch: int, gen: torch.Generator) -> tuple[list, list]:
    """The same sequences as device-sampler rows and as reference rows (own lists each)."""
    ours, theirs = [], []
    for i in range(batch):
        prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (OUTPUT_LEN,), generator=gen).tolist()
        ours.append(SamplingRow(params, i, prompt, list(output)))
        theirs.append(reference.SamplingRow(params, None if params.greedy else reference.make_generator(i),
                                            prompt, list(output)))
    return ours, theirs


def decode_step(sampler, logits: torch.Tensor, rows: list) -> None:
    for row, token in zip(rows, sampler(logits, rows).token_ids):
        row.output_ids.append(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batches", default="1,4,16,64,256", help="comma-separated batch sizes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"V={VOCAB}, torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step (median)")
    print(f"{'batch':>5}  {'scenario':<12} {'device':>9} {'reference':>10} {'ref/device':>11}")
    gen = torch.Generator().manual_seed(0)
    for batch in map(int, args.batches.split(",")):
        logits = torch.randn(batch, VOCAB, generator=gen) * 3
        repeats = max(3, 48 // batch)
        for name, params in SCENARIOS.items():
            ours, theirs = make_rows(params, batch, gen)
            sampler, ref_sampler = Sampler(), reference.Sampler()
            new = timed(lambda: decode_step(sampler, logits, ours), repeats)
            old = timed(lambda: decode_step(ref_sampler, logits, theirs), repeats)
            print(f"{batch:>5}  {name:<12} {new * 1e3:>9.2f} {old * 1e3:>10.2f} {old / new:>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
