"""Server-Sent Events as OpenAI streams them: `data: {json}` events, `data: [DONE]` last.

An error after the stream started is one `data: {"error": {...}}` event in OpenAI's error
shape, after which the stream ends (no [DONE]), as OpenAI's SDKs expect.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.errors import ApiError

HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode(obj: dict) -> bytes:
    return b"data: " + dumps(obj).encode() + b"\n\n"


class ChunkFrame:
    """The constant part of a stream's chunks, encoded once: each event then costs the JSON
    of its one choice only (the gateway's per-token work)."""

    def __init__(self, head: dict, include_usage: bool) -> None:
        self.prefix = b"data: " + dumps(head)[:-1].encode() + b',"choices":['
        self.suffix = (b'],"usage":null}' if include_usage else b"]}") + b"\n\n"

    def event(self, choice: dict) -> bytes:
        return self.prefix + dumps(choice).encode() + self.suffix


class SseWriter:
    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**HEADERS, **(headers or {})})

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, events: list[dict]) -> None:
        if events:
            await self.response.write(b"".join(encode(e) for e in events))

    async def send_encoded(self, events: list[bytes]) -> None:
        """Several events in one write: one engine message with n choices is one syscall."""
        if events:
            await self.response.write(b"".join(events))

    async def done(self) -> None:
        await self.response.write(DONE)
        await self.response.write_eof()

    async def error(self, err: ApiError) -> None:
        await self.response.write(encode(err.body()))
        await self.response.write_eof()
