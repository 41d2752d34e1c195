"""Traces: one OpenTelemetry trace per request, from the gateway's HTTP span through the gRPC
client and server spans to the engine's queue, prefill and decode spans; off unless the
OTEL_* environment configures it; exported over OTLP.

The engine's gRPC server and the gateway's app run in this test process, on one event
loop in a thread, so that both record into one in-memory exporter; the model runs in the
engine's own child process as in production, and requests travel over real loopback HTTP
and gRPC.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent import futures

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine.async_engine import AsyncEngine
from engine.engine_process import ServeConfig
from engine.server import SERVICE, build_server
from engine.server.metrics import EngineMetrics
from engine.tokenizer import Tokenizer
from engine_server import ROOT
from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway_helpers import KEY, MODEL, serving_model, temp_usage_db
from moeserve.obs import tracing

RPC = "moeserve.engine.v1.Engine/StreamGenerate"
HTTP = "POST /v1/chat/completions"
PHASES = ("engine.queue", "engine.prefill", "engine.decode")


class Stack:
    """An engine server and a gateway app on one event loop in a thread of this process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> str:
        model = serving_model()
        cfg = ServeConfig(str(model), "127.0.0.1", 0, "float32", "cpu", MODEL, max_model_len=1024,
                          kv_cache_memory_gib=0.05)
        self.engine = AsyncEngine(cfg)
        info = await self.engine.start()
        self.server, port, health = build_server(self.engine, Tokenizer.from_dir(model), MODEL, "127.0.0.1:0",
                                            EngineMetrics(MODEL, info.config.num_blocks))
        await self.server.start()
        for service in ("", SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        gw = GatewayConfig((f"127.0.0.1:{port}",), api_keys=(KEY,), usage_db=temp_usage_db(), health_interval=0.2,
                           max_backoff=0.5)
        self.runner = web.AppRunner(await build_app(gw), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, http_port = self.runner.addresses[0][:2]
        return f"http://{host}:{http_port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.server.stop(grace=1)
        await self.engine.stop()

    def close(self) -> None:
        self.run(self.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def exporter():
    """The process's SDK provider (installed here once; the API allows one per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()


@pytest.fixture(scope="module")
def gateway_url(exporter):
    stack = Stack()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the engine process is spawned with this environment
        url = stack.run(stack.start())
    try:
        deadline = time.monotonic() + 30
        while get_status(url + "/health") != 200:
            assert time.monotonic() < deadline, "the gateway never saw the engine ready"
            time.sleep(0.05)
        yield url
    finally:
        stack.close()


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def chat(url: str, body: dict, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """POSTs a chat completion; (status, X-Request-Id sent, body)."""
    request_id = f"trace-test-{uuid.uuid4().hex}"
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                          "X-Request-Id": request_id, **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, request_id, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, request_id, err.read()


def trace_of(exporter: InMemorySpanExporter, request_id: str, count: int) -> dict[str, list[ReadableSpan]]:
    """The spans of the trace whose HTTP span carries request_id, by name, once `count` ended."""
    deadline = time.monotonic() + 10
    while True:
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.attributes.get("moeserve.request_id") == request_id and s.name == HTTP]
        found = [s for s in spans if roots and s.context.trace_id == roots[0].context.trace_id]
        if len(found) >= count or time.monotonic() > deadline:
            by_name: dict[str, list[ReadableSpan]] = {}
            for s in found:
                by_name.setdefault(s.name, []).append(s)
            return by_name
        time.sleep(0.02)


def one_each(spans: dict[str, list[ReadableSpan]]) -> dict[str, ReadableSpan]:
    assert sorted(spans) == sorted([HTTP, RPC, *PHASES]), sorted(spans)
    by_kind = {s.kind: s for s in spans[RPC]}
    assert len(spans[RPC]) == 2 and set(by_kind) == {SpanKind.CLIENT, SpanKind.SERVER}
    out = {name: group[0] for name, group in spans.items() if name != RPC}
    assert all(len(group) == 1 for name, group in spans.items() if name != RPC)
    return {**out, "client": by_kind[SpanKind.CLIENT], "server": by_kind[SpanKind.SERVER]}


def assert_linked(s: dict[str, ReadableSpan]) -> None:
    """One trace id; http -> client -> server -> queue, prefill, decode; each inside its parent."""
    assert len({span.context.trace_id for span in s.values()}) == 1
    chain = [("client", HTTP), ("server", "client")] + [(p, "server") for p in PHASES]
    for child, parent in chain:
        assert s[child].parent.span_id == s[parent].context.span_id, (child, parent)
        assert s[parent].start_time <= s[child].start_time <= s[child].end_time <= s[parent].end_time, (child, parent)
    assert s["server"].parent.is_remote and not s["client"].parent.is_remote
    queue, prefill, decode = (s[p] for p in PHASES)
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time


def assert_usage_matches(s: dict[str, ReadableSpan], usage: dict, max_tokens: int) -> None:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert completion == max_tokens
    assert dict(s["engine.prefill"].attributes) == {"moeserve.prompt_tokens": prompt, "moeserve.cached_tokens": cached,
                                                    "moeserve.prefill_tokens": prompt - cached}
    decode = s["engine.decode"].attributes
    assert decode["moeserve.completion_tokens"] == completion and decode["moeserve.decode_steps"] == completion - 1
    assert decode["moeserve.reasoning_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"]
    server = s["server"].attributes
    assert (server["gen_ai.usage.input_tokens"], server["gen_ai.usage.output_tokens"]) == (prompt, completion)


def assert_rpc(span: ReadableSpan, code: int) -> None:
    a = span.attributes
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", "moeserve.engine.v1.Engine",
                                                                    "StreamGenerate")
    assert a["rpc.grpc.status_code"] == code


# --- one trace per request ----------------------------------------------------------------

def test_a_chat_completion_is_one_trace_from_http_span_to_engine_phases(gateway_url, exporter):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Trace me"}], "max_tokens": 5}
    status, request_id, raw = chat(gateway_url, body, {})
    assert status == 200
    s = one_each(trace_of(exporter, request_id, 6))
    assert_linked(s)
    assert s[HTTP].parent is None and s[HTTP].kind == SpanKind.SERVER
    assert {k: s[HTTP].attributes[k] for k in ("http.request.method", "http.route", "http.response.status_code")} \
        == {"http.request.method": "POST", "http.route": "/v1/chat/completions", "http.response.status_code": 200}
    assert_rpc(s["client"], 0)
    assert_rpc(s["server"], 0)
    assert s["client"].attributes["server.address"] == "127.0.0.1"
    assert s["server"].attributes["moeserve.request_id"] == request_id
    assert s["server"].attributes["gen_ai.response.id"] == json.loads(raw)["id"]
    assert all(span.status.status_code == StatusCode.UNSET for span in s.values())
    assert_usage_matches(s, json.loads(raw)["usage"], 5)


def test_an_incoming_traceparent_is_the_parent_of_a_streamed_request(gateway_url, exporter):
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=abc"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Follow the caller's trace"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    status, request_id, raw = chat(gateway_url, body, headers)
    assert status == 200
    s = one_each(trace_of(exporter, request_id, 6))
    assert_linked(s)
    assert s[HTTP].context.trace_id == int(trace_id, 16)
    assert s[HTTP].parent.span_id == int(parent_id, 16) and s[HTTP].parent.is_remote
    assert s["server"].context.trace_state.get("vendor") == "abc"  # tracestate travels with the context
    events = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert_usage_matches(s, events[-1]["usage"], 4)


def test_a_request_the_engine_rejects_is_traced_with_its_status(gateway_url, exporter):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Too long for the context"}],
            "max_tokens": 1020}
    status, request_id, _ = chat(gateway_url, body, {})
    assert status == 400
    spans = trace_of(exporter, request_id, 3)
    assert sorted(spans) == sorted([HTTP, RPC]) and len(spans[RPC]) == 2  # no engine phases: it never queued
    client, server = sorted(spans[RPC], key=lambda x: x.kind != SpanKind.CLIENT)
    assert spans[HTTP][0].attributes["http.response.status_code"] == 400
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert_rpc(client, invalid)
    assert_rpc(server, invalid)
    # a caller's mistake fails the client call, not the server (gRPC semantic conventions)
    assert client.status.status_code == StatusCode.ERROR and server.status.status_code == StatusCode.UNSET
    assert spans[HTTP][0].status.status_code == StatusCode.UNSET  # 4xx is not a server error


# --- set-up from the environment ----------------------------------------------------------

@pytest.mark.parametrize("environ", [
    {},
    {"OTEL_SERVICE_NAME": "named-but-not-exported"},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
    {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
])
def test_tracing_is_off_unless_the_environment_configures_it(environ):
    assert tracing.build_provider("moeserve-gateway", environ) is None


def test_without_otel_variables_no_provider_is_installed_and_no_span_made():
    code = ("import os; from moeserve.obs import tracing\n"
            "assert tracing.setup_tracing('moeserve-gateway', os.environ) is None\n"
            "assert not tracing.enabled()\n"
            f"assert tracing.rpc_client_span({RPC!r}, '127.0.0.1:1') is None\n"
            f"assert tracing.rpc_server_span({RPC!r}, [('traceparent', '00-' + '1' * 32 + '-' + '2' * 16 + '-01')], 0)"
            " is None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)


@pytest.mark.parametrize(("environ", "message"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf' is not supported"),
])
def test_a_configuration_that_cannot_be_honoured_is_an_error(environ, message):
    with pytest.raises(tracing.TracingConfigError, match=message):
        tracing.build_provider("moeserve-engine", environ)


def test_the_gateway_refuses_to_start_with_a_bad_tracing_configuration():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, "OTEL_TRACES_EXPORTER": "zipkin"}
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--engine", "127.0.0.1:1", "--no-auth",
                          "--usage-db", temp_usage_db()], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin' "
                                               "(known: otlp, console, none)"]


@pytest.mark.parametrize(("environ", "name"), [
    ({}, "moeserve-engine"),
    ({"OTEL_SERVICE_NAME": "engine-eu-1"}, "engine-eu-1"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=engine%20b"}, "engine b"),
])
def test_spans_reach_an_otlp_collector_under_the_service_name(monkeypatch, environ, name):
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for key in [k for k in os.environ if k.startswith("OTEL_")]:
            monkeypatch.delenv(key)
        # the exporter reads its endpoint from the process environment, as the SDK documents
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
        provider = tracing.build_provider("moeserve-engine", {**environ, **os.environ})
        provider.get_tracer("test").start_span("exported").end()
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.stop(None)
    [resource_spans] = [rs for req in collector.requests for rs in req.resource_spans]
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == name
    assert [s.name for ss in resource_spans.scope_spans for s in ss.spans] == ["exported"]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 - the generated service's name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()
