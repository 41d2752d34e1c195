"""asyncio helpers shared by the engine and the gateway (no torch)."""

from __future__ import annotations

import asyncio


async def wait_for_event(event: asyncio.Event, timeout: float, cut: asyncio.Event | None = None) -> bool:
    """Waits until `event` is set (True), or until `timeout` seconds pass or `cut` is set
    (False, unless `event` was set meanwhile). Used by both services' drains."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (event, cut) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return event.is_set()
