"""The device sampler (`engine.sampler`) against today's per-row sampler
(`engine.sampler_reference`) and a per-row reference written here with plain loops:
bias and penalties equal to the bit, the same supports and probabilities, the same laws of
draws (chi-square), exact greedy, seeded rows that ignore their batch companions, token
counts kept on the device, and raw logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

import engine.sampler as sampler_module
import engine.sampler_reference as ref
from engine.errors import InvalidRequest
from engine.sampler import (GAMMA, SampleOutput, Sampler, SamplingRow, draw_params, kept_weights, mix64, mix64_int,
                            uniforms)
from engine.sampling_params import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Each distribution test rejects a correct sampler with probability ALPHA. Seeds are fixed,
# so a run repeats; 20,000 draws per sampler detect a 1.5-point shift of one probability.
ALPHA, DRAWS = 1e-3, 20_000


def row(params: SamplingParams, seed: int | None = 0, prompt: Sequence[int] = (),
        output: Sequence[int] = ()) -> SamplingRow:
    return SamplingRow(params, seed, list(prompt), list(output))


def twin(r: SamplingRow, seed: int = 0) -> ref.SamplingRow:
    """The reference sampler's row for r, sharing r's lists."""
    return ref.SamplingRow(r.params, None if r.params.greedy else ref.make_generator(seed), r.prompt_ids, r.output_ids)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def reference_adjusted(logits: torch.Tensor, rows: list[ref.SamplingRow]) -> torch.Tensor:
    return ref.apply_penalties(ref.apply_logit_bias(logits, rows), rows)


# ---- the per-row reference: one row at a time, loops over tokens, float64 ----

def loop_logits(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    x, p = logits.double().clone(), r.params
    for tok, bias in p.logit_bias:
        x[tok] += bias
    for tok in set(r.prompt_ids) | set(r.output_ids):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(r.output_ids):
        x[tok] -= p.frequency_penalty * r.output_ids.count(tok) + p.presence_penalty
    return x


def renormalized(x: torch.Tensor, keep: set[int]) -> list[float]:
    total = sum(math.exp(x[i]) for i in keep)
    return [math.exp(x[i]) / total if i in keep else 0.0 for i in range(len(x))]


def loop_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = (x - x.max()) / p.temperature
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:p.top_k] if p.top_k > 0 else order)
    if p.top_p < 1:
        probs, kept, mass = renormalized(x, keep), set(), 0.0
        for i in (i for i in order if i in keep):
            kept.add(i)
            mass += probs[i]
            if mass >= p.top_p:
                break
        keep = kept
    probs = renormalized(x, keep)
    keep = {i for i in keep if probs[i] >= p.min_p * max(probs)}
    return torch.tensor(renormalized(x, keep), dtype=torch.float64)


def probs_of(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The device sampler's distribution: its kept weights, normalized."""
    dp = draw_params(params, [0] * len(params), [0] * len(params), logits.shape[1], logits.device)
    weights = kept_weights(logits, dp).double()
    return weights / weights.sum(-1, keepdim=True)


CONFIGS = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(temperature=1.0, top_k=5),
    "top_p": SamplingParams(temperature=0.9, top_p=0.8),
    "min_p": SamplingParams(temperature=1.2, min_p=0.1),
    "all_filters": SamplingParams(temperature=1.3, top_k=10, top_p=0.9, min_p=0.05),
    "penalties_and_bias": SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5,
                                         presence_penalty=0.7, logit_bias=((3, 2.0), (7, -1.5))),
    "greedy_penalized": greedy(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=0.3),
}
PROMPT, OUTPUT = [1, 2, 3, 5, 8, 13], [2, 2, 4, 4, 4, 9]


