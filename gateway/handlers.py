"""POST /v1/chat/completions and /v1/completions: validate, check limits, run, answer.

Both endpoints share one driver (`_respond`) and differ in a `Format`: how a delta becomes a
chunk's choice, how deltas accumulate, how a finished choice reads. The engine's first
message is awaited before any byte goes out, so errors that come before generation (bad
field, prompt too long, full queues) get their own HTTP status even when streaming.

Billing (gateway.ledger): from the engine's first message on, a `Tally` counts what the
request produced; its record is committed before the answer's last bytes (the usage
chunk and `data: [DONE]`, or the JSON body). A failed commit answers 503 (or an error
event) instead; a request cut off by its client or failed mid-way is recorded with the
tokens produced, as `aborted` or `error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from typing import Protocol

from aiohttp import web
from moeserve.engine.v1 import engine_pb2 as pb

from gateway import responses as r
from gateway.convert import (chat_params, chat_to_proto, completion_params, completion_to_protos,
                             prompt_too_long_for)
from gateway.errors import ApiError, context_exceeded, internal, store_unavailable
from gateway.generate import EngineCall, merged, open_calls, resolve_model
from gateway.ledger import Tally
from gateway.openai_schema import ChatRequest, CompletionRequest, parse_chat, parse_completion
from gateway.sse import ChunkFrame, SseWriter, dumps
from gateway.state import Services, services
from gateway.store import Outcome, StoreUnavailable
from gateway.validate import parse_json

log = logging.getLogger(__name__)


class Format(Protocol):
    """How one endpoint writes its answers; `index` is the choice's index in the answer."""

    chunk_object: str
    object: str

    def chunk_choice(self, index: int, d: pb.ChoiceDelta, choice: r.Choice, job: r.Job) -> dict: ...

    def accumulate(self, d: pb.ChoiceDelta, choice: r.Choice) -> None: ...

    def final_choice(self, index: int, choice: r.Choice, job: r.Job) -> dict: ...


class ChatFormat:
    chunk_object, object = "chat.completion.chunk", "chat.completion"

    def __init__(self, req: ChatRequest) -> None:
        self.want_logprobs = req.top_logprobs is not None

    def chunk_choice(self, index: int, d: pb.ChoiceDelta, choice: r.Choice, job: r.Job) -> dict:
        out = r.chat_chunk_choice(d, choice, job, self.want_logprobs)
        out["index"] = index
        return out

    def accumulate(self, d: pb.ChoiceDelta, choice: r.Choice) -> None:
        r.accumulate_chat(d, choice)

    def final_choice(self, index: int, choice: r.Choice, job: r.Job) -> dict:
        return r.chat_message_choice(index, choice, job, self.want_logprobs)


