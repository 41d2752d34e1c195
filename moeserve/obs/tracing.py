"""OpenTelemetry traces for the gateway and the engine (no torch): set-up from the standard
`OTEL_*` environment, W3C trace context in gRPC metadata, and the spans both services make.

One request is one trace: the gateway's HTTP server span, its gRPC client span per call,
the engine's gRPC server span and, under it, the engine's `engine.queue`,
`engine.prefill` and `engine.decode` spans. Span names and attributes follow the
OpenTelemetry semantic conventions for HTTP (https://opentelemetry.io/docs/specs/semconv/http/)
and gRPC (https://opentelemetry.io/docs/specs/semconv/rpc/grpc/); trace context crosses
gRPC as the W3C `traceparent`/`tracestate` metadata (https://www.w3.org/TR/trace-context/).

Off unless configured: without `OTEL_TRACES_EXPORTER` or an OTLP endpoint no tracer
provider is installed, `enabled()` is False and the services make no span at all.
"""

from __future__ import annotations

import contextlib
import functools
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_HEADERS = ("traceparent", "tracestate")
REQUEST_ID = "x-request-id"  # the gateway's request id, in metadata and as the span attribute moeserve.request_id
Metadata = tuple[tuple[str, str], ...]

_W3C = TraceContextTextMapPropagator()
_EXPORTERS = ("otlp", "console")
_PROTOCOLS = ("", "grpc")
# gRPC codes that mark a server span as failed; a client span fails on any code but OK.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


class TracingConfigError(ValueError):
    """An OTEL_* variable asks for something this build cannot do; the message names it."""


# --- set-up -----------------------------------------------------------------------------

def exporters_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters the environment asks for; () when tracing is off.

    OTEL_SDK_DISABLED=true turns everything off. OTEL_TRACES_EXPORTER lists exporters
    (otlp, console; none = off); without it an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT
    or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) means otlp. Unlike the SDK's default (otlp),
    nothing is exported when nothing is set."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    listed = environ.get("OTEL_TRACES_EXPORTER", "")
    names = tuple(dict.fromkeys(n.strip().lower() for n in listed.split(",") if n.strip()))
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ("otlp",) if endpoint else ()
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} "
                                 f"(known: {', '.join(_EXPORTERS)}, none)")
    return names


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value:
            if value not in _PROTOCOLS:
                raise TracingConfigError(f"{name}: {value!r} is not supported; the OTLP exporter here speaks grpc "
                                         "(port 4317 of a collector)")
            return


def service_name(default: str, environ: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, else `default`."""
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        return environ["OTEL_SERVICE_NAME"].strip()
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return urllib.parse.unquote(value.strip())
    return default


def build_provider(default_service: str, environ: Mapping[str, str]):
    """An SDK TracerProvider that batches spans to the configured exporters, or None when
    tracing is off. The SDK parts read their own standard variables from the process
    environment: the exporter's endpoint, headers, certificates, timeout and compression
    (OTEL_EXPORTER_OTLP_*), the batching limits (OTEL_BSP_*), other resource attributes."""
    names = exporters_from_env(environ)
    if not names:
        return None
    _check_protocol(environ)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name(default_service, environ)}))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(default_service: str, environ: Mapping[str, str]):
    """Installs the global tracer provider when the environment configures tracing; returns
    it, or None when tracing stays off. Call once, at start-up (the provider flushes its
    spans at exit). Raises TracingConfigError for a variable it cannot honour."""
    provider = build_provider(default_service, environ)
    if provider is not None:
        trace.set_tracer_provider(provider)
    return provider


def enabled() -> bool:
    """Whether a real tracer provider is installed (by setup_tracing, or by a test)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


@functools.cache
def tracer() -> trace.Tracer:
    # A proxy until a provider is installed, then it delegates: safe to cache either way.
    return trace.get_tracer("moeserve")


# --- spans --------------------------------------------------------------------------------

def extract(carrier: Mapping[str, str]) -> Context:
    """The W3C trace context in headers or metadata (an empty context when none or invalid)."""
    return _W3C.extract(carrier)


@contextlib.contextmanager
def current(span: Span) -> Iterator[Span]:
    """Makes `span` the parent of spans started inside; ends it on the way out."""
    with trace.use_span(span, end_on_exit=True):
        yield span


def http_server_span(method: str, route: str | None, path: str, scheme: str, headers: Mapping[str, str]) -> Span:
    """The span of one HTTP request; its parent is the caller's `traceparent`, if any."""
    attributes = {"http.request.method": method, "url.path": path, "url.scheme": scheme}
    if route:
        attributes["http.route"] = route
    return tracer().start_span(f"{method} {route}" if route else method, context=extract(headers),
                               kind=SpanKind.SERVER, attributes=attributes)


def set_http_status(span: Span, status: int) -> None:
    """Records the response status (5xx marks the span failed, as the conventions say)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(StatusCode.ERROR)


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def rpc_client_span(method: str, address: str) -> Span | None:
    """A gRPC client span for `method` ("package.Service/Method") to HOST:PORT, under the
    current span; None when tracing is off."""
    if not enabled():
        return None
    host, _, port = address.rpartition(":")
    attributes = {**_rpc_attributes(method), "server.address": host.strip("[]"), "server.port": int(port)}
    return tracer().start_span(method, kind=SpanKind.CLIENT, attributes=attributes)


def with_trace_context(metadata: Metadata, span: Span | None) -> Metadata:
    """`metadata` carrying `span`'s W3C context instead of any it held (unchanged without a span)."""
    if span is None:
        return metadata
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(span))
    return tuple(kv for kv in metadata if kv[0] not in TRACE_HEADERS) + tuple(carrier.items())


def rpc_server_span(method: str, metadata: Sequence[tuple[str, str]] | None, start_ns: int) -> Span | None:
    """A gRPC server span, child of the W3C context in the call's metadata; None when off."""
    if not enabled():
        return None
    carrier = {k: v for k, v in metadata or () if k in (*TRACE_HEADERS, REQUEST_ID)}
    attributes = _rpc_attributes(method)
    if REQUEST_ID in carrier:
        attributes["moeserve.request_id"] = carrier.pop(REQUEST_ID)
    return tracer().start_span(method, context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes,
                               start_time=start_ns)


def end_rpc_span(span: Span | None, code: grpc.StatusCode, server: bool, message: str = "") -> None:
    """Records the call's status code and ends the span (nothing when tracing is off)."""
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if (code in _SERVER_ERRORS) if server else code != grpc.StatusCode.OK:
        span.set_status(StatusCode.ERROR, message or code.name)
    span.end()


def child_span(parent: Span, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, int | str]) -> None:
    """A finished span under `parent` for a phase measured elsewhere (wall-clock ns)."""
    span = tracer().start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns,
                               attributes=dict(attributes))
    span.end(end_time=max(end_ns, start_ns))
