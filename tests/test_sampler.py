"""The batched sampler: greedy and penalties on handcrafted logits, filters and penalties
against a per-row reference written here with plain loops, batch-invariant seeded draws,
the sampling distribution, and raw logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

import engine.sampler as sampler_module
from engine.errors import InvalidRequest
from engine.sampler import (SampleOutput, Sampler, SamplingRow, apply_logit_bias, apply_penalties,
                            make_generator, sampling_probs)
from engine.sampling_params import SamplingParams

sample = Sampler()


def row(params: SamplingParams, seed: int | None = 0, prompt: Sequence[int] = (), output: Sequence[int] = ()) -> SamplingRow:
    generator = None if params.greedy else make_generator(seed)
    return SamplingRow(params, generator, list(prompt), list(output))


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


# ---- the per-row reference: one row at a time, loops over tokens, float64 ----

def reference_logits(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
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


def reference_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
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


def reference_token(logits: torch.Tensor, r: SamplingRow) -> int:
    x = reference_logits(logits, r)
    if r.params.greedy:
        return int(x.argmax())
    noise = -torch.rand(len(x), generator=r.generator).log()  # Exponential(1), as the sampler draws it
    return int((reference_probs(x, r.params) / noise.double()).argmax())


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


# 8 candidates send wide nuclei through the full-sort fallback; 1024 covers all of V = 64.
@pytest.mark.parametrize("candidates", [8, 1024])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_processed_logits_and_probs_match_per_row_reference(name, candidates, monkeypatch):
    monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    rows = [row(CONFIGS[name], seed=i, prompt=PROMPT, output=OUTPUT[:2 * i]) for i in range(4)]
    processed = apply_penalties(apply_logit_bias(logits, rows), rows)
    for i, r in enumerate(rows):
        torch.testing.assert_close(processed[i].double(), reference_logits(logits[i], r), atol=1e-5, rtol=1e-6)
    if not CONFIGS[name].greedy:
        probs = sampling_probs(processed, [r.params for r in rows])
        for i, r in enumerate(rows):
            expected = reference_probs(reference_logits(logits[i], r), r.params)
            assert torch.equal(probs[i] > 0, expected > 0)
            torch.testing.assert_close(probs[i].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("candidates", [8, 1024])
def test_mixed_batch_draws_the_tokens_of_the_per_row_reference(candidates, monkeypatch):
    monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
    torch.manual_seed(1)
    names = sorted(CONFIGS)
    rows = [row(CONFIGS[n], seed=10 + i, prompt=PROMPT, output=OUTPUT) for i, n in enumerate(names)]
    twins = [row(CONFIGS[n], seed=10 + i, prompt=PROMPT, output=OUTPUT) for i, n in enumerate(names)]
    for _ in range(30):
        logits = torch.randn(len(rows), 64) * 2
        expected = [reference_token(logits[i], twins[i]) for i in range(len(rows))]
        assert sample(logits, rows).token_ids == expected


# ---- greedy, bias and penalties on handcrafted logits ----

def test_all_greedy_batch_returns_the_argmax_and_no_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(8, 100)
    out = sample(logits, [row(greedy()) for _ in range(8)])
    assert out == SampleOutput(logits.argmax(-1).tolist(), [None] * 8, [None] * 8, [None] * 8)


def test_all_greedy_batch_without_extras_runs_no_transform(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a transform ran on the all-greedy fast path")
    for name in ("token_counts", "sampling_probs", "exponential_race"):
        monkeypatch.setattr(sampler_module, name, forbidden)
    logits = torch.randn(4, 50)
    assert sample(logits, [row(greedy(), output=[1, 2]) for _ in range(4)]).token_ids == logits.argmax(-1).tolist()


def test_logit_bias_forces_a_token_on_a_greedy_row_only():
    logits = torch.tensor([[5.0, 1.0, 0.0, -2.0]] * 2)
    rows = [row(greedy(logit_bias=((3, 100.0),))), row(greedy())]
    assert sample(logits, rows).token_ids == [3, 0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.5, -3.0], [-1.0, -1.1, -5.0, -6.0], [2.0, 1.9, 0.5, -3.0]])
    rows = [row(greedy(repetition_penalty=1.2), prompt=[0]),   # 2.0 / 1.2 < 1.9
            row(greedy(repetition_penalty=1.2), output=[0]),   # -1.0 * 1.2 < -1.1
            row(greedy(repetition_penalty=1.2), prompt=[2])]   # the leader was not seen
    assert sample(logits, rows).token_ids == [1, 1, 0]


def test_frequency_penalty_scales_with_the_count_of_generated_tokens():
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 3)
    rows = [row(greedy(frequency_penalty=0.6), output=[0]),       # 3 - 0.6 > 2
            row(greedy(frequency_penalty=0.6), output=[0, 0]),    # 3 - 1.2 < 2
            row(greedy(frequency_penalty=0.6), prompt=[0, 0, 0])]  # prompt tokens do not count
    assert sample(logits, rows).token_ids == [0, 1, 0]


def test_presence_penalty_applies_once_per_generated_token():
    logits = torch.tensor([[3.0, 2.5, 1.5]] * 3)
    rows = [row(greedy(presence_penalty=0.6), output=[0]),         # 3 - 0.6 < 2.5
            row(greedy(presence_penalty=0.4), output=[0, 0, 0]),   # 3 - 0.4 > 2.5, whatever the count
            row(greedy(presence_penalty=-2.0), output=[2])]        # 1.5 + 2 > 3: a negative one favours it
    assert sample(logits, rows).token_ids == [1, 0, 2]


# ---- filters ----

def test_top_k_1_equals_greedy_whatever_the_seed():
    torch.manual_seed(3)
    logits = torch.randn(4, 100)
    for seed in range(20):
        rows = [row(SamplingParams(temperature=1.5, top_k=1), seed=seed + 100 * i) for i in range(4)]
        assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(4)
    logits = torch.randn(4, 100)
    for seed in range(20):
        rows = [row(SamplingParams(temperature=1.0, top_p=1e-6), seed=seed + 100 * i) for i in range(4)]
        assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_min_p_samples_only_tokens_above_the_threshold():
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.07])  # min_p 0.5: keep prob >= 0.15
    r = row(SamplingParams(temperature=1.0, min_p=0.5), seed=5)
    drawn = {sample(probs.log()[None], [r]).token_ids[0] for _ in range(200)}
    assert drawn == {0, 1, 2}


def test_filters_wider_than_the_candidates_match_per_row_reference():
    torch.manual_seed(11)
    logits = torch.randn(3, 4096) * 0.1  # nearly flat: nuclei of thousands of tokens
    params = [SamplingParams(top_k=1500), SamplingParams(top_p=0.5), SamplingParams(top_k=2000, top_p=0.7)]
    probs = sampling_probs(logits, params)
    alone = sampling_probs(logits[:1], params[:1])  # here top_k is the candidate count
    assert (probs[0] > 0).sum() == (alone > 0).sum() == 1500
    for i, p in enumerate(params):
        expected = reference_probs(logits[i].double(), p)
        assert torch.equal(probs[i] > 0, expected > 0)
        torch.testing.assert_close(probs[i].double(), expected, atol=1e-7, rtol=1e-4)


def test_extreme_filters_and_tiny_temperatures_still_return_the_argmax():
    logits = torch.full((3, 50), -math.inf)
    logits[:, 7], logits[:, 9] = 4.0, 3.0
    params = [SamplingParams(temperature=1e-40, top_k=1, top_p=1e-6, min_p=1.0),
              SamplingParams(temperature=1e-30), SamplingParams(temperature=2.0, min_p=1.0)]
    out = sample(logits, [row(p, seed=i) for i, p in enumerate(params)])
    assert out.token_ids == [7, 7, 7]


def test_temperature_0_01_behaves_like_greedy_on_well_separated_logits():
    torch.manual_seed(6)
    logits = torch.randperm(64).float()[None].repeat(4, 1)  # neighbours 1 apart
    for seed in range(20):
        rows = [row(SamplingParams(temperature=0.01), seed=seed + 100 * i) for i in range(4)]
        assert sample(logits, rows).token_ids == [int(logits[0].argmax())] * 4


# ---- randomness ----

def test_temperature_1_samples_follow_the_softmax():
    logits = torch.tensor([1.0, 0.5, -0.5, 0.2])
    shared = make_generator(7)  # one generator serves all 4000 rows: each draws its own noise
    rows = [SamplingRow(SamplingParams(temperature=1.0), shared, [], []) for _ in range(4000)]
    tokens = torch.tensor(sample(logits.repeat(4000, 1), rows).token_ids)
    empirical = torch.bincount(tokens, minlength=4) / 4000
    assert (empirical - logits.softmax(-1)).abs().max() < 0.03


def test_seeded_row_draws_the_same_tokens_alone_in_a_batch_and_at_any_position():
    torch.manual_seed(8)
    target = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, frequency_penalty=0.2)
    steps = [torch.randn(50) for _ in range(20)]
    others = [greedy(), SamplingParams(), SamplingParams(top_k=3, seed=9), SamplingParams(min_p=0.2),
              SamplingParams(temperature=1.5, presence_penalty=1.0), greedy(logprobs=3), SamplingParams(top_p=0.5)]

    def draw(position: int | None) -> list[int]:
        me = row(target, seed=target.seed, prompt=[1, 2])
        companions = [row(p, seed=None, output=[3, 4]) for p in others] if position is not None else []
        tokens = []
        for logits in steps:
            batch = companions[:position] + [me] + companions[position:]
            stacked = torch.randn(len(batch), 50)
            stacked[batch.index(me)] = logits
            tokens.append(sample(stacked, batch).token_ids[batch.index(me)])
            me.output_ids.append(tokens[-1])
        return tokens

    alone = draw(None)
    assert len(set(alone)) > 1
    assert draw(0) == alone and draw(5) == alone and draw(7) == alone


def test_make_generator_repeats_a_seed_and_varies_without_one():
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(make_generator(42)), draw(make_generator(42)))
    assert not torch.equal(draw(make_generator(None)), draw(make_generator(None)))


# ---- logprobs ----

def test_logprobs_come_from_the_raw_logits_before_bias_penalties_and_temperature():
    torch.manual_seed(9)
    logits = torch.randn(2, 40)
    params = SamplingParams(temperature=0.5, top_k=3, logit_bias=((11, 100.0),), presence_penalty=2.0, logprobs=5)
    out = sample(logits, [row(params, seed=1, output=[0]), row(greedy(logprobs=2), output=[0])])
    raw = logits.log_softmax(-1)
    assert out.token_ids[0] == 11
    assert out.logprobs == [raw[0, 11].item(), raw[1, out.token_ids[1]].item()]
    top = raw.topk(5)
    assert out.top_ids == [top.indices[0].tolist(), top.indices[1, :2].tolist()]
    assert out.top_logprobs == [top.values[0].tolist(), top.values[1, :2].tolist()]
    assert out.top_logprobs[0] == sorted(out.top_logprobs[0], reverse=True)


def test_rows_without_logprobs_get_none_and_logprobs_0_gets_no_alternatives():
    torch.manual_seed(10)
    logits = torch.randn(3, 30)
    out = sample(logits, [row(greedy()), row(SamplingParams(logprobs=0), seed=2), row(greedy(logprobs=1))])
    assert out.logprobs[0] is None and out.top_ids[0] is None and out.top_logprobs[0] is None
    assert out.logprobs[1] == logits[1].log_softmax(-1)[out.token_ids[1]].item()
    assert out.top_ids[1] == [] and out.top_logprobs[1] == []
    assert out.top_ids[2] == [out.token_ids[2]]


# ---- misuse ----

def test_sampler_leaves_the_callers_logits_untouched():
    logits = torch.randn(2, 20)
    before = logits.clone()
    rows = [row(SamplingParams(repetition_penalty=1.5, logit_bias=((1, 3.0),)), output=[1, 2]), row(greedy())]
    sample(logits, rows)
    assert torch.equal(logits, before)


def test_misuse_is_reported_precisely():
    with pytest.raises(ValueError, match="needs its own generator"):
        sample(torch.randn(1, 10), [SamplingRow(SamplingParams(), None, [], [])])
    with pytest.raises(ValueError, match=r"\(2, 10\) do not match 3 rows"):
        sample(torch.randn(2, 10), [row(greedy())] * 3)
    with pytest.raises(InvalidRequest, match=r"logit_bias: token ids must be in \[0, 10\)"):
        sample(torch.randn(1, 10), [row(greedy(logit_bias=((10, 1.0),)))])
