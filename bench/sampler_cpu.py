"""Latency of one Sampler call on the CPU, against a naive per-row Python loop in the same run.

    .venv/bin/python bench/sampler_cpu.py [--threads N]

Batch 16 at vocabularies 4096 and 129280 (DeepSeek-V3), for three batches: all greedy;
all top_p 0.9 at temperature 0.7 with seeds; top_p plus repetition, frequency and presence
penalties over a 1024-token prompt and 256 generated tokens. Prints microseconds per call.
"""

from __future__ import annotations

import argparse

import torch

from engine.sampler import Sampler, SamplingRow, make_generator
from engine.sampling_params import SamplingParams
from timing import timed  # bench/ is on sys.path when a script there runs

BATCH, PROMPT_LEN, OUTPUT_LEN = 16, 1024, 256

SCENARIOS = {
    "greedy": SamplingParams(temperature=0.0),
    "top_p": SamplingParams(temperature=0.7, top_p=0.9),
    "penalties": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3,
                                presence_penalty=0.3),
}


def naive(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One row at a time, penalties token by token, multinomial on the row's generator."""
    tokens = []
    for x, r in zip(logits, rows):
        x, p = x.clone(), r.params
        if p.penalized:
            penalize(x, p, r.prompt_ids, r.output_ids)
        if p.greedy:
            tokens.append(int(x.argmax()))
            continue
        probs, order = (x / p.temperature).softmax(-1).sort(descending=True)
        keep = int((probs.cumsum(-1) - probs < p.top_p).sum())
        pick = torch.multinomial(probs[:keep], 1, generator=r.generator)
        tokens.append(int(order[pick]))
    return tokens


def penalize(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> None:
    for tok in set(prompt) | set(output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(output):
        x[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty


def make_rows(params: SamplingParams, vocab: int) -> list[SamplingRow]:
    ids = lambda n: torch.randint(0, vocab, (n,)).tolist()  # noqa: E731
    return [SamplingRow(params, None if params.greedy else make_generator(i), ids(PROMPT_LEN), ids(OUTPUT_LEN))
            for i in range(BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = Sampler()
    print(f"batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for vocab in (4096, 129280):
        logits = torch.randn(BATCH, vocab) * 3
        for name, params in SCENARIOS.items():
            rows = make_rows(params, vocab)
            ours = timed(lambda: sampler(logits, rows), 30)
            ref = timed(lambda: naive(logits, rows), 5 if params.penalized else 10)
            print(f"V={vocab:>6} {name:<9}  sampler {ours * 1e6:>9.0f} us   naive loop {ref * 1e6:>9.0f} us"
                  f"   naive/sampler {ref / ours:6.1f}x")


if __name__ == "__main__":
    main()