# 8 candidates send wide nuclei through the full sort; 1024 covers all of V = 64.
@pytest.mark.parametrize("candidates", [8, 1024])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adjusted_logits_and_probs_match_both_references(name, candidates, monkeypatch):
    monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
    monkeypatch.setattr(ref, "CANDIDATES", candidates)
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    rows = [row(CONFIGS[name], seed=i, prompt=PROMPT, output=OUTPUT[:2 * i]) for i in range(4)]
    adjusted = Sampler().adjust(logits, rows)
    assert torch.equal(adjusted, reference_adjusted(logits, [twin(r) for r in rows]))
    for i, r in enumerate(rows):
        torch.testing.assert_close(adjusted[i].double(), loop_logits(logits[i], r), atol=1e-5, rtol=1e-6)
    if not CONFIGS[name].greedy:
        probs = probs_of(adjusted, [r.params for r in rows])
        assert torch.equal(probs > 0, ref.sampling_probs(adjusted, [r.params for r in rows]) > 0)
        for i, r in enumerate(rows):
            expected = loop_probs(loop_logits(logits[i], r), r.params)
            assert torch.equal(probs[i] > 0, expected > 0)
            torch.testing.assert_close(probs[i], expected, atol=1e-6, rtol=1e-5)


def test_bias_and_penalties_equal_the_reference_exactly_while_outputs_grow_and_rows_come_and_go():
    torch.manual_seed(1)
    sampler, vocab = Sampler(), 300
    prompt = torch.randint(0, vocab, (40,)).tolist()
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(frequency_penalty=0.9, top_p=0.9),
              greedy(presence_penalty=-1.1, logit_bias=((5, 3.0), (9, -2.0))), SamplingParams(),
              SamplingParams(temperature=1.5, repetition_penalty=0.7, frequency_penalty=-0.5, presence_penalty=0.4,
                             logit_bias=((5, 1.0),))]
    rows = [row(p, seed=i, prompt=prompt[:10 * i]) for i, p in enumerate(params)]
    for step in range(16):
        if step == 6:  # a request ends: its slot is reused by one that arrives
            sampler.release(rows.pop(0))
            rows.append(row(params[0], seed=9, prompt=prompt, output=prompt[:5]))
        logits = torch.randn(len(rows), vocab) * 4
        expected = reference_adjusted(logits, [twin(r) for r in rows])
        assert torch.equal(sampler.adjust(logits, rows), expected), f"step {step}"
        tokens = sampler(logits, rows).token_ids
        for r, t in zip(rows, tokens):
            r.output_ids.append(t if step % 3 else prompt[step])  # often a prompt token again
    assert sampler.counts.output.shape[0] == 4 and not sampler.counts.free  # five rows, four at a time


def test_greedy_rows_take_the_exact_argmax_of_the_reference_logits_in_a_mixed_batch():
    torch.manual_seed(2)
    params = [greedy(), greedy(repetition_penalty=1.5, logit_bias=((4, 0.5),)), SamplingParams(top_p=0.5),
              greedy(frequency_penalty=1.0, presence_penalty=0.5), SamplingParams(min_p=0.3)]
    rows = [row(p, seed=i, prompt=PROMPT, output=OUTPUT) for i, p in enumerate(params)]
    for _ in range(20):
        logits = torch.randn(len(rows), 50) * 2
        expected = reference_adjusted(logits, [twin(r) for r in rows]).argmax(-1)
        tokens = Sampler()(logits, rows).token_ids
        assert [tokens[i] for i in (0, 1, 3)] == expected[[0, 1, 3]].tolist()


# ---- laws of the draws against the reference sampler ----

LAW_LOGITS = torch.tensor([0.4, 2.0, -0.8, 1.5, -3.0, 1.1, 0.0, 1.6, -1.2, 0.7, -2.0, -0.3])  # not sorted by id
LAWS = {
    "temperature": SamplingParams(temperature=0.7),
    "top_p": SamplingParams(temperature=1.0, top_p=0.8),
    "min_p": SamplingParams(temperature=1.3, min_p=0.15),
    "top_k_top_p_min_p": SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
}


def chi_square_p(table: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test that the rows of a contingency table [samples,
    tokens] of counts come from one distribution."""
    table = table.double()[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def goodness_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the chi-square test that counts [V] were drawn from probs [V] (tokens
    of probability 0 must not occur)."""
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    kept = probs > 0
    expected, observed = probs[kept].double() * counts.sum(), counts[kept].double()
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((int(kept.sum()) - 1) / 2.0, dtype=torch.float64), stat / 2))


def histogram(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=len(LAW_LOGITS))


