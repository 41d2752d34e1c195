"""The gateway's OpenAI API end to end: a real engine process and a real gateway process on
loopback, driven by the official `openai` SDK (sync, async, streaming) and by raw HTTP.

The tiny random model's chat output is all reasoning (the template opens <think> and the
model never closes it), so chat text shows up in `reasoning_content`; legacy completions
carry plain text.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import aiohttp
import openai
import pytest

from gateway_helpers import KEY, MODEL, GatewayProcess, kv_blocks_in_use, start_engine

PRICES = {"input_per_million": "0.50", "output_per_million": "2.15", "cached_input_per_million": "0.10"}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def engine():
    proc = start_engine("--max-model-len", "2048", "--kv-cache-memory", "0.05", "--max-waiting", "64")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def gateway(engine, tmp_path_factory):
    prices = tmp_path_factory.mktemp("prices") / "prices.json"
    prices.write_text(json.dumps({"models": {MODEL: PRICES}}))
    proc = GatewayProcess([engine.address], "--prices", str(prices), "--max-body-bytes", "65536",
                          keys=(KEY, "sk-second-key"))
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def expected_cost(usage) -> float:
    cached = usage.prompt_tokens_details.cached_tokens
    price = {k: Decimal(v) for k, v in PRICES.items()}
    total = ((usage.prompt_tokens - cached) * price["input_per_million"] + cached * price["cached_input_per_million"]
             + usage.completion_tokens * price["output_per_million"])
    return float(total / 1_000_000)


async def _http(method: str, url: str, body=None, key: str | None = KEY, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=hdrs) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


def http(method: str, url: str, body=None, **kwargs) -> tuple[int, dict, bytes]:
    return asyncio.run(_http(method, url, body, **kwargs))


def sse_events(raw: bytes) -> list[str]:
    """The data of each event; asserts the framing (`data: ...` then a blank line)."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


# --- chat through the SDK -------------------------------------------------------------

def test_sdk_chat_answers_with_reasoning_and_priced_usage(client):
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == MODEL
    choice = resp.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.reasoning_content and choice.message.content == ""
    u = resp.usage
    assert u.completion_tokens == 7 and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + 7
    assert u.completion_tokens_details.reasoning_tokens == 7
    assert u.estimated_cost == expected_cost(u) > 0


def test_async_sdk_serves_concurrent_requests(gateway):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5, seed=i)
            for i in range(6)))
    answers = asyncio.run(run())
    assert [a.usage.completion_tokens for a in answers] == [5] * 6
    assert len({a.id for a in answers}) == 6


def test_stream_equals_unary_and_first_delta_carries_the_role(client):
    unary = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert [c.choices[0].delta.role for c in chunks] == ["assistant"] + [None] * (len(chunks) - 1)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.reasoning_content or "" for c in chunks)
    assert text == unary.choices[0].message.reasoning_content


def test_include_usage_adds_one_chunk_with_usage_and_no_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.estimated_cost == expected_cost(last.usage)
    assert all(c.usage is None and len(c.choices) == 1 for c in body)


def test_raw_sse_framing_ends_with_done(gateway):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    status, headers, raw = http("POST", gateway.base_url + "/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" in c for c in chunks) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    status, _, raw = http("POST", gateway.base_url + "/chat/completions", {**body, "stream_options": None})
    assert all("usage" not in json.loads(e) for e in sse_events(raw)[:-1])


def test_n_choices_each_with_role_and_finish(client):
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, n=3, seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2] and resp.usage.completion_tokens == 9
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, n=3, seed=1, stream=True))
    for i in range(3):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert [c.delta.role for c in mine].count("assistant") == 1 == sum(bool(c.finish_reason) for c in mine)
        assert "".join(c.delta.reasoning_content or "" for c in mine) == resp.choices[i].message.reasoning_content


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.reasoning_content
    assert sample(1234) == sample(1234) != sample(99)


def test_logit_bias_top_k_and_penalties_reach_the_engine(client):
    forced = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                            logit_bias={"1234": 100}, logprobs=True,
                                            extra_body={"return_tokens_as_token_ids": True})
    assert [t.token for t in forced.choices[0].logprobs.content] == ["token_id:1234"] * 4
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    top1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.0, seed=3,
                                          extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert top1.choices[0].message.reasoning_content == greedy.choices[0].message.reasoning_content
    penalized = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=6, temperature=0,
                                               presence_penalty=2, frequency_penalty=2, user="u-1",
                                               response_format={"type": "text"}, store=False,
                                               extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert penalized.usage.completion_tokens == 6


