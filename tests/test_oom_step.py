"""A step that runs out of device memory ends only the request that was most of it; the
others finish as they would have. The out-of-memory error comes from a stand-in for the
device allocator (a fake at the boundary this test is not about: no CPU run can exhaust a
GPU), raised by the step's forward whenever the long prompt's chunk is in it."""

from __future__ import annotations

import pytest
import torch

from engine.core import EngineConfig, EngineCore
from engine.errors import OutOfMemory
from engine.loader import load_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from helpers import make_serving_checkpoint

LONG = 200  # tokens of the prompt whose prefill "does not fit"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_serving_checkpoint(tmp_path_factory.mktemp("oom"))


def run(core: EngineCore, requests: list[EngineRequest]) -> dict[str, tuple[list[int], Exception | None]]:
    for req in requests:
        core.add(req)
    results: dict[str, tuple[list[int], Exception | None]] = {r.request_id: ([], None) for r in requests}
    while core.has_work:
        for out in core.step():
            ids, _ = results[out.request_id]
            ids += [t for d in out.choices for t in d.token_ids]
            results[out.request_id] = (ids, out.error)
    return results


def requests() -> list[EngineRequest]:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [EngineRequest("short-a", [0] + list(range(500, 520)), greedy),
            EngineRequest("long", [0] + list(range(1000, 1000 + LONG)), greedy),
            EngineRequest("short-b", [0] + list(range(700, 712)), greedy)]


def test_the_request_whose_step_ran_out_of_memory_ends_and_the_others_finish(model_dir):
    model = load_model(model_dir, dtype="float32", progress=False)
    tokenizer = Tokenizer.from_dir(model_dir)
    config = EngineConfig(max_model_len=1024, num_blocks=128)
    expected = run(EngineCore(model, tokenizer, config), [r for r in requests() if r.request_id != "long"])

    core = EngineCore(model, tokenizer, config)
    execute = core.runner.execute

    def allocator_says_no(step):
        if max(step.query_lens) >= 100:  # the long prompt's prefill chunk
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return execute(step)
    core.runner.execute = allocator_says_no
    got = run(core, requests())
    assert isinstance(got["long"][1], OutOfMemory) and "the other requests go on" in str(got["long"][1])
    assert got["long"][0] == []
    for rid in ("short-a", "short-b"):
        assert got[rid] == expected[rid] and len(got[rid][0]) == 8
    assert core.kv.num_free_blocks == config.num_blocks  # every block back