@pytest.mark.parametrize("name", sorted(LAWS))
def test_draws_over_seeds_follow_the_reference_samplers_law(name):
    params = LAWS[name]
    logits = LAW_LOGITS.repeat(DRAWS, 1)
    ours = histogram(Sampler()(logits, [row(params, seed=i) for i in range(DRAWS)]).token_ids)
    shared = ref.make_generator(7)  # one generator serves all rows: each draws its own noise
    theirs = histogram(ref.Sampler()(logits, [ref.SamplingRow(params, shared, [], [])] * DRAWS).token_ids)
    probs = ref.sampling_probs(LAW_LOGITS[None], [params])[0]
    assert chi_square_p(torch.stack([ours, theirs])) > ALPHA
    assert goodness_p(ours, probs) > ALPHA


@pytest.mark.parametrize("name", ["temperature", "top_k_top_p_min_p"])
def test_one_seeded_rows_draws_over_steps_follow_the_law_and_are_serially_independent(name):
    params, me = LAWS[name], row(LAWS[name], seed=2024)
    sampler, logits = Sampler(), LAW_LOGITS[None]
    for _ in range(4000):
        me.output_ids.append(sampler(logits, [me]).token_ids[0])
    tokens = torch.tensor(me.output_ids)
    assert goodness_p(histogram(me.output_ids), ref.sampling_probs(logits, [params])[0]) > ALPHA
    # Consecutive pairs: the next token's law must not depend on the previous token.
    pairs = torch.zeros(len(LAW_LOGITS), len(LAW_LOGITS), dtype=torch.long)
    pairs.index_put_((tokens[:-1], tokens[1:]), torch.ones(len(tokens) - 1, dtype=torch.long), accumulate=True)
    common = pairs.sum(1) >= 300
    assert chi_square_p(pairs[common]) > ALPHA


@pytest.mark.parametrize("block", [7, 1024])
def test_inverse_cdf_picks_the_first_token_whose_cumulative_weight_reaches_u(block, monkeypatch):
    monkeypatch.setattr(sampler_module, "BLOCK", block)
    gen = torch.Generator().manual_seed(14)
    weights = torch.rand(300, 50, generator=gen) * (torch.rand(300, 50, generator=gen) < 0.3)  # most tokens cut
    weights[:, 20] += 0.01  # one kept token at least
    u = torch.rand(300, generator=gen, dtype=torch.float64)
    u[:4] = torch.tensor([2.0 ** -53, 1 - 2.0 ** -53, 0.5, 1e-9])
    cdf = weights.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(1)
    tokens = sampler_module.inverse_cdf(weights, u)
    assert torch.equal(tokens, expected)
    assert (weights.gather(1, tokens[:, None]) > 0).all()


def test_uniforms_are_splitmix64_and_uniform_over_steps_and_keys():
    keys = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 12345]
    steps = [0, 1, 5, 1000, 2 ** 40, 7]
    expected = [((mix64_int((k + (s + 1) * GAMMA) % 2 ** 64) >> 11) + 0.5) * 2.0 ** -53 for k, s in zip(keys, steps)]
    assert uniforms(torch.tensor(keys), torch.tensor(steps)).tolist() == expected
    assert mix64(torch.tensor([GAMMA])).item() % 2 ** 64 == mix64_int(GAMMA % 2 ** 64)
    u = uniforms(torch.arange(64).repeat_interleave(2000), torch.arange(2000).repeat(64))
    assert 0 < u.min() and u.max() < 1
    assert chi_square_p(torch.stack([torch.histc(u.float(), 50, 0, 1), torch.full((50,), len(u) / 50)])) > ALPHA


# ---- seeds ----