def test_chat_logprobs_carry_bytes_and_alternatives(client):
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
    assert "".join(bytes(b for e in content for b in e.bytes).decode()) == resp.choices[0].message.reasoning_content
    streamed = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    tokens = [e.token for c in streamed for e in (c.choices[0].logprobs.content or [])]
    assert tokens == [e.token for e in content]


def test_tool_definitions_and_tool_turns_are_accepted(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": schema, "strict": False}}]
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
                {"role": "developer", "content": "Answer briefly.", "name": "ops"}]
    for choice in ("auto", "none"):
        resp = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice,
                                              max_tokens=3, parallel_tool_calls=True)
        assert resp.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_hosted_provider_path_serves_the_same_api(gateway):
    hosted = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=KEY, max_retries=0)
    assert [m.id for m in hosted.models.list()] == [MODEL]
    resp = hosted.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert resp.usage.completion_tokens == 2
    assert hosted.completions.create(model=MODEL, prompt="Once", max_tokens=2).usage.completion_tokens == 2


def test_models_list_and_get(client, gateway):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "moeserve")]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_cached_prompt_tokens_are_billed_at_the_cached_price(client):
    long_prompt = [{"role": "user", "content": "paged attention and prefix caching " * 40}]
    client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 160
    assert again.usage.estimated_cost == expected_cost(again.usage)


# --- legacy completions ---------------------------------------------------------------

