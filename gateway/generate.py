"""Running generation requests on the pool: failover while nothing is out, cancellation always.

Every request is a StreamGenerate call (the unary answer is assembled by the gateway), so
both paths share one way of failing over and of cancelling. A call is opened by reading
its first message: until then nothing was produced, so an engine that is UNAVAILABLE or
whose queue is full (RESOURCE_EXHAUSTED) is skipped for the next-least-loaded replica.
Closing an `EngineCall` cancels the RPC, which aborts the request in the engine.

With tracing on, each call (each replica tried) is a gRPC client span under the request's
HTTP span, and its W3C context goes to the engine in the call's metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.obs import tracing

from gateway.errors import ApiError, from_rpc_error, model_not_found, no_engine, overloaded
from gateway.pool import ENGINE_SERVICE, EnginePool, ModelCard, Replica

STREAM_GENERATE = f"{ENGINE_SERVICE}/StreamGenerate"


def resolve_model(pool: EnginePool, model: str) -> ModelCard:
    """The card of a served model; 404 for a model no ready engine serves, 503 with none ready."""
    card = pool.models().get(model)
    if card is not None:
        return card
    if not pool.ready_replicas():
        raise no_engine()
    raise model_not_found(model)


class EngineCall:
    """One streaming call on one replica, holding a lease on it (and its client span, if
    traced) until closed."""

    def __init__(self, pool: EnginePool, replica: Replica, call, first: pb.GenerateStreamResponse,
                 params: dict[str, str], span: tracing.Span | None = None) -> None:
        self.pool, self.replica, self.call, self.first, self.params = pool, replica, call, first, params
        self.span = span
        self._closed = False
        self._code = grpc.StatusCode.CANCELLED  # until the stream ends by itself

    async def messages(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        msg = self.first
        try:
            while msg is not grpc.aio.EOF:
                yield msg
                msg = await self.call.read()
            self._code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self._code = err.code()
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_down(self.replica, err.details() or "UNAVAILABLE")
            raise from_rpc_error(err, self.params) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.call.cancel()
            self.replica.outstanding -= 1
            tracing.end_rpc_span(self.span, self._code, server=False)


async def open_call(pool: EnginePool, model: str, request: pb.GenerateRequest, params: dict[str, str],
                    metadata: tuple[tuple[str, str], ...] = ()) -> EngineCall:
    tried: set[Replica] = set()
    error: ApiError = no_engine()
    while (replica := pool.pick(model, tried)) is not None:
        tried.add(replica)
        span = tracing.rpc_client_span(STREAM_GENERATE, replica.address)
        call = replica.stub.StreamGenerate(request, metadata=tracing.with_trace_context(metadata, span))
        replica.outstanding += 1
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as err:
            replica.outstanding -= 1
            tracing.end_rpc_span(span, err.code(), server=False, message=err.details() or "")
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                pool.mark_down(replica, err.details() or "UNAVAILABLE")
                error = no_engine(f"the engine at {replica.address} is unavailable")
            elif err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                error = overloaded(err.details() or "RESOURCE_EXHAUSTED")
            else:
                raise from_rpc_error(err, params) from None
            continue
        except BaseException:
            call.cancel()
            replica.outstanding -= 1
            tracing.end_rpc_span(span, grpc.StatusCode.CANCELLED, server=False)
            raise
        if first is grpc.aio.EOF:  # an engine never ends a stream without a message
            replica.outstanding -= 1
            empty = _EmptyStream()
            tracing.end_rpc_span(span, empty.code(), server=False, message=empty.details())
            raise from_rpc_error(empty, params)
        return EngineCall(pool, replica, call, first, params, span)
    raise error


async def open_calls(pool: EnginePool, model: str, requests: Sequence[pb.GenerateRequest], params: dict[str, str],
                     metadata: tuple[tuple[str, str], ...] = ()) -> list[EngineCall]:
    """Opens every call, or none: a failure closes those already open."""
    if len(requests) == 1:
        return [await open_call(pool, model, requests[0], params, metadata)]
    results = await asyncio.gather(*(open_call(pool, model, r, params, metadata) for r in requests),
                                   return_exceptions=True)
    calls = [r for r in results if isinstance(r, EngineCall)]
    if len(calls) < len(results):
        for c in calls:
            c.close()
        raise next(r for r in results if isinstance(r, BaseException))
    return calls


async def merged(calls: list[EngineCall]) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse]]:
    """(call index, message) from all calls as they arrive; closes every call when done or abandoned."""
    try:
        if len(calls) == 1:
            async for msg in calls[0].messages():
                yield 0, msg
            return
        async for item in _interleave(calls):
            yield item
    finally:
        for c in calls:
            c.close()


async def _interleave(calls: list[EngineCall]) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, call: EngineCall) -> None:
        try:
            async for msg in call.messages():
                queue.put_nowait((i, msg))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(calls)]
    try:
        remaining = len(calls)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _EmptyStream(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL

    def details(self) -> str:
        return "the engine ended the stream without a message"
