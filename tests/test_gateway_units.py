"""Gateway pieces without processes: tool-call deltas from synthetic engine chunks, logprob
shapes, request validation into protos, engine statuses into HTTP errors, prices and cost,
metrics text, SSE encoding and the pool's choice of replica."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal

import grpc
import pytest
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.obs.prometheus import Counter, Histogram

from gateway import responses as r
from gateway.config import ConfigError, GatewayConfig
from gateway.convert import chat_to_proto, completion_to_protos
from gateway.errors import ApiError, from_rpc_error
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import parse_chat, parse_completion
from gateway.pool import EnginePool, ModelCard
from gateway.pricing import Price, PriceBook, PricesError, cost_number, load_prices
from gateway.sse import encode
from gateway.store import Outcome, UsageRecord

JOB = r.Job("chatcmpl-1", 0, "m")


def tool_delta(index, id_="", name="", arguments="", finish=pb.FINISH_REASON_UNSPECIFIED):
    return pb.ChoiceDelta(index=0, tool_calls=[pb.ToolCallDelta(index=index, id=id_, name=name, arguments=arguments)],
                          finish_reason=finish)


# --- tool calls -----------------------------------------------------------------------

def test_streamed_tool_calls_follow_openai_delta_shape():
    choice = r.Choice()
    first = r.chat_chunk_choice(tool_delta(0, "call_a", "get_weather", '{"city": "Paris"}'), choice, JOB, False)
    second = r.chat_chunk_choice(tool_delta(1, "call_b", "get_time", '{"tz": '), choice, JOB, False)
    last = tool_delta(1, arguments='"UTC"}', finish=pb.FINISH_REASON_TOOL_CALLS)
    rest = r.chat_chunk_choice(last, choice, JOB, False)
    assert first["delta"] == {"role": "assistant", "tool_calls": [{
        "index": 0, "id": "call_a", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert second["delta"] == {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                               "function": {"name": "get_time", "arguments": '{"tz": '}}]}
    assert rest["delta"] == {"tool_calls": [{"index": 1, "function": {"arguments": '"UTC"}'}}]}
    assert rest["finish_reason"] == "tool_calls" and first["finish_reason"] is None


def test_unary_tool_calls_merge_fragments_and_null_the_content():
    choice = r.Choice()
    for d in (pb.ChoiceDelta(index=0, reasoning="I should call it"), tool_delta(0, "call_a", "f", '{"x"'),
              tool_delta(0, arguments=": 1}"), tool_delta(1, "call_b", "g", "{}", pb.FINISH_REASON_TOOL_CALLS)):
        r.accumulate_chat(d, choice)
    out = r.chat_message_choice(0, choice, JOB, False)
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None
    assert out["message"]["reasoning_content"] == "I should call it"
    assert out["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert [json.loads(c["function"]["arguments"]) for c in out["message"]["tool_calls"]] == [{"x": 1}, {}]


def test_an_aborted_choice_is_an_error_not_a_finish_reason():
    with pytest.raises(ApiError) as err:
        r.finish_reason(pb.ChoiceDelta(finish_reason=pb.FINISH_REASON_ABORT))
    assert err.value.status == 503 and err.value.code == "engine_aborted"


# --- logprobs -------------------------------------------------------------------------

def lp(token_id, token, logprob, *top):
    alternatives = [pb.TopLogprob(token_id=i, token=t, token_bytes=t.encode(), logprob=v) for i, t, v in top]
    return pb.TokenLogprob(token_id=token_id, token=token, token_bytes=token.encode(), logprob=logprob,
                           top=alternatives)


def test_chat_logprobs_shape_with_bytes_and_ids():
    entry = lp(7, "é", -0.5, (7, "é", -0.5), (9, "e", float("-inf")))
    assert r.chat_logprobs([entry], False) == [{"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
        {"token": "e", "logprob": r.MIN_LOGPROB, "bytes": [101]}]}]
    assert r.chat_logprobs([entry], True)[0]["top_logprobs"][1]["token"] == "token_id:9"


def test_legacy_logprobs_offsets_continue_across_chunks():
    choice = r.Choice(text_offset=5)
    a = r.legacy_logprobs([lp(1, "ab", -1.0, (2, "x", -0.5)), lp(3, "cde", -2.0)], False, choice)
    b = r.legacy_logprobs([lp(4, "f", -0.25)], False, choice)
    assert a == {"tokens": ["ab", "cde"], "token_logprobs": [-1.0, -2.0],
                 "top_logprobs": [{"x": -0.5, "ab": -1.0}, {"cde": -2.0}], "text_offset": [5, 7]}
    assert b["text_offset"] == [10] and choice.text_offset == 11


# --- requests into protos -------------------------------------------------------------

def test_chat_request_maps_every_sampling_field_and_leaves_the_rest_unset():
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}],
                      "temperature": 0.5, "top_k": 4, "seed": -1, "stop": "END", "logit_bias": {"11": -5},
                      "n": 2, "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 9,
                      "stop_token_ids": [5], "skip_special_tokens": False,
                      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                      "tool_choice": "none"})
    msg = chat_to_proto(req, "rid")
    s = msg.sampling
    assert msg.request_id == "rid" and msg.n == 2 and msg.logprobs.top_logprobs == 3 and msg.keep_special_tokens
    assert msg.chat.messages[0].content == "a\nb" and msg.chat.messages[0].role == pb.ROLE_USER
    assert msg.chat.tools[0].parameters_json == '{"type": "object"}' and msg.chat.tool_choice == pb.TOOL_CHOICE_NONE
    assert (s.temperature, s.top_k, s.seed, list(s.stop), dict(s.logit_bias), s.max_tokens) == \
           (0.5, 4, 2**64 - 1, ["END"], {11: -5.0}, 9)
    assert list(s.stop_token_ids) == [5]
    assert not any(s.HasField(f) for f in ("top_p", "min_p", "repetition_penalty"))
    plain = chat_to_proto(parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "r")
    assert not plain.HasField("logprobs") and not plain.sampling.HasField("max_tokens")  # up to the context


def test_completion_prompts_become_one_request_each():
    req = parse_completion({"model": "m", "prompt": [[0, 1], [2, 3, 4]], "n": 2, "logprobs": 0})
    msgs = completion_to_protos(req, "cmpl-x")
    assert [m.request_id for m in msgs] == ["cmpl-x-0", "cmpl-x-1"]
    assert [list(m.token_ids.ids) for m in msgs] == [[0, 1], [2, 3, 4]]
    assert all(m.sampling.max_tokens == 16 and m.n == 2 and m.HasField("logprobs") for m in msgs)


# --- engine statuses into HTTP errors -------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, details, status, param, err_code", [
    (grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be >= 0", 400, "temperature", None),
    (grpc.StatusCode.INVALID_ARGUMENT, "logprobs: must be between 0 and 20", 400, "top_logprobs", None),
    (grpc.StatusCode.INVALID_ARGUMENT, "prompt: the prompt has 9 tokens; the context holds 8", 400, "messages",
     "context_length_exceeded"),
    (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: prompt + max_tokens (99) exceeds the KV cache", 400,
     "max_tokens", "context_length_exceeded"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", 429, None, "rate_limit_exceeded"),
    (grpc.StatusCode.UNAVAILABLE, "gone", 503, None, "engine_unavailable"),
    (grpc.StatusCode.INTERNAL, "internal error: KeyError\nline two", 500, None, "internal_error"),
])
def test_engine_statuses_map_to_http(code, details, status, param, err_code):
    err = from_rpc_error(FakeRpcError(code, details), {"logprobs": "top_logprobs", "prompt": "messages"})
    assert (err.status, err.param, err.code) == (status, param, err_code)
    assert "\n" not in err.message


# --- prices ---------------------------------------------------------------------------

def test_cost_is_exact_decimal_with_the_default_prices():
    price = PriceBook().for_model("anything")
    assert price.cost(1_000_000, 1_000_000) == Decimal("4.00")
    assert cost_number(price.cost(7, 11)) == 0.00004  # 7 x 1e-6 + 11 x 3e-6, no binary rounding
    assert json.dumps(cost_number(price.cost(123_456, 7_891))) == "0.147129"
    assert cost_number(Decimal("2.000")) == 2 and isinstance(cost_number(Decimal("2.000")), int)


def test_cached_tokens_cost_the_cached_price_only_when_one_is_set():
    with_cached = Price(Decimal("1"), Decimal("3"), Decimal("0.25"))
    assert with_cached.cost(1000, 100, cached_tokens=600) == Decimal("0.00085")  # 400 x 1 + 600 x 0.25 + 100 x 3
    assert Price(Decimal("1"), Decimal("3")).cost(1000, 100, cached_tokens=600) == Decimal("0.0013")


def test_prices_file_per_model_and_default(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"default": {"input_per_million": 2, "output_per_million": "4"},
                                "models": {"r1": {"input_per_million": "0.55", "output_per_million": 2.19,
                                                  "cached_input_per_million": "0.14"}}}))
    book = load_prices(path)
    assert book.for_model("r1") == Price(Decimal("0.55"), Decimal("2.19"), Decimal("0.14"))
    assert book.for_model("other") == Price(Decimal("2"), Decimal("4"))


@pytest.mark.parametrize("content, says", [
    ("[]", "must be an object"), ('{"models": []}', "'models' must be"), ('{"extra": {}}', "must be an object"),
    ('{"models": {"m": {"input_per_million": "1", "output_per_million": "x"}}}', "not a number"),
    ('{"models": {"m": {"input_per_million": true, "output_per_million": "1"}}}', "must be a number"),
    ('{"models": {"m": {"input_per_million": "1", "output_per_million": "1", "typo": "1"}}}', "unknown key"),
])
def test_bad_prices_files_say_what_is_wrong(tmp_path, content, says):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PricesError, match=says):
        load_prices(path)


# --- configuration --------------------------------------------------------------------

def test_config_is_validated_once():
    assert GatewayConfig(("127.0.0.1:1",), api_keys=("k",)).port == 8000
    with pytest.raises(ConfigError, match="--no-auth"):
        GatewayConfig(("127.0.0.1:1",))
    with pytest.raises(ConfigError, match="--health-interval"):
        GatewayConfig(("127.0.0.1:1",), no_auth=True, health_interval=0)


# --- metrics and SSE ------------------------------------------------------------------

def test_metrics_text_follows_the_exposition_format():
    c = Counter("x_total", "Things.")
    c.inc(2, model='a"b')
    h = Histogram("lat_seconds", "Latency.", buckets=(0.1, 1))
    h.observe(0.05)
    h.observe(5)
    assert c.samples() == ['x_total{model="a\\"b"} 2']
    assert h.samples() == ['lat_seconds_bucket{le="0.1"} 1', 'lat_seconds_bucket{le="1"} 1',
                           'lat_seconds_bucket{le="+Inf"} 2', "lat_seconds_sum 5.05", "lat_seconds_count 2"]
    m = GatewayMetrics()
    rec = UsageRecord("chatcmpl-1", "req-1", "key-1", "m", 3, 0, 4, 0, Decimal("0.000015"), Outcome.LENGTH,
                      1.0, 20.0, 100.0, datetime.now(UTC))
    m.record_usage(rec, [0.003, 0.004, 0.5])
    text = m.render_pool(_pool_stub())
    assert 'moeserve_gateway_estimated_cost_dollars_total{model="m"} 1.5e-05' in text
    assert 'moeserve_gateway_generation_requests_total{model="m",outcome="length"} 1' in text
    assert 'moeserve_gateway_inter_token_latency_seconds_bucket{model="m",le="0.005"} 2' in text
    assert 'moeserve_gateway_time_to_first_token_seconds_sum{model="m"} 0.02' in text
    assert "# TYPE moeserve_gateway_prompt_tokens_total counter" in text and text.endswith("\n")


def _pool_stub():
    class Stub:
        replicas = []
    return Stub()


def test_sse_events_are_one_data_line_each():
    assert encode({"a": "line\nbreak", "b": "é"}) == 'data: {"a":"line\\nbreak","b":"é"}\n\n'.encode()


# --- pool -----------------------------------------------------------------------------

def test_pool_picks_the_ready_replica_with_fewest_outstanding_requests():
    async def run():
        pool = EnginePool(("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
        a, b, c = pool.replicas
        for rep, name in ((a, "m"), (b, "m"), (c, "other")):
            rep.ready, rep.card = True, ModelCard(name, 1024, 20, 0)
        a.outstanding, b.outstanding = 3, 1
        picks = [pool.pick("m"), pool.pick("m", {b}), pool.pick("nope")]
        pool.mark_down(b, "test")
        picks.append(pool.pick("m"))
        models = sorted(pool.models())
        await pool.close()
        return picks, models, (a, b)
    picks, models, (a, b) = asyncio.run(run())
    assert picks == [b, a, None, a] and models == ["m", "other"]


# --- null reads as absent -------------------------------------------------------------

CHAT_FIELDS = ["audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
               "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n", "parallel_tool_calls",
               "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
               "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
               "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
               "verbosity", "web_search_options", "top_k", "min_p", "repetition_penalty", "ignore_eos",
               "stop_token_ids", "skip_special_tokens", "return_tokens_as_token_ids"]
COMPLETION_FIELDS = ["best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
                     "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p",
                     "user", "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
                     "skip_special_tokens", "return_tokens_as_token_ids"]


@pytest.mark.parametrize("field", CHAT_FIELDS)
def test_every_chat_field_accepts_null(field):
    parse_chat({"model": "m", "messages": [{"role": "user", "content": "x", "name": None}], field: None})


@pytest.mark.parametrize("field", COMPLETION_FIELDS)
def test_every_completion_field_accepts_null(field):
    parse_completion({"model": "m", "prompt": "x", field: None})


def test_unicode_digits_are_not_token_ids():
    with pytest.raises(ApiError) as err:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"²": 1}})
    assert err.value.param == "logit_bias"
