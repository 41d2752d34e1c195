"""Prometheus metrics of both services, scraped over HTTP from real processes: after a few
requests through the gateway (and one refused by the engine), every counter moved by
exactly what the requests' usage says."""

from __future__ import annotations

import re
import time
import urllib.request
from decimal import Decimal

import grpc
import openai
import pytest
from moeserve.engine.v1 import engine_pb2 as pb

from gateway_helpers import KEY, MODEL, GatewayProcess, start_engine

SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SYSTEM = "You are a careful assistant. " * 12  # > 2 KV blocks: the repeat is served from the prefix cache


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, labels, value = SAMPLE.match(line).groups()
        out[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    return out


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def services():
    engine = start_engine("--max-model-len", "1024", "--kv-cache-memory", "0.02", "--metrics-port", "0")
    metrics_url = next(m.group(1) for line in engine.log if (m := re.search(r"engine metrics on (\S+)", line)))
    gateway = GatewayProcess([engine.address])
    gateway.wait_ready()
    yield engine, metrics_url, gateway
    assert gateway.stop() == 0
    assert engine.stop() == 0


def test_counters_move_by_what_the_requests_used(services):
    engine, engine_url, gateway = services
    e0, g0 = scrape(engine_url), scrape(gateway.url + "/metrics")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    usages = []
    for max_tokens in (5, 4):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
        usages.append(r.usage)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=7, stream=True, stream_options={"include_usage": True})
    usages.append([c for c in stream if c.usage][-1].usage)
    with pytest.raises(grpc.RpcError) as err:  # refused by the engine itself
        engine.stub().Generate(pb.GenerateRequest(chat=pb.ChatInput()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    e1, g1 = scrape(engine_url), scrape(gateway.url + "/metrics")

    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    assert completion == 16 and cached >= 32  # the second request reused the system prompt's blocks
    m = {"model": MODEL}

    assert moved(e0, e1, "moeserve_engine_requests_total", outcome="length", **m) == 3
    assert moved(e0, e1, "moeserve_engine_requests_total", outcome="rejected", **m) == 1
    assert moved(e0, e1, "moeserve_engine_prompt_tokens_total", **m) == prompt
    assert moved(e0, e1, "moeserve_engine_completion_tokens_total", **m) == completion
    assert moved(e0, e1, "moeserve_engine_prefix_cache_query_tokens_total", **m) == prompt
    assert moved(e0, e1, "moeserve_engine_prefix_cache_hit_tokens_total", **m) == cached
    for hist in ("time_to_first_token_seconds", "request_duration_seconds", "queue_time_seconds"):
        assert moved(e0, e1, f"moeserve_engine_{hist}_count", **m) == 3, hist
    # one output per token: the gaps are the tokens after each request's first
    assert moved(e0, e1, "moeserve_engine_inter_token_latency_seconds_count", **m) == completion - 3
    assert e1[("moeserve_engine_running_requests", frozenset(m.items()))] == 0
    assert e1[("moeserve_engine_waiting_requests", frozenset(m.items()))] == 0
    assert 0 < e1[("moeserve_engine_prefix_cache_hit_ratio", frozenset(m.items()))] < 1
    assert 0 <= e1[("moeserve_engine_kv_cache_usage_ratio", frozenset(m.items()))] <= 1

    assert moved(g0, g1, "moeserve_gateway_generation_requests_total", outcome="length", **m) == 3
    assert moved(g0, g1, "moeserve_gateway_prompt_tokens_total", **m) == prompt
    assert moved(g0, g1, "moeserve_gateway_cached_prompt_tokens_total", **m) == cached
    assert moved(g0, g1, "moeserve_gateway_completion_tokens_total", **m) == completion
    cost = sum(Decimal(str(u.model_extra["estimated_cost"])) for u in usages)
    assert moved(g0, g1, "moeserve_gateway_estimated_cost_dollars_total", **m) == pytest.approx(float(cost), rel=1e-9)
    for hist in ("time_to_first_token_seconds", "generation_duration_seconds"):
        assert moved(g0, g1, f"moeserve_gateway_{hist}_count", **m) == 3, hist
    assert moved(g0, g1, "moeserve_gateway_inter_token_latency_seconds_count", **m) == completion - 3
    route = "/v1/chat/completions"
    assert moved(g0, g1, "moeserve_gateway_requests_total", route=route, status="200") == 3
    assert g1[("moeserve_gateway_requests_in_flight", frozenset())] == 0
    # what the engine last reported, refreshed every --health-interval: it settles to idle
    running = ("moeserve_gateway_engine_running_requests", frozenset({("engine", engine.address)}))
    deadline = time.monotonic() + 5
    while scrape(gateway.url + "/metrics")[running] != 0:
        assert time.monotonic() < deadline, "the gateway never saw the engine idle"
        time.sleep(0.05)


def test_a_cancelled_stream_counts_as_cancelled(services):
    engine, engine_url, _ = services
    e0 = scrape(engine_url)
    call = engine.stub().StreamGenerate(pb.GenerateRequest(
        prompt="Hello", sampling=pb.SamplingParameters(max_tokens=500, ignore_eos=True)))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while moved(e0, e1 := scrape(engine_url), "moeserve_engine_requests_total", outcome="cancelled", model=MODEL) < 1:
        assert time.monotonic() < deadline, "the cancelled request was never counted"
        time.sleep(0.05)
    assert moved(e0, e1, "moeserve_engine_requests_total", outcome="length", model=MODEL) == 0
    assert moved(e0, e1, "moeserve_engine_time_to_first_token_seconds_count", model=MODEL) == 1