def test_seeded_row_draws_the_same_tokens_alone_in_any_batch_and_at_any_position(monkeypatch):
    torch.manual_seed(8)
    target = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, frequency_penalty=0.2)
    steps = [torch.randn(200) * 2 for _ in range(20)]
    others = [greedy(), SamplingParams(), SamplingParams(top_k=3, seed=9), SamplingParams(min_p=0.2),
              SamplingParams(temperature=1.5, presence_penalty=1.0), greedy(logprobs=3), SamplingParams(top_p=0.5),
              SamplingParams(top_k=150), SamplingParams(top_p=0.999)]  # wider than the candidates below

    def draw(position: int | None, candidates: int) -> list[int]:
        monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
        sampler, me = Sampler(), row(target, seed=target.seed, prompt=[1, 2])
        companions = [row(p, seed=None, output=[3, 4]) for p in others] if position is not None else []
        for logits in steps:
            batch = companions[:position] + [me] + companions[position:]
            stacked = torch.randn(len(batch), 200) * 3
            stacked[batch.index(me)] = logits
            me.output_ids.append(sampler(stacked, batch).token_ids[batch.index(me)])
        return me.output_ids

    alone = draw(None, 1024)
    assert len(set(alone)) > 1
    assert all(draw(pos, cands) == alone for pos in (0, 5, 9) for cands in (1024, 100, 8))


def test_choices_and_requests_draw_from_their_own_seeds():
    logits = torch.randn(1, 1000)

    def tokens(seed: int | None) -> list[int]:
        sampler, me = Sampler(), row(SamplingParams(), seed=seed)
        for _ in range(10):
            me.output_ids.append(sampler(logits, [me]).token_ids[0])
        return me.output_ids

    assert tokens(5) == tokens(5)
    assert len({tuple(tokens(s)) for s in (5, 6, None, None)}) == 4


# ---- greedy, bias and penalties on handcrafted logits ----

def test_all_greedy_batch_returns_the_argmax_and_no_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(8, 100)
    out = Sampler()(logits, [row(greedy()) for _ in range(8)])
    assert out == SampleOutput(logits.argmax(-1).tolist(), [None] * 8, [None] * 8, [None] * 8)


def test_all_greedy_batch_without_extras_runs_no_transform(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a transform ran on the all-greedy fast path")
    for name in ("apply_penalties", "kept_weights", "inverse_cdf", "uniforms", "TokenCounts"):
        monkeypatch.setattr(sampler_module, name, forbidden)
    logits = torch.randn(4, 50)
    assert Sampler()(logits, [row(greedy(), output=[1, 2]) for _ in range(4)]).token_ids == logits.argmax(-1).tolist()


def test_logit_bias_forces_a_token_on_a_greedy_row_only():
    logits = torch.tensor([[5.0, 1.0, 0.0, -2.0]] * 2)
    rows = [row(greedy(logit_bias=((3, 100.0),))), row(greedy())]
    assert Sampler()(logits, rows).token_ids == [3, 0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.5, -3.0], [-1.0, -1.1, -5.0, -6.0], [2.0, 1.9, 0.5, -3.0]])
    rows = [row(greedy(repetition_penalty=1.2), prompt=[0]),   # 2.0 / 1.2 < 1.9
            row(greedy(repetition_penalty=1.2), output=[0]),   # -1.0 * 1.2 < -1.1
            row(greedy(repetition_penalty=1.2), prompt=[2])]   # the leader was not seen
    assert Sampler()(logits, rows).token_ids == [1, 1, 0]


def test_frequency_penalty_scales_with_the_count_of_generated_tokens():
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 3)
    rows = [row(greedy(frequency_penalty=0.6), output=[0]),       # 3 - 0.6 > 2
            row(greedy(frequency_penalty=0.6), output=[0, 0]),    # 3 - 1.2 < 2
            row(greedy(frequency_penalty=0.6), prompt=[0, 0, 0])]  # prompt tokens do not count
    assert Sampler()(logits, rows).token_ids == [0, 1, 0]


def test_presence_penalty_applies_once_per_generated_token():
    logits = torch.tensor([[3.0, 2.5, 1.5]] * 3)
    rows = [row(greedy(presence_penalty=0.6), output=[0]),         # 3 - 0.6 < 2.5
            row(greedy(presence_penalty=0.4), output=[0, 0, 0]),   # 3 - 0.4 > 2.5, whatever the count
            row(greedy(presence_penalty=-2.0), output=[2])]        # 1.5 + 2 > 3: a negative one favours it
    assert Sampler()(logits, rows).token_ids == [1, 0, 2]


# ---- token counts on the device ----

class Untouchable(list):
    """A prompt the sampler must not read again: what it needs is on the device."""

    def _refuse(self, *args):
        raise AssertionError("the prompt was read again")

    __iter__ = __getitem__ = __len__ = __bool__ = _refuse


