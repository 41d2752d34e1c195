"""The engine as a gRPC service, over real loopback sockets to a real `engine serve` process:
unary and streaming generation, usage, errors with their status codes, deadlines,
cancellation, batch invariance, prefix caching, preemption, health and reflection."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from moeserve.engine.v1 import engine_pb2 as pb

from engine.tokenizer import Tokenizer
from engine_server import EngineProcess, chat, tokens
from helpers import make_serving_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_serving_checkpoint(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def engine(model_dir):
    proc = EngineProcess(model_dir, "--max-model-len", "1024", "--kv-cache-memory", "0.05", "--max-waiting", "64")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(engine):
    return engine.stub()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def used_blocks(stub, settle: float = 5.0) -> int:
    """KV blocks in use once in-flight aborts have been processed (they land at a step boundary)."""
    deadline = time.monotonic() + settle
    while True:
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        if info.kv_cache.used_blocks == 0 or time.monotonic() > deadline:
            return info.kv_cache.used_blocks
        time.sleep(0.05)


def stream_text(stub, request) -> tuple[str, list[int], pb.Usage, int]:
    text, ids, usage, finish = "", [], None, 0
    for chunk in stub.StreamGenerate(request):
        for c in chunk.choices:
            text += c.reasoning + c.text
            ids += c.token_ids
            finish = c.finish_reason or finish
        if chunk.HasField("usage"):
            usage = chunk.usage
    return text, ids, usage, finish


# --- generation -----------------------------------------------------------------------

def test_unary_chat_returns_text_and_usage(stub, tokenizer):
    resp = stub.Generate(chat("What is MLA?", max_tokens=12, temperature=0))
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is MLA?"}])
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == 12 == len(resp.choices[0].token_ids)
    assert resp.choices[0].finish_reason == pb.FINISH_REASON_LENGTH
    # the template opens <think>, so output is reasoning until </think>
    assert resp.choices[0].reasoning and resp.usage.reasoning_tokens == 12


def test_stream_equals_unary_and_ends_with_usage(stub):
    req = chat("Tell me a story", max_tokens=16, temperature=0)
    unary = stub.Generate(req)
    text, ids, usage, finish = stream_text(stub, req)
    assert ids == list(unary.choices[0].token_ids)
    assert text == unary.choices[0].reasoning + unary.choices[0].text
    assert usage.completion_tokens == 16 and finish == pb.FINISH_REASON_LENGTH


def test_token_id_prompt_with_seeded_sampling_is_reproducible(stub):
    req = tokens([0, 5, 6, 7, 8], max_tokens=10, temperature=0.9, seed=1234)
    a, b = stub.Generate(req), stub.Generate(req)
    assert a.choices[0].token_ids == b.choices[0].token_ids
    other = stub.Generate(tokens([0, 5, 6, 7, 8], max_tokens=10, temperature=0.9, seed=99))
    assert other.choices[0].token_ids != a.choices[0].token_ids


def test_n_choices_share_the_prompt_and_sum_usage(stub):
    req = tokens(list(range(100, 140)), max_tokens=6, temperature=1.0, seed=5)
    req.n = 3
    resp = stub.Generate(req)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.prompt_tokens == 40 and resp.usage.completion_tokens == 18
    assert len({tuple(c.token_ids) for c in resp.choices}) > 1  # seed + index differ per choice


def test_stop_token_id_ends_generation(stub):
    first = list(stub.Generate(tokens([0, 9, 10, 11], max_tokens=8, temperature=0)).choices[0].token_ids)
    stop_at = first[3]
    resp = stub.Generate(tokens([0, 9, 10, 11], max_tokens=8, temperature=0, stop_token_ids=[stop_at]))
    choice = resp.choices[0]
    assert choice.finish_reason == pb.FINISH_REASON_STOP and list(choice.token_ids) == list(first[:first.index(stop_at) + 1])


def test_logprobs_come_with_bytes_and_alternatives(stub):
    req = tokens([0, 9, 10, 11], max_tokens=4, temperature=0)
    req.logprobs.top_logprobs = 3
    choice = stub.Generate(req).choices[0]
    assert len(choice.logprobs) == 4
    for tok_id, lp in zip(choice.token_ids, choice.logprobs):
        assert lp.token_id == tok_id and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.top[0].token_id == tok_id  # greedy picks the most likely token
        assert lp.token_bytes


def test_model_info_describes_context_and_cache(stub, engine):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_model_len == 1024 and info.vocab_size == 129280
    assert info.kv_cache.total_blocks > 0 and info.kv_cache.capacity_tokens == info.kv_cache.total_blocks * info.kv_cache.block_size
    assert info.capabilities.tools and info.capabilities.reasoning and info.capabilities.max_top_logprobs == 20
    assert info.dtype == "float32" and info.device == "cpu"


def test_health_and_reflection(engine):
    channel = grpc.insecure_channel(engine.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "moeserve.engine.v1.Engine"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"moeserve.engine.v1.Engine", "grpc.health.v1.Health"} <= names


# --- errors -----------------------------------------------------------------------------

def bad(**sampling):
    return tokens([0, 1, 2], **sampling)


@pytest.mark.parametrize("request_, field", [
    (bad(temperature=-0.5), "temperature"),
    (bad(top_p=0.0), "top_p"),
    (bad(top_p=1.5), "top_p"),
    (bad(top_k=-2), "top_k"),
    (bad(max_tokens=0), "max_tokens"),
    (pb.GenerateRequest(chat=pb.ChatInput()), "messages"),
    (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_UNSPECIFIED, content="x")])),
     "messages[0].role"),
    (pb.GenerateRequest(), "input"),
    (tokens(list(range(10, 1100))), "prompt"),
    (tokens([0, 999999]), "token_ids"),
])
def test_invalid_requests_get_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_too_many_logprobs_is_invalid(stub):
    req = bad()
    req.logprobs.top_logprobs = 21
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamGenerate(req).next()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details()


def test_a_bad_request_does_not_disturb_others(stub):
    good = stub.Generate(tokens([0, 3, 4], max_tokens=5, temperature=0))
    with pytest.raises(grpc.RpcError):
        stub.Generate(bad(top_p=7.0))
    assert stub.Generate(tokens([0, 3, 4], max_tokens=5, temperature=0)).choices[0].token_ids == good.choices[0].token_ids


def test_deadline_aborts_the_request_and_frees_its_blocks(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(tokens([0, 5, 6], max_tokens=1000, ignore_eos=True, temperature=0), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert used_blocks(stub) == 0


# --- concurrency ------------------------------------------------------------------------

def test_fifty_cancelled_streams_return_every_block(engine, stub):
    async def run():
        aio = engine.aio_stub()
        calls = [aio.StreamGenerate(tokens([0, 7 + i, 8], max_tokens=500, ignore_eos=True, temperature=0))
                 for i in range(50)]
        for call in calls[:25]:
            await call.read()  # these are mid-flight when cancelled
        for call in calls:
            call.cancel()
    asyncio.run(run())
    assert used_blocks(stub) == 0


def test_concurrent_greedy_outputs_equal_each_one_alone(engine, stub):
    prompts = [[0] + list(range(200 + 13 * i, 200 + 13 * i + 3 + 7 * i)) for i in range(16)]
    alone = [list(stub.Generate(tokens(p, max_tokens=12, temperature=0, ignore_eos=True)).choices[0].token_ids)
             for p in prompts]

    async def together():
        aio = engine.aio_stub()
        resps = await asyncio.gather(*(aio.Generate(tokens(p, max_tokens=12, temperature=0, ignore_eos=True))
                                       for p in prompts))
        return [list(r.choices[0].token_ids) for r in resps]
    assert asyncio.run(together()) == alone


def test_shared_prefix_is_served_from_the_cache(stub):
    prefix = list(range(1000, 1256))
    stub.Generate(tokens(prefix + [7, 8, 9], max_tokens=2, temperature=0))
    second = stub.Generate(tokens(prefix + list(range(50, 90)), max_tokens=2, temperature=0))
    block = stub.GetModelInfo(pb.GetModelInfoRequest()).kv_cache.block_size
    prefilled = second.usage.prompt_tokens - second.usage.cached_prompt_tokens
    assert second.usage.prompt_tokens == 296
    assert prefilled <= 296 - 256 + block


def test_health_answers_while_the_engine_is_busy(engine):
    async def run():
        aio = engine.aio_stub()
        calls = [aio.Generate(tokens([0, i + 3], max_tokens=60, ignore_eos=True, temperature=0)) for i in range(16)]
        health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(engine.address))
        await asyncio.sleep(0.2)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        await asyncio.gather(*calls)
        return reply.status
    assert asyncio.run(run()) == health_pb2.HealthCheckResponse.SERVING


def test_small_kv_pool_preempts_and_still_completes_everything(model_dir, stub):
    prompts = [[0] + list(range(300 + 40 * i, 330 + 40 * i)) for i in range(6)]
    expected = [list(stub.Generate(tokens(p, max_tokens=40, temperature=0, ignore_eos=True)).choices[0].token_ids)
                for p in prompts]
    small = EngineProcess(model_dir, "--max-model-len", "128", "--kv-cache-memory", "0.0003", "--block-size", "8")
    try:
        info = small.stub().GetModelInfo(pb.GetModelInfoRequest())
        assert 6 * 4 <= info.kv_cache.total_blocks < 6 * 9  # all prompts fit at once, all full sequences do not

        async def run():
            aio = small.aio_stub()
            resps = await asyncio.gather(*(aio.Generate(tokens(p, max_tokens=40, temperature=0, ignore_eos=True))
                                           for p in prompts))
            return [list(r.choices[0].token_ids) for r in resps]
        assert asyncio.run(run()) == expected
        assert used_blocks(small.stub()) == 0
    finally:
        assert small.stop() == 0


def test_full_queue_is_resource_exhausted(model_dir):
    tiny = EngineProcess(model_dir, "--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "512")
    try:
        async def run():
            aio = tiny.aio_stub()
            calls = [aio.Generate(tokens([0, 4, 5], max_tokens=200, ignore_eos=True, temperature=0)) for _ in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)
        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, grpc.RpcError)]
        assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert sum(1 for r in results if isinstance(r, pb.GenerateResponse)) == 2
    finally:
        assert tiny.stop() == 0


def test_stop_string_cuts_the_text_and_is_reported(stub):
    full = stub.Generate(tokens([0, 21, 22, 23], max_tokens=24, temperature=0, ignore_eos=True)).choices[0]
    assert len(full.text) > 12
    stop = full.text[8:12]
    first = full.text.index(stop)
    cut = stub.Generate(tokens([0, 21, 22, 23], max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])).choices[0]
    assert cut.text == full.text[:first]
    assert cut.finish_reason == pb.FINISH_REASON_STOP and cut.matched_stop == stop


def test_seeded_sample_does_not_depend_on_batch_companions(engine, stub):
    seeded = tokens([0, 40, 41, 42], max_tokens=16, temperature=1.0, top_p=0.9, seed=77, ignore_eos=True)
    alone = list(stub.Generate(seeded).choices[0].token_ids)

    async def crowded():
        aio = engine.aio_stub()
        others = [aio.Generate(tokens([0, 50 + i], max_tokens=16, temperature=1.0, ignore_eos=True)) for i in range(8)]
        mine = aio.Generate(seeded)
        results = await asyncio.gather(mine, *others)
        return list(results[0].choices[0].token_ids)
    assert asyncio.run(crowded()) == alone


def test_serve_with_a_broken_checkpoint_exits_2_with_one_line(model_dir, tmp_path):
    import shutil
    import subprocess
    import sys
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(broken), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a readable safetensors file" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_max_tokens_past_the_context_is_refused_not_clamped(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(tokens(list(range(10, 1010)), max_tokens=100))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("max_tokens:") and "exceeds the context (1024 tokens)" in err.value.details()
    unset = stub.Generate(tokens(list(range(10, 1010)), temperature=0, ignore_eos=True))
    assert unset.usage.completion_tokens == 1024 - 1000  # unset: up to the end of the context


def test_first_stream_message_carries_the_prompt_counts(stub):
    prompt = list(range(600, 640))
    chunks = list(stub.StreamGenerate(tokens(prompt, max_tokens=3, temperature=0)))
    assert chunks[0].HasField("prompt") and chunks[0].prompt.prompt_tokens == 40
    assert not any(c.HasField("prompt") for c in chunks[1:])
    assert chunks[-1].usage.prompt_tokens == 40


def test_engine_process_death_fails_requests_and_exits_nonzero(model_dir):
    import os
    import signal
    import subprocess
    proc = EngineProcess(model_dir, "--max-model-len", "512")
    try:
        child = int(subprocess.run(["pgrep", "-P", str(proc.proc.pid), "-f", "spawn_main"], capture_output=True,
                                   text=True).stdout.split()[0])

        async def run():
            call = proc.aio_stub().Generate(tokens([0, 4, 5], max_tokens=400, ignore_eos=True, temperature=0))
            await asyncio.sleep(0.5)
            os.kill(child, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                await call
            return err.value.code()
        assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.wait(timeout=30) == 1
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        else:
            proc.proc.stdout.close()
