"""Token sampling for one engine step, on the logits' device, vectorized over the batch.

Order of processing follows vLLM: logprobs come from the RAW logits (log_softmax of the
model output, before bias, penalties, temperature and filters); then logit_bias, the
repetition penalty (prompt and output tokens), frequency and presence penalties (output
tokens), temperature, top_k, top_p, min_p, and the draw. Greedy rows (temperature 0) take
the exact argmax after bias and penalties. `engine.sampler_reference` is the per-row
sampler this one replaced; tests hold the two to the same logits and the same laws.

Per call the host reads a few fields of each row and builds a handful of small tensors;
nothing it does grows with the prompt or the vocabulary. Penalties read token statistics
that live on the device (`TokenCounts`): a sequence's prompt is scattered into its slot
once, and each call adds only the tokens appended to its output since the last call. They
change only the logits of tokens seen in the prompt or output, so they are applied at
those entries alone, found with one nonzero over the rows' [P, V] bool masks.

Randomness. Every filter is a threshold: top_k, top_p (ties at the cut all stay) and min_p
each keep the tokens whose scaled logit z is at least some floor, so a row keeps
{t : z_t >= floor}. The row draws by inverting the CDF of its kept weights exp(z_t), taken
in token-id order, at one uniform u in (0, 1). u is output number `step` of SplitMix64
(Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014)
keyed by the row's seed, where step counts the tokens the sequence has generated: a pure
function of (seed, step), computed for the whole batch with int64 tensor ops. A seeded
row's token therefore depends on its logits, its seed and its own step only, never on its
batch companions, their order, or whether the batch's filters went through the candidate
or the full sort. Unseeded rows take a key from os.urandom.

Why not per-row generators (what the reference does): one generator per row costs a
kernel launch and a V-wide draw per row each step, and the CPU's Mersenne twister alone
takes ~0.35 ms per 129,280-token row. Why one uniform per row rather than per-token noise
keyed by token id (an exponential or Gumbel race): hashing V counters takes some twenty
elementwise passes over [N, V]; the inverse CDF takes one block sum. Block sums are fp32
over 1,024 weights and the sum inside the chosen block float64, so a token's chance is off
by about 1e-7 of its block's mass. Host syncs: the nonzero of penalties, a top_p nucleus
wider than the candidates, and reading the tokens back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams

# Legend: N = rows in the step, R = rows that draw (temperature > 0), P = penalized rows,
# V = vocabulary, W = candidates for top_k/top_p, S = slots of the token-count table.

CANDIDATES = 1024

_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


# SplitMix64's increment (the golden ratio) and its finalizer's multipliers, as int64.
GAMMA, MIX1, MIX2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 bits (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """keys [R] int64, steps [R] int64 -> [R] float64 in (0, 1): output number `step` of
    the SplitMix64 stream keyed by `key`, its top 53 bits centred in their interval."""
    bits = mix64(keys + (steps + 1) * GAMMA)
    return (_shr(bits, 11).double() + 0.5) * 2.0 ** -53


def mix64_int(z: int) -> int:
    """mix64 on a Python int in [0, 2**64): the host twin that tests hold the tensor one to."""
    z = ((z ^ (z >> 30)) * (MIX1 & _MASK64)) & _MASK64
    z = ((z ^ (z >> 27)) * (MIX2 & _MASK64)) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int | None) -> int:
    """A row's stream key (int64): its seed mixed, so nearby seeds key unrelated streams;
    64 random bits when seed is None."""
    if seed is None:
        return _int64(int.from_bytes(os.urandom(8), "little"))
    return _int64(mix64_int(seed & _MASK64))


@dataclass(eq=False)
class SamplingRow:
    """One sequence as the sampler sees it: made once per sequence, passed to every call
    that samples it (rows compare by identity). `seed` keys the row's random stream (None:
    a random key). `prompt_ids` and `output_ids` are the sequence's own lists: the sampler
    reads the prompt once and, on each call, the output tokens appended since its last."""

    params: SamplingParams
    seed: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    key: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = stream_key(self.seed)


@dataclass
class SampleOutput:
    """Per-row results in the order of the rows; every list has length N.

    logprobs[i] is the sampled token's raw logprob, top_ids[i]/top_logprobs[i] the k =
    params.logprobs highest raw logprobs in descending order (empty for k = 0); all three
    hold None for rows whose params.logprobs is None.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_ids: list[list[int] | None]
    top_logprobs: list[list[float] | None]