class Counted(list):
    """An output list that counts the elements the sampler reads from it."""

    read = 0

    def __getitem__(self, item):
        got = super().__getitem__(item)
        self.read += len(got) if isinstance(item, slice) else 1
        return got


def test_penalties_read_the_prompt_once_and_only_new_output_tokens():
    prompt = list(range(0, 2000, 3))
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4)
    me = SamplingRow(params, 1, list(prompt), Counted([7, 7]))
    plain = ref.SamplingRow(params, ref.make_generator(1), prompt, [7, 7])
    sampler = Sampler()
    for step in range(6):
        logits = torch.randn(1, 2048)
        assert torch.equal(sampler.adjust(logits, [me]), reference_adjusted(logits, [plain]))
        token = sampler(logits, [me]).token_ids[0]
        me.output_ids.append(token)
        plain.output_ids.append(token)
        me.prompt_ids = Untouchable()
    assert me.output_ids.read == len(me.output_ids) - 1  # each token once; the last was never sampled from


def test_a_shrinking_output_list_is_refused_and_a_released_row_counts_afresh():
    sampler, logits = Sampler(), torch.zeros(1, 10)
    me = row(greedy(frequency_penalty=1.0), output=[3, 3, 3])
    assert sampler.adjust(logits, [me])[0, 3] == -3.0
    me.output_ids = [4]
    with pytest.raises(ValueError, match="output_ids shrank from 3 to 1 tokens; they may only grow"):
        sampler.adjust(logits, [me])
    sampler.release(me)
    adjusted = sampler.adjust(logits, [me])[0]
    assert adjusted[3] == 0.0 and adjusted[4] == -1.0


def test_released_slots_are_reused_and_cleared():
    sampler, logits = Sampler(), torch.zeros(1, 10)
    first = row(greedy(presence_penalty=1.0), prompt=[1], output=[2])
    sampler.adjust(logits, [first])
    sampler.release(first)
    sampler.release(first)  # a second release is a no-op
    second = row(greedy(presence_penalty=1.0))
    assert torch.equal(sampler.adjust(logits, [second]), logits)
    assert sampler.counts.output.shape[0] == 4 and len(sampler.counts.free) == 3


# ---- filters ----

def test_top_k_1_equals_greedy_whatever_the_seed():
    torch.manual_seed(3)
    logits = torch.randn(4, 100)
    for seed in range(20):
        rows = [row(SamplingParams(temperature=1.5, top_k=1), seed=seed + 100 * i) for i in range(4)]
        assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(4)
    logits = torch.randn(4, 100)
    for seed in range(20):
        rows = [row(SamplingParams(temperature=1.0, top_p=1e-6), seed=seed + 100 * i) for i in range(4)]
        assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_min_p_samples_only_tokens_above_the_threshold():
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.07])  # min_p 0.5: keep prob >= 0.15
    drawn = {Sampler()(probs.log()[None], [row(SamplingParams(min_p=0.5), seed=s)]).token_ids[0] for s in range(200)}
    assert drawn == {0, 1, 2}


def test_filters_wider_than_the_candidates_match_per_row_reference():
    torch.manual_seed(11)
    logits = torch.randn(4, 4096) * 0.1  # nearly flat: nuclei of thousands of tokens
    params = [SamplingParams(top_k=1500), SamplingParams(top_p=0.5), SamplingParams(top_k=2000, top_p=0.7),
              SamplingParams(top_k=20, top_p=0.5)]
    probs = probs_of(logits, params)
    assert (probs[0] > 0).sum() == 1500
    for i, p in enumerate(params):
        expected = loop_probs(logits[i].double(), p)
        assert torch.equal(probs[i] > 0, expected > 0)
        torch.testing.assert_close(probs[i], expected, atol=1e-7, rtol=1e-4)