class CompletionFormat:
    chunk_object = object = "text_completion"

    def __init__(self, req: CompletionRequest) -> None:
        self.want_logprobs = req.logprobs is not None
        self.echo = [p if req.echo else "" for p in req.prompts]
        self.n = req.sampling.n

    def _text(self, index: int, d: pb.ChoiceDelta, choice: r.Choice) -> str:
        text = d.reasoning + d.text
        if not choice.started:
            choice.started, choice.text_offset = True, len(self.echo[index // self.n])
            text = self.echo[index // self.n] + text
        return text

    def chunk_choice(self, index: int, d: pb.ChoiceDelta, choice: r.Choice, job: r.Job) -> dict:
        text = self._text(index, d, choice)
        logprobs = r.legacy_logprobs(d.logprobs, job.tokens_as_ids, choice) if self.want_logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason(d)}

    def accumulate(self, d: pb.ChoiceDelta, choice: r.Choice) -> None:
        choice.content.append(d.reasoning + d.text)
        choice.logprobs.extend(d.logprobs)
        choice.finish = r.finish_reason(d) or choice.finish

    def final_choice(self, index: int, choice: r.Choice, job: r.Job) -> dict:
        echo = self.echo[index // self.n]
        choice.text_offset = len(echo)
        logprobs = r.legacy_logprobs(choice.logprobs, job.tokens_as_ids, choice) if self.want_logprobs else None
        return {"index": index, "text": echo + "".join(choice.content), "logprobs": logprobs,
                "finish_reason": choice.finish}


async def read_json(request: web.Request, limit: int) -> object:
    too_large = ApiError(413, f"The request body is larger than {limit} bytes", code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    return parse_json(body)


def _metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The request id and W3C trace context travel to the engine as gRPC metadata. The
    caller's trace context is passed on as it came; when the gateway traces, each call
    carries its own client span's context instead (gateway.generate)."""
    out = [("x-request-id", request["request_id"])]
    for name in ("traceparent", "tracestate"):
        value = request.headers.get(name, "")
        if value and value.isascii() and value.isprintable():  # what gRPC metadata may carry
            out.append((name, value))
    return tuple(out)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    s = services(request)
    req = parse_chat(await read_json(request, s.max_body_bytes))
    card = resolve_model(s.pool, req.model)
    max_tokens = req.sampling.max_tokens
    if max_tokens is not None and max_tokens >= card.max_model_len:
        raise context_exceeded(req.max_tokens_param, f"{req.max_tokens_param}: {max_tokens} leaves no room for the "
                                                     f"prompt in the model's context of {card.max_model_len} tokens")
    job = r.Job(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model, req.output.tokens_as_ids,
                req.output.include_usage)
    protos = [chat_to_proto(req, job.id)]
    return await _respond(request, s, job, ChatFormat(req), protos, chat_params(req), req.sampling.n,
                          req.output.stream)


async def completions(request: web.Request) -> web.StreamResponse:
    s = services(request)
    req = parse_completion(await read_json(request, s.max_body_bytes))
    card = resolve_model(s.pool, req.model)
    for p in req.prompts:
        length = len(p) if isinstance(p, tuple) else 1
        if prompt_too_long_for(req.sampling.max_tokens, length, card.max_model_len):
            param = "prompt" if isinstance(p, tuple) else "max_tokens"
            raise context_exceeded(param, f"{param}: the prompt ({'at least ' if length == 1 else ''}{length} tokens)"
                                          f" plus max_tokens ({req.sampling.max_tokens}) exceed the model's context "
                                          f"of {card.max_model_len} tokens")
    job = r.Job(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model, req.output.tokens_as_ids,
                req.output.include_usage)
    protos = completion_to_protos(req, job.id)
    return await _respond(request, s, job, CompletionFormat(req), protos, completion_params(req), req.sampling.n,
                          req.output.stream)


async def _respond(request: web.Request, s: Services, job: r.Job, fmt: Format,
                   protos: list[pb.GenerateRequest], params: dict[str, str], n: int,
                   stream: bool) -> web.StreamResponse:
    start = time.perf_counter()
    s.metrics.in_flight.inc(1)
    calls: list[EngineCall] = []
    tally: Tally | None = None
    try:
        calls = await open_calls(s.pool, job.model, protos, params, _metadata(request))
        tally = Tally.begin(start, len(calls))
        run = _stream if stream else _unary
        return await run(request, s, job, fmt, calls, n, tally)
    except (asyncio.CancelledError, ConnectionResetError):  # the client went away
        s.metrics.disconnects.inc(1)
        if tally is not None and not tally.recorded:
            tally.recorded = True
            record = _usage_record(request, s, job, tally, Outcome.ABORTED)
            s.ledger.commit_later(request["key"], record)
            s.metrics.record_usage(record, tally.token_gaps)
        raise
    finally:
        for c in calls:
            c.close()
        s.metrics.in_flight.inc(-1)


def _usage_record(request: web.Request, s: Services, job: r.Job, tally: Tally, outcome: Outcome):
    return tally.record(job.id, request["request_id"], request["key"].id, job.model, s.prices.for_model(job.model),
                        outcome)


async def _bill(request: web.Request, s: Services, job: r.Job, tally: Tally, outcome: Outcome) -> dict:
    """Commits the request's record; the usage for the answer. 503 when the store failed."""
    record = _usage_record(request, s, job, tally, outcome)
    tally.recorded = True
    try:
        await s.ledger.commit(request["key"], record)
    except StoreUnavailable:
        log.error("%s %s usage record not written: the store is unavailable", request["request_id"], job.id)
        raise store_unavailable() from None
    usage = tally.usage()
    price = s.prices.for_model(job.model)
    s.metrics.record_usage(record, tally.token_gaps)
    log.info("%s %s key=%s model=%s outcome=%s prompt=%d cached=%d completion=%d cost=%s", request["request_id"],
             job.id, record.key_id, job.model, outcome, usage.prompt_tokens, usage.cached_prompt_tokens,
             usage.completion_tokens, record.cost)
    return r.usage_json(usage, price)


async def _bill_failure(request: web.Request, s: Services, job: r.Job, tally: Tally) -> None:
    """A request that failed mid-way: billed for what it produced; the client gets the failure."""
    if not tally.recorded:
        with contextlib.suppress(ApiError):
            await _bill(request, s, job, tally, Outcome.ERROR)


async def _unary(request: web.Request, s: Services, job: r.Job, fmt: Format, calls: list[EngineCall],
                 n: int, tally: Tally) -> web.Response:
    choices: dict[int, r.Choice] = defaultdict(r.Choice)
    try:
        async with contextlib.aclosing(merged(calls)) as messages:
            async for i, msg in messages:
                tally.observe(i, msg)
                for d in msg.choices:
                    fmt.accumulate(d, choices[i * n + d.index])
    except ConnectionResetError:
        raise
    except Exception:
        await _bill_failure(request, s, job, tally)
        raise
    usage = await _bill(request, s, job, tally, tally.finished_outcome())
    body = r.answer(job, fmt.object, [fmt.final_choice(k, choices[k], job) for k in sorted(choices)], usage)
    return web.json_response(body, dumps=dumps, headers={"X-Request-Id": request["request_id"]})


def _empty(choice: dict) -> bool:
    """A chunk choice with nothing in it (a token that ended mid-character): not sent."""
    if choice["finish_reason"] is not None:
        return False
    logprobs = choice["logprobs"]
    if logprobs and (logprobs.get("content") or logprobs.get("tokens")):
        return False
    return not choice.get("delta") and not choice.get("text")


async def _stream(request: web.Request, s: Services, job: r.Job, fmt: Format, calls: list[EngineCall],
                  n: int, tally: Tally) -> web.StreamResponse:
    sse = SseWriter(request, {"X-Request-Id": request["request_id"]})
    await sse.start()
    frame = ChunkFrame(r.head(job, fmt.chunk_object), job.include_usage)
    choices: dict[int, r.Choice] = defaultdict(r.Choice)
    try:
        async with contextlib.aclosing(merged(calls)) as messages:
            async for i, msg in messages:
                tally.observe(i, msg)
                parts = (fmt.chunk_choice(i * n + d.index, d, choices[i * n + d.index], job) for d in msg.choices)
                await sse.send_encoded([frame.event(p) for p in parts if not _empty(p)])
        usage = await _bill(request, s, job, tally, tally.finished_outcome())
        if job.include_usage:
            await sse.send([{**r.chunk(job, fmt.chunk_object, []), "usage": usage}])
        await sse.done()
    except ApiError as err:
        log.warning("%s stream failed: %s", request["request_id"], err.message)
        await _bill_failure(request, s, job, tally)
        await sse.error(err)
    except ConnectionResetError:
        raise
    except Exception:  # noqa: BLE001 - the headers are out: the error goes in the stream
        log.exception("%s stream failed", request["request_id"])
        await _bill_failure(request, s, job, tally)
        await sse.error(internal())
    return sse.response