class TokenCounts:
    """Token statistics of penalized sequences on the logits' device: `output` [S, V] fp32,
    how often each token was generated, and `seen` [S, V] bool, whether it occurs in the
    prompt or the output. One slot per sequence, reused after `release`; the table doubles
    when full and never shrinks (5 bytes per slot and token: 0.65 MB a slot at V = 129,280)."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.output = torch.zeros(0, vocab, device=device)
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.free: list[int] = []

    def acquire(self, prompt_ids: list[int]) -> int:
        """A cleared slot holding `prompt_ids` (one scatter, once per sequence)."""
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.output[slot].zero_()
        self.seen[slot].zero_()
        if prompt_ids:
            self.seen[slot, torch.tensor(prompt_ids, device=self.device)] = True
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def add(self, slots: list[int], tokens: list[int]) -> None:
        """Counts tokens[i] once more in slots[i] (one scatter for the batch)."""
        index = (torch.tensor(slots, device=self.device), torch.tensor(tokens, device=self.device))
        self.output.index_put_(index, torch.ones(len(tokens), device=self.device), accumulate=True)
        self.seen.index_put_(index, torch.ones(len(tokens), dtype=torch.bool, device=self.device))

    def seen_pairs(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """slots [P] int64 -> (which [M], tokens [M], counts [M] fp32): every (index into
        slots, token) seen in that slot's prompt or output, with the token's output count.
        Penalties touch these M entries only: one pass over [P, V] bool and a host sync."""
        rows, tokens = self.seen.index_select(0, slots).nonzero(as_tuple=True)
        return rows, tokens, self.output[slots[rows], tokens]

    def _grow(self) -> None:
        size = self.output.shape[0]
        extra = max(size, 4)
        self.output = torch.cat([self.output, self.output.new_zeros(extra, self.vocab)])
        self.seen = torch.cat([self.seen, self.seen.new_zeros(extra, self.vocab)])
        self.free.extend(range(size + extra - 1, size - 1, -1))


@dataclass
class _RowState:
    """What the sampler keeps for a row with logit_bias or penalties, from its first call
    to `release`."""

    bias: tuple[torch.Tensor, torch.Tensor] | None  # token ids [B] int64, values [B] fp32
    slot: int | None  # its TokenCounts slot when penalized
    counted: int = 0  # output tokens already added to the slot


class Sampler:
    """Draws one token per row from logits [N, V] on their device.

    Holds per-row state (bias tensors, a token-count slot) for rows with logit_bias or
    penalties, from the first call that sees them until `release(row)`; the engine
    releases a sequence's row when its request ends. Not thread-safe: the step loop owns it.
    """

    def __init__(self) -> None:
        self.counts: TokenCounts | None = None
        self.states: dict[SamplingRow, _RowState] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        """logits [N, V] fp32, not modified; rows[i] describes row i."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        processed = self.adjust(logits, rows)
        drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
        if len(drawn) == len(rows) and rows:
            tokens = _draw(processed, rows, owned=processed is not logits)
        else:
            tokens = processed.argmax(dim=-1)  # [N]; the answer for greedy rows
            if drawn:
                idx = torch.tensor(drawn, device=logits.device)
                tokens[idx] = _draw(processed.index_select(0, idx), [rows[i] for i in drawn], owned=True)
        return with_logprobs(logits, rows, tokens)

    def adjust(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits [N, V] -> [N, V] after each row's logit_bias and penalties: a new tensor,
        or `logits` itself when no row has either. Brings the rows' token counts up to
        their output_ids first."""
        biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
        penalized = [i for i, row in enumerate(rows) if row.params.penalized]
        if not biased and not penalized:
            return logits
        states = {i: self._state(rows[i], logits) for i in biased + penalized}
        x = logits
        if biased:
            x = self._add_bias(x, [states[i].bias for i in biased], biased)
        if penalized:
            self._count_outputs([rows[i] for i in penalized], [states[i] for i in penalized])
            slots = torch.tensor([states[i].slot for i in penalized], device=logits.device)
            x = apply_penalties(x.clone() if x is logits else x, penalized, [rows[i].params for i in penalized],
                                *self.counts.seen_pairs(slots))
        return x

    def release(self, row: SamplingRow) -> None:
        """Forgets row's state and frees its token-count slot; a no-op for unknown rows."""
        state = self.states.pop(row, None)
        if state is not None and state.slot is not None:
            self.counts.release(state.slot)

    def _state(self, row: SamplingRow, logits: torch.Tensor) -> _RowState:
        state = self.states.get(row)
        if state is None:
            state = self.states[row] = self._register(row, logits.shape[1], logits.device)
        return state

    def _register(self, row: SamplingRow, vocab: int, device: torch.device) -> _RowState:
        p, bias, slot = row.params, None, None
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            if not all(0 <= t < vocab for t in ids):
                raise InvalidRequest("logit_bias", f"token ids must be in [0, {vocab})")
            bias = (torch.tensor(ids, device=device), torch.tensor(values, dtype=torch.float32, device=device))
        if p.penalized:
            if self.counts is None:
                self.counts = TokenCounts(vocab, device)
            elif (self.counts.vocab, self.counts.device) != (vocab, device):
                raise ValueError(f"logits of {vocab} tokens on {device}; this sampler counts "
                                 f"{self.counts.vocab} tokens on {self.counts.device}")
            slot = self.counts.acquire(row.prompt_ids)
        return _RowState(bias, slot)

    @staticmethod
    def _add_bias(logits: torch.Tensor, bias: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int]) -> torch.Tensor:
        """A copy of logits [N, V] with bias[j] added to row rows[j]."""
        lengths = [len(ids) for ids, _ in bias]
        row_idx = torch.repeat_interleave(torch.tensor(rows, device=logits.device),
                                          torch.tensor(lengths, device=logits.device), output_size=sum(lengths))
        index = (row_idx, torch.cat([ids for ids, _ in bias]))
        return logits.index_put(index, torch.cat([values for _, values in bias]), accumulate=True)

    def _count_outputs(self, rows: list[SamplingRow], states: list[_RowState]) -> None:
        """Adds each row's output tokens appended since the last call to its slot."""
        slots, tokens = [], []
        for row, state in zip(rows, states):
            if len(row.output_ids) < state.counted:
                raise ValueError(f"a row's output_ids shrank from {state.counted} to {len(row.output_ids)} "
                                 "tokens; they may only grow (release the row to start over)")
            new = row.output_ids[state.counted:]
            slots += [state.slot] * len(new)
            tokens += new
            state.counted += len(new)
        if tokens:
            self.counts.add(slots, tokens)