def test_only_rows_whose_cut_lies_past_the_candidates_are_sorted_in_full(monkeypatch):
    widths = []
    cut_floors = sampler_module._cut_floors
    monkeypatch.setattr(sampler_module, "_cut_floors", lambda z, *args: (widths.append((len(z), args[-1])),
                                                                       cut_floors(z, *args))[1])
    logits = torch.randn(5, 4096)
    logits[:4] *= 8  # peaked: nuclei of a few tokens; row 4 is flat
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=50), SamplingParams(top_k=1500),
              SamplingParams(top_k=2000, top_p=0.5), SamplingParams(top_p=0.9)]
    probs_of(logits, params)
    assert widths == [(3, 1024), (1, 4096), (2, 4096)]  # rows 0, 1, 4 on the candidates, then 4; rows 2, 3


def test_ties_at_the_cut_all_stay():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    probs = probs_of(logits, [SamplingParams(top_k=2)])[0]
    assert (probs > 0).tolist() == [True, True, True, True, False, True]


def test_extreme_filters_and_tiny_temperatures_still_return_the_argmax():
    logits = torch.full((3, 50), -math.inf)
    logits[:, 7], logits[:, 9] = 4.0, 3.0
    params = [SamplingParams(temperature=1e-40, top_k=1, top_p=1e-6, min_p=1.0),
              SamplingParams(temperature=1e-30), SamplingParams(temperature=2.0, min_p=1.0)]
    assert Sampler()(logits, [row(p, seed=i) for i, p in enumerate(params)]).token_ids == [7, 7, 7]


def test_temperature_0_01_behaves_like_greedy_on_well_separated_logits():
    torch.manual_seed(6)
    logits = torch.randperm(64).float()[None].repeat(4, 1)  # neighbours 1 apart
    for seed in range(20):
        rows = [row(SamplingParams(temperature=0.01), seed=seed + 100 * i) for i in range(4)]
        assert Sampler()(logits, rows).token_ids == [int(logits[0].argmax())] * 4


# ---- logprobs ----

def test_logprobs_come_from_the_raw_logits_before_bias_penalties_and_temperature():
    torch.manual_seed(9)
    logits = torch.randn(2, 40)
    params = SamplingParams(temperature=0.5, top_k=3, logit_bias=((11, 100.0),), presence_penalty=2.0, logprobs=5)
    out = Sampler()(logits, [row(params, seed=1, output=[0]), row(greedy(logprobs=2), output=[0])])
    raw = logits.log_softmax(-1)
    assert out.token_ids[0] == 11
    assert out.logprobs == [raw[0, 11].item(), raw[1, out.token_ids[1]].item()]
    top = raw.topk(5)
    assert out.top_ids == [top.indices[0].tolist(), top.indices[1, :2].tolist()]
    assert out.top_logprobs == [top.values[0].tolist(), top.values[1, :2].tolist()]


def test_rows_without_logprobs_get_none_and_logprobs_0_gets_no_alternatives():
    torch.manual_seed(10)
    logits = torch.randn(3, 30)
    out = Sampler()(logits, [row(greedy()), row(SamplingParams(logprobs=0), seed=2), row(greedy(logprobs=1))])
    assert out.logprobs[0] is None and out.top_ids[0] is None and out.top_logprobs[0] is None
    assert out.logprobs[1] == logits[1].log_softmax(-1)[out.token_ids[1]].item()
    assert out.top_ids[1] == [] and out.top_logprobs[1] == []
    assert out.top_ids[2] == [out.token_ids[2]]


# ---- misuse ----

def test_sampler_leaves_the_callers_logits_untouched():
    logits = torch.randn(3, 20)
    before = logits.clone()
    rows = [row(SamplingParams(repetition_penalty=1.5, logit_bias=((1, 3.0),)), output=[1, 2]), row(greedy()),
            row(SamplingParams(top_p=0.5, frequency_penalty=0.3), output=[4])]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_misuse_is_reported_precisely():
    sampler = Sampler()
    with pytest.raises(ValueError, match=r"\(2, 10\) do not match 3 rows"):
        sampler(torch.randn(2, 10), [row(greedy())] * 3)
    with pytest.raises(InvalidRequest, match=r"logit_bias: token ids must be in \[0, 10\)"):
        sampler(torch.randn(1, 10), [row(greedy(logit_bias=((10, 1.0),)))])
    sampler(torch.randn(1, 10), [row(greedy(presence_penalty=1.0))])
    with pytest.raises(ValueError, match="logits of 12 tokens on cpu; this sampler counts 10 tokens"):
        sampler(torch.randn(1, 12), [row(greedy(presence_penalty=1.0))])


