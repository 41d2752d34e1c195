"""Today's per-row sampler, kept as the spec that `engine.sampler` (the device sampler) is
tested against: every fast path has a slow twin.

Order of processing follows vLLM: logprobs come from the RAW logits (log_softmax of the
model output, before bias, penalties, temperature and filters); then logit_bias, the
repetition penalty (prompt and output tokens), frequency and presence penalties (output
tokens), temperature, top_k, top_p, min_p, and the draw. Greedy rows (temperature 0) take
the argmax after bias and penalties.

Penalties rebuild each row's token counts from its Python lists of prompt and output ids
on every call. Every sampled row draws Exponential(1) noise q [V] from its own generator
and takes argmax(probs / q), the exponential race, which picks token i with probability
probs[i] (https://en.wikipedia.org/wiki/Exponential_distribution
#Distribution_of_the_minimum_of_exponential_random_variables).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from engine.errors import InvalidRequest
from engine.sampler import SampleOutput, with_logprobs
from engine.sampling_params import SamplingParams

# Legend: N = rows in the step, R = rows that sample (temperature > 0), V = vocabulary,
# W = candidates for top_k/top_p.

CANDIDATES = 1024


@dataclass
class SamplingRow:
    """One sequence decoded this step. `generator` is None only for greedy rows; penalties
    read `prompt_ids` and `output_ids` (the sequence's generated tokens so far)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A row's own generator: seeded from `seed`, or from os.urandom when it is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    return torch.Generator(device=device).manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


class Sampler:
    """Stateless; the per-row state lives in each row's generator."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        """logits [N, V] fp32, not modified; rows[i] describes row i."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        processed = apply_penalties(apply_logit_bias(logits, rows), rows)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if len(sampled) == len(rows):
            tokens = _draw(processed, rows)
        else:
            tokens = processed.argmax(dim=-1)  # [N]; the answer for greedy rows
            if sampled:
                idx = torch.tensor(sampled, device=logits.device)
                tokens[idx] = _draw(processed[idx], [rows[i] for i in sampled])
        return with_logprobs(logits, rows, tokens)


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] -> [N, V] with each row's logit_bias added (a new tensor if any)."""
    entries = [(i, tok, bias) for i, row in enumerate(rows) for tok, bias in row.params.logit_bias]
    if not entries:
        return logits
    row_idx, tok_idx, bias = zip(*entries)
    vocab = logits.shape[1]
    if not all(0 <= t < vocab for t in tok_idx):
        raise InvalidRequest("logit_bias", f"token ids must be in [0, {vocab})")
    index = (torch.tensor(row_idx, device=logits.device), torch.tensor(tok_idx, device=logits.device))
    return logits.index_put(index, torch.tensor(bias, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] -> [N, V]: repetition penalty over prompt + output tokens (positive
    logits divided by it, negative ones multiplied), then minus frequency * count and minus
    presence * seen over output tokens. Returns `logits` itself when no row is penalized."""
    if not any(row.params.penalized for row in rows):
        return logits
    rep = _per_row([row.params.repetition_penalty for row in rows], logits.device)  # [N]
    freq = _per_row([row.params.frequency_penalty for row in rows], logits.device)
    pres = _per_row([row.params.presence_penalty for row in rows], logits.device)
    counts = token_counts([row.output_ids for row in rows], logits.shape[1], logits.device)  # [N, V]
    if (rep != 1).any():
        seen = (counts + token_counts([row.prompt_ids for row in rows], logits.shape[1], logits.device)) > 0
        factor = torch.where(seen, rep[:, None], 1.0)
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    if (freq != 0).any():
        logits = logits - freq[:, None] * counts
    if (pres != 0).any():
        logits = logits - pres[:, None] * (counts > 0)
    return logits


def token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, V] fp32: how often each token occurs in each row's list (one scatter_add)."""
    width = max(map(len, id_lists), default=0)
    # Pad with the id `vocab`, which lands in an extra column that is dropped.
    padded = torch.tensor([ids + [vocab] * (width - len(ids)) for ids in id_lists],
                          dtype=torch.long, device=device).view(len(id_lists), width)
    counts = torch.zeros(len(id_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, V] (after bias and penalties) of rows with temperature > 0 -> probs
    [R, V] fp32 after temperature, top_k, top_p and min_p. The argmax always survives."""
    # Subtracting the row max first keeps a tiny temperature from overflowing to inf - inf.
    temperature = _per_row([p.temperature for p in params], logits.device)  # [R]
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        logits = _top_k_top_p(logits, params)
    if any(p.min_p > 0 for p in params):
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); the max is 0 here.
        floor = _per_row([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], logits.device)
        logits = logits.masked_fill(logits < floor[:, None], -math.inf)
    return logits.softmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sets logits below each row's cut-off to -inf (ties at the cut-off all stay)."""
    vocab = logits.shape[1]
    k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=logits.device)
    top_p = _per_row([p.top_p if p.top_p < 1 else math.inf for p in params], logits.device)
    # A partial sort of the top CANDIDATES is ~10x cheaper than a full one at V = 129280
    # and holds the nucleus of a peaked distribution; a row whose cut lies further out
    # sends the batch through the full sort.
    cutoff = _cutoff(logits, k, top_p, min(vocab, max([CANDIDATES] + [p.top_k for p in params])))
    if cutoff is None:
        cutoff = _cutoff(logits, k, top_p, vocab)
    return logits.masked_fill(logits < cutoff[:, None], -math.inf)


def _cutoff(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, width: int) -> torch.Tensor | None:
    """The smallest kept logit [R] of each row, from its `width` largest logits; None when
    some row's top_p cut lies beyond them."""
    ordered = logits.topk(width, dim=-1).values  # [R, W], descending
    in_k = torch.arange(width, device=logits.device) < k[:, None]
    # top_p renormalizes over the top-k survivors: all of them are here when k <= width.
    norm = torch.where(k <= width, ordered.masked_fill(~in_k, -math.inf).logsumexp(-1), logits.logsumexp(-1))
    probs = (ordered - norm[:, None]).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 at rank 0, so the argmax stays
    kept = (in_k & (mass_before < top_p[:, None])).sum(dim=-1)  # [R], >= 1
    beyond = (kept == width) & (k > width)  # only rows without top_k can reach past width
    if width < logits.shape[1] and bool((beyond & top_p.isfinite()).any()):
        return None
    return ordered.gather(1, (kept - 1)[:, None]).squeeze(1).masked_fill(beyond, -math.inf)


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [R, V] of rows with temperature > 0 -> sampled token ids [R] int64."""
    return exponential_race(sampling_probs(logits, [row.params for row in rows]), [_generator(row) for row in rows])


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """probs [R, V] -> token ids [R] int64; row r draws its noise from generators[r] only."""
    vocab = probs.shape[1]
    # Exponential(1) as -log(U): the same law as Tensor.exponential_, which runs ~6x slower
    # on the CPU (2.0 vs 0.34 ms per 129280-token row).
    noise = torch.stack([torch.rand(vocab, device=g.device, generator=g).log_().neg_() for g in generators])
    # U < 1 keeps q > 0, but a q of 0 would turn a filtered token's 0 / 0 into NaN.
    noise = noise.to(probs.device).clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _per_row(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _generator(row: SamplingRow) -> torch.Generator:
    if row.generator is None:
        raise ValueError("a row with temperature > 0 needs its own generator (make_generator)")
    return row.generator