def apply_penalties(logits: torch.Tensor, positions: list[int], params: list[SamplingParams], which: torch.Tensor,
                    tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Penalizes logits [N, V] fp32 in place and returns it. Row positions[j] has params[j];
    its entries to penalize are the M pairs (positions[which[m]], tokens[m]) (which, tokens
    [M] int64), the tokens seen in its prompt or output, counts [M] fp32 their output
    counts. The repetition penalty divides positive logits and multiplies negative ones,
    then frequency * count and presence * (count > 0) are subtracted: the reference's float
    ops, which leave every other logit as it is."""
    rep, freq, pres = torch.tensor([(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
                                   dtype=torch.float32, device=logits.device)[which].unbind(1)  # [M] each
    rows = torch.tensor(positions, device=logits.device)[which]
    values = logits[rows, tokens]  # [M]
    if any(p.repetition_penalty != 1 for p in params):
        values = torch.where(values > 0, values / rep, values * rep)
    if any(p.frequency_penalty for p in params):
        values = values - freq * counts
    if any(p.presence_penalty for p in params):
        values = values - pres * (counts > 0)
    return logits.index_put_((rows, tokens), values)


class DrawParams(NamedTuple):
    """What the R drawing rows of a call ask for, as tensors on the logits' device, and
    the host's view of which filters run."""

    temperature: torch.Tensor  # [R] fp32, > 0
    top_k: torch.Tensor  # [R] int64: tokens kept, V when off
    top_p: torch.Tensor  # [R] fp32: inf when off
    min_floor: torch.Tensor  # [R] fp32: log(min_p), -inf when off
    keys: torch.Tensor  # [R] int64: each row's stream key
    steps: torch.Tensor  # [R] int64: tokens the row has generated so far
    narrow: list[int]  # rows with top_k <= CANDIDATES or top_p alone: cut from the candidates
    wide: list[int]  # rows with top_k > CANDIDATES: cut from a full sort
    min_p: bool  # whether any row has min_p


def draw_params(params: list[SamplingParams], keys: list[int], steps: list[int], vocab: int,
                device: torch.device) -> DrawParams:
    """Batches the parameters of the drawing rows: O(1) host work per row, two copies."""
    width = min(CANDIDATES, vocab)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1 else math.inf for p in params]
    floats = torch.tensor([(p.temperature, tp, math.log(p.min_p) if p.min_p > 0 else -math.inf)
                           for p, tp in zip(params, top_p)], dtype=torch.float32, device=device).view(-1, 3)
    ints = torch.tensor(list(zip(top_k, keys, steps)), dtype=torch.int64, device=device).view(-1, 3)
    cut = [j for j, (k, tp) in enumerate(zip(top_k, top_p)) if k < vocab or tp < math.inf]
    return DrawParams(floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], ints[:, 1], ints[:, 2],
                      [j for j in cut if not width < top_k[j] < vocab], [j for j in cut if width < top_k[j] < vocab],
                      any(p.min_p > 0 for p in params))


