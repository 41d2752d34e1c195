"""The gRPC service: decode the request, call the engine, encode the answer.

Errors map to status codes in one place (`_status_of`): invalid input INVALID_ARGUMENT,
a full queue RESOURCE_EXHAUSTED, a dead engine UNAVAILABLE, anything else INTERNAL with
a one-line message (never a stack trace).
"""

from __future__ import annotations

import functools
import logging

import grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc

from engine.async_engine import AsyncEngine
from engine.errors import EngineDead, InvalidRequest, QueueFull
from engine.sampling_params import MAX_LOGPROBS
from engine.tokenizer import Tokenizer

from .convert import ResponseBuilder, request_from_proto, stream_to_proto
from .metrics import EngineMetrics
from .observe import RequestRecord

log = logging.getLogger(__name__)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineDead):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.exception("unexpected error in a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


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

    async def _outputs(self, msg: pb.GenerateRequest, context):
        """The request's outputs from the engine, observed for metrics however the stream ends."""
        record = RequestRecord(msg.request_id)
        try:
            req = request_from_proto(msg, self.tokenizer)
            record.request_id = req.request_id
            async for out in self.engine.generate(req):
                record.on_output(out)
                yield req, out
        except Exception as exc:
            record.on_error(exc)
            raise
        finally:
            record.end()
            self.metrics.record(record)

    @maps_stream_errors
    async def StreamGenerate(self, request, context):
        first = True
        async for _, out in self._outputs(request, context):
            yield stream_to_proto(out, first)
            first = False

    @maps_errors
    async def Generate(self, request, context):
        builder = None
        async for req, out in self._outputs(request, context):
            builder = builder or ResponseBuilder(req.request_id, req.params.n)
            builder.add(out)
        return builder.msg

    @maps_errors
    async def GetModelInfo(self, request, context):
        info, stats = self.engine.info, self.engine.stats()
        cfg = info.config
        return pb.ModelInfo(
            served_model_name=self.name, max_model_len=cfg.max_model_len, vocab_size=info.vocab_size,
            capabilities=pb.Capabilities(chat=True, tools=True, reasoning=True, logprobs=True,
                                         max_top_logprobs=MAX_LOGPROBS),
            kv_cache=pb.KvCacheInfo(block_size=cfg.block_size, total_blocks=cfg.num_blocks, used_blocks=stats.used_blocks,
                                    capacity_tokens=cfg.capacity_tokens),
            dtype=info.dtype, device=info.device,
            max_num_seqs=cfg.scheduler.max_num_seqs, waiting_requests=stats.waiting, running_requests=stats.running)