# ---- CUDA ----

@needs_cuda
def test_cuda_draws_and_adjusted_logits_equal_the_cpus():
    torch.manual_seed(12)
    names = sorted(CONFIGS)
    logits = torch.randn(64, 129_280) * 3
    on = {dev: [row(CONFIGS[names[i % len(names)]], seed=i, prompt=PROMPT, output=OUTPUT) for i in range(64)]
          for dev in ("cpu", "cuda")}
    samplers = {dev: Sampler() for dev in on}
    for _ in range(5):
        out = {dev: samplers[dev](logits.to(dev), on[dev]).token_ids for dev in on}
        assert out["cuda"] == out["cpu"]
        torch.testing.assert_close(samplers["cuda"].adjust(logits.cuda(), on["cuda"]).cpu(),
                                   samplers["cpu"].adjust(logits, on["cpu"]), atol=1e-6, rtol=1e-6)
        for dev in on:
            for r, t in zip(on[dev], out[dev]):
                r.output_ids.append(t)


@needs_cuda
def test_cuda_seeded_rows_ignore_their_batch_companions():
    torch.manual_seed(13)
    logits = torch.randn(256, 129_280, device="cuda") * 3
    rows = [row(SamplingParams(top_p=0.95, temperature=0.9), seed=i) for i in range(256)]
    full = Sampler()(logits, rows).token_ids
    alone = [Sampler()(logits[i:i + 1], [rows[i]]).token_ids[0] for i in range(0, 256, 17)]
    assert alone == full[::17]


# ---- through the engine ----

def test_seeded_penalized_choices_survive_preemption_and_free_their_slots(tmp_path):
    """n=2 seeded choices with penalties, beside a greedy penalized request, in a roomy
    cache pool and in one so small that sequences are preempted and recomputed: the same
    tokens, distinct choices, and every token-count slot back when the requests end."""
    from engine.core import EngineConfig, EngineCore
    from engine.loader import load_model
    from engine.request import EngineRequest
    from engine.scheduler import SchedulerConfig
    from engine.tokenizer import Tokenizer
    from helpers import make_serving_checkpoint

    path = make_serving_checkpoint(tmp_path)
    model, tokenizer = load_model(path, "float32", progress=False), Tokenizer.from_dir(path)
    # top_k keeps the random model's flat nuclei among the candidates: no full sorts
    requests = [EngineRequest("seeded", list(range(300, 320)), SamplingParams(
                    max_tokens=12, temperature=1.2, top_k=40, top_p=0.95, seed=7, n=2, ignore_eos=True,
                    frequency_penalty=0.5, repetition_penalty=1.2, logit_bias=((500, 5.0),))),
                EngineRequest("greedy", list(range(600, 615)), greedy(max_tokens=12, presence_penalty=1.5,
                                                                      ignore_eos=True)),
                EngineRequest("plain", list(range(700, 720)), SamplingParams(max_tokens=12, seed=3, ignore_eos=True))]

    def run(num_blocks: int) -> tuple[dict, int]:
        core = EngineCore(model, tokenizer, EngineConfig(max_model_len=40, num_blocks=num_blocks, block_size=4,
                                                         scheduler=SchedulerConfig(max_num_batched_tokens=40)))
        schedule, preempted = core.scheduler.schedule, []
        core.scheduler.schedule = lambda: (out := schedule(), preempted.extend(out.preempted))[0]
        for req in requests:
            core.add(req)
        tokens = {}
        while core.has_work:
            for out in core.step():
                for choice in out.choices:
                    tokens.setdefault((out.request_id, choice.index), []).extend(choice.token_ids)
        assert not core.sampler.states and len(core.sampler.counts.free) == core.sampler.counts.output.shape[0]
        return tokens, len(preempted)

    roomy, none = run(100)
    tight, some = run(16)
    assert none == 0 and some > 0
    assert tight == roomy
    assert roomy["seeded", 0] != roomy["seeded", 1] and all(len(t) == 12 for t in roomy.values())