def _draw(logits: torch.Tensor, rows: list[SamplingRow], owned: bool = False) -> torch.Tensor:
    """logits [R, V] of rows with temperature > 0 -> sampled token ids [R] int64; `owned`
    logits may be overwritten."""
    dp = draw_params([row.params for row in rows], [row.key for row in rows], [len(row.output_ids) for row in rows],
                     logits.shape[1], logits.device)
    return inverse_cdf(kept_weights(logits, dp, owned), uniforms(dp.keys, dp.steps))


def kept_weights(logits: torch.Tensor, dp: DrawParams, owned: bool = False) -> torch.Tensor:
    """logits [R, V] (after bias and penalties; overwritten when `owned`) -> weights [R, V]
    fp32: exp of the logits scaled by temperature (1 at the max), 0 below each row's floor.
    Not normalized; the argmax always keeps its weight."""
    # Subtracting the row max first keeps a tiny temperature from overflowing to inf - inf.
    peak = logits.amax(dim=-1, keepdim=True)
    z = logits.sub_(peak) if owned else logits - peak
    z.div_(dp.temperature[:, None])
    if not (dp.narrow or dp.wide or dp.min_p):
        return z.exp_()
    weights = z.exp()
    return weights.masked_fill_(z < floors(z, weights, dp)[:, None], 0.0)


