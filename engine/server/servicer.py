"""The gRPC service: decode the request, call the engine, encode the answer.

Errors map to status codes in one place (`_status_of`): invalid input INVALID_ARGUMENT,
a full queue RESOURCE_EXHAUSTED, a dead engine UNAVAILABLE, anything else INTERNAL with
a one-line message (never a stack trace).

With tracing on (moeserve.obs.tracing), each generation RPC is a server span under the
caller's W3C context, and the engine's phases become its children when the stream ends:
`engine.queue` (queued -> first scheduled), `engine.prefill` (-> first token) and
`engine.decode` (-> finished), timed by the engine process (`RequestTimings`).
"""

from __future__ import annotations

import functools
import logging

import grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc
from moeserve.obs import tracing

from engine.async_engine import AsyncEngine
from engine.errors import EngineDead, InvalidRequest, OutOfMemory, QueueFull
from engine.sampling_params import MAX_LOGPROBS
from engine.tokenizer import Tokenizer

from .convert import ResponseBuilder, request_from_proto, stream_to_proto
from .metrics import EngineMetrics
from .observe import RequestRecord

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Engine"].full_name
_CODES = ((InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT), (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (EngineDead, grpc.StatusCode.UNAVAILABLE))


def _code_of(exc: Exception) -> grpc.StatusCode:
    return next((code for kind, code in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    code = _code_of(exc)
    if code != grpc.StatusCode.INTERNAL:
        return code, str(exc)
    log.exception("unexpected error in a request", exc_info=exc)
    return code, f"internal error: {type(exc).__name__}"


def maps_errors(method):
    """Turns the engine's exceptions into gRPC statuses for unary and streaming methods."""
    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never leaked
            await context.abort(*_status_of(exc))
    return unary


def maps_stream_errors(method):
    @functools.wraps(method)
    async def streaming(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as exc:  # noqa: BLE001
            await context.abort(*_status_of(exc))
    return streaming


class EngineServicer(pb_grpc.EngineServicer):
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, served_model_name: str,
                 metrics: EngineMetrics) -> None:
        self.engine, self.tokenizer, self.name, self.metrics = engine, tokenizer, served_model_name, metrics

    async def _outputs(self, msg: pb.GenerateRequest, context, method: str):
        """The request's outputs from the engine, observed for metrics and traces however the stream ends."""
        record = RequestRecord(msg.request_id)
        span = tracing.rpc_server_span(f"{SERVICE}/{method}", context.invocation_metadata(), record.received_ns)
        code = grpc.StatusCode.OK
        try:
            req = request_from_proto(msg, self.tokenizer)
            record.request_id = req.request_id
            async for out in self.engine.generate(req):
                record.on_output(out)
                yield req, out
        except Exception as exc:
            record.on_error(exc)
            code = _code_of(exc)
            raise
        finally:
            record.end()
            self.metrics.record(record)
            if span is not None:
                _end_trace(span, record, code)

    @maps_stream_errors
    async def StreamGenerate(self, request, context):
        first = True
        async for _, out in self._outputs(request, context, "StreamGenerate"):
            yield stream_to_proto(out, first)
            first = False

    @maps_errors
    async def Generate(self, request, context):
        builder = None
        async for req, out in self._outputs(request, context, "Generate"):
            builder = builder or ResponseBuilder(req.request_id, req.params.n)
            builder.add(out)
        return builder.msg

    @maps_errors
    async def GetModelInfo(self, request, context):
        info, stats = self.engine.info, self.engine.stats()
        cfg, caps = info.config, self.tokenizer.capabilities  # caps: from the checkpoint's template and tokens
        return pb.ModelInfo(
            served_model_name=self.name, max_model_len=cfg.max_model_len, vocab_size=info.vocab_size,
            capabilities=pb.Capabilities(chat=True, tools=caps.tools, reasoning=caps.reasoning, logprobs=True,
                                         max_top_logprobs=MAX_LOGPROBS),
            kv_cache=pb.KvCacheInfo(block_size=cfg.block_size, total_blocks=info.total_blocks,
                                    used_blocks=stats.used_blocks, capacity_tokens=info.total_blocks * cfg.block_size),
            dtype=info.dtype, device=info.device,
            max_num_seqs=cfg.scheduler.max_num_seqs, waiting_requests=stats.waiting, running_requests=stats.running)


def _end_trace(span: tracing.Span, record: RequestRecord, code: grpc.StatusCode) -> None:
    """Ends the server span with the request's outcome and usage, its phases as children."""
    if code == grpc.StatusCode.OK and record.usage is None:  # the stream ended before the request did
        code = grpc.StatusCode.CANCELLED
    span.set_attributes({"moeserve.outcome": str(record.outcome), "gen_ai.response.id": record.request_id})
    if record.usage is not None:
        span.set_attributes({"gen_ai.usage.input_tokens": record.usage.prompt_tokens,
                             "gen_ai.usage.output_tokens": record.usage.completion_tokens})
    _trace_phases(span, record)
    tracing.end_rpc_span(span, code, server=True)


def _trace_phases(span: tracing.Span, record: RequestRecord) -> None:
    """queue, prefill, decode from the engine process's timings (absent for a request that
    never finished there: rejected, failed or cancelled)."""
    t, u = record.timings, record.usage
    if t is None or u is None or not t.queued_ns:
        return
    end = t.finished_ns or record.ended_ns
    tracing.child_span(span, "engine.queue", t.queued_ns, t.scheduled_ns or end, {})
    if t.scheduled_ns:
        tracing.child_span(span, "engine.prefill", t.scheduled_ns, t.first_token_ns or end,
                           {"moeserve.prompt_tokens": u.prompt_tokens, "moeserve.cached_tokens": u.cached_prompt_tokens,
                            "moeserve.prefill_tokens": t.prefill_tokens})
    if t.first_token_ns:
        tracing.child_span(span, "engine.decode", t.first_token_ns, end,
                           {"moeserve.completion_tokens": u.completion_tokens,
                            "moeserve.reasoning_tokens": u.reasoning_tokens, "moeserve.decode_steps": t.decode_steps})