def test_completion_prompt_forms_and_choice_order(client):
    for prompt in ("Once upon", ["Once upon", "a time"], [0, 5, 6, 7], [[0, 5, 6], [0, 8, 9]]):
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, n=2, temperature=0)
        prompts = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else 2
        assert resp.object == "text_completion" and [c.index for c in resp.choices] == list(range(2 * prompts))
        assert resp.usage.completion_tokens == 6 * prompts
    default = client.completions.create(model=MODEL, prompt="Once upon", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model=MODEL, prompt="The story", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model=MODEL, prompt="The story", max_tokens=24, temperature=0, stop=[stop, "zzzq"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_legacy_logprobs_shape(client):
    resp = client.completions.create(model=MODEL, prompt="The story", max_tokens=4, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    offsets = lp.text_offset
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp.tokens, strict=False))
    assert all(tok in top and len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))
    ids = client.completions.create(model=MODEL, prompt="The story", max_tokens=4, temperature=0, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": True})
    assert all(t.startswith("token_id:") for t in ids.choices[0].logprobs.tokens)


def test_completion_stream_matches_unary(client):
    unary = client.completions.create(model=MODEL, prompt=["Once upon", "a time"], max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=["Once upon", "a time"], max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == unary.choices[i].text and mine[-1].finish_reason == "length"


# --- errors ---------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Once", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f"}}


def chat(**fields):
    return ("/chat/completions", {k: v for k, v in {**CHAT, **fields}.items() if v is not ...})


def completion(**fields):
    return ("/completions", {k: v for k, v in {**COMPLETION, **fields}.items() if v is not ...})


BAD_REQUESTS = [
    (chat(model=...), "model", "missing_required_parameter"),
    (chat(model=""), "model", "invalid_value"),
    (chat(messages=...), "messages", "missing_required_parameter"),
    (chat(messages=[]), "messages", "invalid_value"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "invalid_value"),
    (chat(messages=[{"role": "function", "content": "x", "name": "f"}]), "messages[0].role", "unsupported_value"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": "x", "mood": 1}]), "messages[0].mood", "unknown_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type", "unsupported_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text",
     "missing_required_parameter"),
    (chat(messages=[{"role": "tool", "content": "18 C"}]), "messages[0].tool_call_id", "missing_required_parameter"),
    (chat(messages=[{"role": "assistant"}]), "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "assistant", "content": "x", "audio": {"id": "a"}}]), "messages[0].audio",
     "unsupported_value"),
    (chat(wibble=1), "wibble", "unknown_parameter"),
    (chat(temperature=2.5), "temperature", "invalid_value"),
    (chat(temperature="hot"), "temperature", "invalid_type"),
    (chat(top_p=0), "top_p", "invalid_value"),
    (chat(n=0), "n", "invalid_value"),
    (chat(n=True), "n", "invalid_type"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens=2, max_completion_tokens=3), "max_tokens", None),
    (chat(presence_penalty=2.5), "presence_penalty", "invalid_value"),
    (chat(frequency_penalty=-3), "frequency_penalty", "invalid_value"),
    (chat(logit_bias={"abc": 1}), "logit_bias", "invalid_value"),
    (chat(logit_bias={"5": 200}), "logit_bias.5", "invalid_value"),
    (chat(logit_bias={"999999": 1}), "logit_bias", None),  # beyond the vocabulary: the engine's verdict
    (chat(seed="x"), "seed", "invalid_type"),
    (chat(stop=5), "stop", "invalid_type"),
    (chat(stop=[""]), "stop", "invalid_value"),
    (chat(top_logprobs=2), "top_logprobs", None),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    (chat(stream_options={"include_usage": True}), "stream_options", None),
    (chat(stream=True, stream_options={"include_obfuscation": True}), "stream_options.include_obfuscation",
     "unsupported_value"),
    (chat(stream=True, stream_options={"verbose": True}), "stream_options.verbose", "unknown_parameter"),
    (chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type", "unsupported_value"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "strict": True}}]), "tools[0].function.strict",
     "unsupported_value"),
    (chat(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name", "invalid_value"),
    (chat(tools=[TOOL], tool_choice="required"), "tool_choice", "unsupported_value"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice",
     "unsupported_value"),
    (chat(tool_choice="sometimes"), "tool_choice", "invalid_value"),
    (chat(response_format={"type": "json_object"}), "response_format", "unsupported_value"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format",
     "unsupported_value"),
    (chat(response_format={"type": "yaml"}), "response_format.type", None),
    (chat(parallel_tool_calls=False), "parallel_tool_calls", "unsupported_value"),
    (chat(audio={"voice": "alloy", "format": "mp3"}), "audio", "unsupported_value"),
    (chat(modalities=["text", "audio"]), "modalities", "unsupported_value"),
    (chat(store=True), "store", "unsupported_value"),
    (chat(functions=[{"name": "f"}]), "functions", "unsupported_value"),
    (chat(reasoning_effort="high"), "reasoning_effort", "unsupported_value"),
    (chat(service_tier="flex"), "service_tier", "unsupported_value"),
    (chat(top_k=-5), "top_k", "invalid_value"),
    (chat(min_p=2), "min_p", "invalid_value"),
    (chat(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    (chat(ignore_eos="yes"), "ignore_eos", "invalid_type"),
    (completion(prompt=...), "prompt", "missing_required_parameter"),
    (completion(prompt=5), "prompt", "invalid_type"),
    (completion(prompt=[]), "prompt", "invalid_type"),
    (completion(prompt=["a", ""]), "prompt[1]", "invalid_value"),
    (completion(prompt=[0, -1]), "prompt[1]", "invalid_value"),
    (completion(prompt=[0, 999999]), "prompt", None),  # beyond the vocabulary: the engine's verdict
    (completion(suffix="end"), "suffix", "unsupported_value"),
    (completion(logprobs=6), "logprobs", "invalid_value"),
    (completion(logprobs=True), "logprobs", "invalid_type"),
    (completion(echo=True, prompt=[0, 5]), "echo", "unsupported_value"),
    (completion(echo=True, logprobs=1), "echo", "unsupported_value"),
    (completion(best_of=3), "best_of", "unsupported_value"),
    (completion(n=2, best_of=1), "best_of", "invalid_value"),
    (completion(messages=HELLO), "messages", "unknown_parameter"),
]


@pytest.mark.parametrize("request_, param, code", BAD_REQUESTS, ids=[f"{r[0][0][1:]}-{r[1]}" for r in BAD_REQUESTS])
def test_invalid_fields_get_400_naming_the_param(gateway, request_, param, code):
    path, body = request_
    status, _, raw = http("POST", gateway.base_url + path, body)
    error = json.loads(raw)["error"]
    assert (status, error["type"], error["param"], error["code"]) == (400, "invalid_request_error", param, code), error
    assert error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/chat/completions", {**CHAT, "max_tokens": 4096}, "max_tokens"),
    ("/chat/completions", {**CHAT, "max_completion_tokens": 2048, "max_tokens": None}, "max_completion_tokens"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello " * 2100}]}, "messages"),
    ("/completions", {**COMPLETION, "prompt": list(range(10, 2045)), "max_tokens": 16}, "prompt"),
    ("/completions", {**COMPLETION, "prompt": "hello " * 2100}, "prompt"),
    # a text prompt that fits but leaves fewer tokens than max_tokens asks for (the engine knows its length)
    ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello " * 1500}], "max_tokens": 1000},
     "max_tokens"),
])
def test_prompt_and_max_tokens_beyond_the_context_are_refused(gateway, path, body, param):
    status, _, raw = http("POST", gateway.base_url + path, body)
    error = json.loads(raw)["error"]
    assert (status, error["param"], error["code"]) == (400, param, "context_length_exceeded"), error


def test_sdk_raises_bad_request_with_param(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[TOOL], tool_choice="required")
    assert err.value.status_code == 400 and err.value.param == "tool_choice"
    assert "not supported yet" in err.value.message


@pytest.mark.parametrize("raw, code", [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_type"),
                                       (b'{"model": NaN}', "invalid_json"), (b"", "invalid_json")])
def test_malformed_bodies_get_400(gateway, raw, code):
    status, _, body = http("POST", gateway.base_url + "/chat/completions", raw=raw)
    error = json.loads(body)["error"]
    assert (status, error["type"], error["code"]) == (400, "invalid_request_error", code)


def test_unknown_model_is_404(gateway):
    status, _, raw = http("POST", gateway.base_url + "/chat/completions", {**CHAT, "model": "gpt-9"})
    error = json.loads(raw)["error"]
    assert (status, error["param"], error["code"]) == (404, "model", "model_not_found")


@pytest.mark.parametrize("key, header, code", [
    (None, None, "missing_api_key"), ("wrong-key", None, "invalid_api_key"),
    (None, {"Authorization": f"Basic {KEY}"}, "invalid_api_key"),
    (None, {"Authorization": "Bearer "}, "invalid_api_key")])
def test_missing_or_wrong_key_is_401(gateway, key, header, code):
    status, headers, raw = http("POST", gateway.base_url + "/chat/completions", CHAT, key=key, headers=header)
    assert status == 401 and json.loads(raw)["error"]["code"] == code and headers["WWW-Authenticate"] == "Bearer"


def test_every_configured_key_works_and_sdk_sees_401(gateway):
    status, _, _ = http("POST", gateway.base_url + "/chat/completions", CHAT, key="sk-second-key")
    assert status == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("method, path, status, code", [
    ("POST", "/v1/embeddings", 404, "unknown_url"), ("GET", "/nowhere", 404, "unknown_url"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"), ("POST", "/v1/models", 405, "method_not_allowed"),
    ("DELETE", "/v1/openai/completions", 405, "method_not_allowed")])
def test_unknown_paths_and_methods(gateway, method, path, status, code):
    got, _, raw = http(method, gateway.url + path)
    assert (got, json.loads(raw)["error"]["code"]) == (status, code)


def test_body_over_the_limit_is_413(gateway):
    status, _, raw = http("POST", gateway.base_url + "/chat/completions",
                          {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]})
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"


# --- operations -----------------------------------------------------------------------

def test_request_id_is_echoed_and_trace_context_accepted(gateway):
    trace = {"X-Request-Id": "abc-123", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "tracestate": "vendor=caf\u00e9"}  # not ASCII: not forwarded, and no harm done
    status, headers, _ = http("POST", gateway.base_url + "/chat/completions", CHAT, headers=trace)
    assert status == 200 and headers["X-Request-Id"] == "abc-123"
    _, headers, _ = http("POST", gateway.base_url + "/chat/completions", {"model": 1})
    assert headers["X-Request-Id"].startswith("req-")


def test_health_and_metrics_need_no_key(gateway):
    status, _, raw = http("GET", gateway.url + "/health", key=None)
    assert status == 200 and json.loads(raw)["engines_ready"] == 1
    status, headers, raw = http("GET", gateway.url + "/metrics", key=None)
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert f'moeserve_gateway_completion_tokens_total{{model="{MODEL}"}}' in text
    assert 'moeserve_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "moeserve_gateway_engine_ready{" in text
    assert "# TYPE moeserve_gateway_request_duration_seconds histogram" in text


def test_stream_disconnect_aborts_the_engine_request(gateway, engine):
    async def run():
        body = {**CHAT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            async with session.post(gateway.base_url + "/chat/completions", json=body) as resp:
                for _ in range(3):
                    await resp.content.readline()
    asyncio.run(run())
    assert kv_blocks_in_use(engine, settle=2.0) == 0


def test_unary_disconnect_aborts_the_engine_request(gateway, engine):
    async def run():
        body = {**CHAT, "max_tokens": 2000, "ignore_eos": True}
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(gateway.base_url + "/chat/completions", json=body)
    asyncio.run(run())
    assert kv_blocks_in_use(engine, settle=2.0) == 0