BLOCK = 1024  # tokens per block of the two-level inverse CDF


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [R, V] fp32 (>= 0, some > 0), u [R] float64 in (0, 1) -> [R] int64: the first
    token, in id order, whose cumulative weight reaches u times the row's total. A token of
    weight 0 is never chosen. Two levels, so that no [R, V] cumulative sum (a serial scan)
    is made: block sums choose the block, a float64 cumulative sum inside it the token."""
    rows, vocab = weights.shape
    whole = vocab - vocab % BLOCK
    sums = weights[:, :whole].view(rows, -1, BLOCK).sum(-1)  # [R, B]
    if whole < vocab:
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True)], dim=1)
    cdf = sums.cumsum(dim=-1, dtype=torch.float64)  # [R, B]
    target = u[:, None] * cdf[:, -1:]  # [R, 1], in (0, total]
    block = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[1] - 1)  # [R, 1]: first to reach it
    rest = target - torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # > 0
    ids = block * BLOCK + torch.arange(BLOCK, device=weights.device)  # [R, BLOCK]
    inside = weights.gather(1, ids.clamp(max=vocab - 1)).masked_fill_(ids >= vocab, 0.0)
    local = inside.cumsum(dim=-1, dtype=torch.float64)
    # The block's float64 total may round below its fp32 sum: then its last kept token.
    pos = torch.searchsorted(local, torch.minimum(rest, local[:, -1:]))
    return (block * BLOCK + pos).squeeze(1)


def floors(z: torch.Tensor, weights: torch.Tensor, dp: DrawParams) -> torch.Tensor:
    """z [R, V] (scaled logits, max 0), weights [R, V] = exp(z) -> [R] fp32: the smallest z
    each row keeps under top_k, top_p and min_p (-inf when it keeps all)."""
    floor = dp.min_floor
    for rows, width in ((dp.narrow, min(CANDIDATES, z.shape[1])), (dp.wide, z.shape[1])):
        if rows:
            idx = torch.tensor(rows, device=z.device)
            part = (z, weights) if len(rows) == z.shape[0] else (z.index_select(0, idx), weights.index_select(0, idx))
            cut = _cut_floors(*part, dp.top_k[idx], dp.top_p[idx], width)
            floor = floor.index_copy(0, idx, torch.maximum(floor[idx], cut))
    return floor


def _cut_floors(z: torch.Tensor, weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                width: int) -> torch.Tensor:
    """z [r, V], weights [r, V] = exp(z), top_k [r] (<= width or V), top_p [r] -> [r]: the
    smallest z kept by top_k and then top_p (renormalized over the top_k survivors), from
    the row's `width` largest; rows whose nucleus may run past them are cut again from a
    full sort (a host sync)."""
    vocab = z.shape[1]
    # A partial sort of the top CANDIDATES is ~10x cheaper than a full one at V = 129280
    # and holds the nucleus of a peaked distribution.
    ordered = z.topk(width, dim=-1).values if width < vocab else z.sort(dim=-1, descending=True).values
    in_k = torch.arange(width, device=z.device) < top_k[:, None]  # [r, W]
    norm = ordered.masked_fill(~in_k, -math.inf).logsumexp(-1)
    if width < vocab:
        norm = torch.where(top_k <= width, norm, weights.sum(-1).log())  # rows without top_k: the whole row
    probs = (ordered - norm[:, None]).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 at rank 0, so the argmax stays
    kept = (in_k & (mass_before < top_p[:, None])).sum(dim=-1)  # [r], >= 1
    cut = ordered.gather(1, (kept - 1)[:, None]).squeeze(1)
    if width < vocab:
        short = ((kept == width) & (top_k > width)).nonzero().squeeze(1)
        if short.numel():
            cut[short] = _cut_floors(z[short], weights[short], top_k[short], top_p[short], vocab)
    return cut


def with_logprobs(raw: torch.Tensor, rows: list, tokens: torch.Tensor) -> SampleOutput:
    """raw logits [N, V], tokens [N] int64 -> the SampleOutput, with the logprob fields
    filled from the raw logits for the rows whose params ask for them."""
    n = len(rows)
    out = SampleOutput(tokens.tolist(), [None] * n, [None] * n, [None] * n)
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not asked:
        return out
    idx = torch.tensor(asked, device=raw.device)
    logprobs = raw[idx].float().log_softmax(dim=-1)  # [A, V]
    chosen = logprobs.gather(1, tokens[idx, None]).squeeze(1).tolist()
    k_max = max(rows[i].params.logprobs for i in asked)
    top_vals, top_ids = (t.tolist() for t in logprobs.topk(k_max, dim=-1))
    for j, i in enumerate(asked):
        k = rows[i].params.logprobs
        out.logprobs[i], out.top_ids[i], out.top_logprobs[i] = chosen[j], top_ids[j][:k], top_vals[j][:k]
    return out
