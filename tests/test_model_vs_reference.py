"""The model must compute what Hugging Face transformers' DeepseekV3ForCausalLM computes,
on random checkpoints built here, in fp32: varlen prefill batches, chunked prefill through
the paged cache, mixed prefill + decode steps on the weight-absorbed path, and greedy
continuations."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, MLAPath
from engine.loader import load_model
from engine.offline import generate
from helpers import LORA_YARN, PLAIN_ONE_GROUP, contiguous_meta, hf_logits, hf_model, make_checkpoint

TOL = 1e-4
CONFIGS = {"qlora-yarn-4groups": LORA_YARN, "plain-q-1group": PLAIN_ONE_GROUP}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=7)
    return path, hf_model(path)


@pytest.fixture(scope="module", params=["torch", "cpu"])
def pair(request, checkpoint):
    """(our model on the reference or the CPU attention backend, the transformers model)."""
    path, ref = checkpoint
    return load_model(path, dtype="float32", attention=request.param, progress=False), ref


def random_prompts(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("path", [MLAPath.AUTO, MLAPath.ABSORBED])
def test_varlen_prefill_batch_matches_reference(pair, path):
    ours, ref = pair
    prompts = random_prompts([5, 1, 23, 12], ours.cfg.vocab_size)
    lens = [len(p) for p in prompts]
    meta = contiguous_meta(lens, lens, block_size=8, blocks_per_seq=3, path=path)
    cache = ours.allocate_kv_cache(3 * len(prompts), 8)
    logits = ours.compute_logits(ours(torch.tensor(sum(prompts, [])), meta.positions(), cache, meta))
    for prompt, rows in zip(prompts, logits.split(lens)):
        torch.testing.assert_close(rows, hf_logits(ref, prompt), atol=TOL, rtol=0)


def test_chunked_prefill_reuses_cached_prefix(pair):
    """A prompt prefilled in three chunks gives the logits of a single full prefill."""
    ours, ref = pair
    prompt = random_prompts([29], ours.cfg.vocab_size, seed=1)[0]
    cache = ours.allocate_kv_cache(4, 8)
    outputs, done = [], 0
    for chunk in (11, 8, 10):
        meta = contiguous_meta([chunk], [done + chunk], block_size=8, blocks_per_seq=4)
        ids = torch.tensor(prompt[done:done + chunk])
        outputs.append(ours.compute_logits(ours(ids, meta.positions(), cache, meta)))
        done += chunk
    torch.testing.assert_close(torch.cat(outputs), hf_logits(ref, prompt), atol=TOL, rtol=0)


def test_decode_steps_through_paged_cache_match_reference(pair):
    """Three sequences decode 24 steps together (absorbed path) while a fourth prefills
    in the same steps; every step's logits match the reference on the full sequence."""
    ours, ref = pair
    vocab, block, per_seq, steps = ours.cfg.vocab_size, 4, 12, 24
    seqs = random_prompts([6, 1, 13], vocab, seed=2)
    late = random_prompts([9], vocab, seed=3)[0]
    cache = ours.allocate_kv_cache(per_seq * 4, block)
    # Prefill the three decoders in one varlen step.
    lens = [len(s) for s in seqs]
    meta = contiguous_meta(lens, lens, block, per_seq)
    ours(torch.tensor(sum(seqs, [])), meta.positions(), cache, meta)
    gen = torch.Generator().manual_seed(4)
    for step in range(steps):
        new = torch.randint(2, vocab, (3,), generator=gen).tolist()
        for s, t in zip(seqs, new):
            s.append(t)
        q_lens, s_lens, ids = [1, 1, 1], [len(s) for s in seqs], list(new)
        if step == 5:  # a prefill rides along with the decodes, after them in the batch
            q_lens, s_lens, ids = q_lens + [len(late)], s_lens + [len(late)], ids + late
        meta = contiguous_meta(q_lens, s_lens, block, per_seq, num_decodes=3)
        logits = ours.compute_logits(ours(torch.tensor(ids), meta.positions(), cache, meta))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], hf_logits(ref, s)[-1], atol=TOL, rtol=0)
        if step == 5:
            torch.testing.assert_close(logits[3:], hf_logits(ref, late), atol=TOL, rtol=0)


def test_greedy_continuation_identical_to_reference(pair):
    ours, ref = pair
    prompt = random_prompts([10], ours.cfg.vocab_size, seed=5)[0]
    ours_ids = generate(ours, prompt, max_tokens=24).token_ids
    with torch.no_grad():
        ref_out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert ours_ids == ref_out[0, len(prompt):].tolist()


def test_metadata_rejects_decodes_after_prefills():
    with pytest.raises(ValueError, match="decodes must come first"):
        AttentionMetadata((3, 1), (3, 5), torch.zeros(2, 2, dtype=torch.int32), torch.arange(4), num_decodes=2)
