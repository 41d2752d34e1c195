"""Stop strings matched on streamed text, across chunk boundaries.

A stop string may arrive split over several tokens ("ST" then "OP"), so text that could
still be the start of a stop string is held back until the next chunk decides it.
"""

from __future__ import annotations

from collections.abc import Iterable


def partial_match_len(text: str, patterns: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some pattern.

    That suffix is what a streaming matcher must hold back: the next chunk may complete it.
    """
    best = 0
    for pattern in patterns:
        for k in range(min(len(pattern) - 1, len(text)), best, -1):
            if text.endswith(pattern[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Cuts generated text at the first stop string; the stop string itself is not output."""

    def __init__(self, stops: tuple[str, ...]):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = stops
        self._pending = ""
        self._stopped = False
        self.matched = ""  # the stop string that ended the output, once one has

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string matched); after a match, all is dropped."""
        if self._stopped:
            return "", True
        buf = self._pending + text
        hit = self._first_stop(buf)
        if hit is not None:
            cut, self.matched = hit
            self._stopped, self._pending = True, ""
            return buf[:cut], True
        keep = partial_match_len(buf, self._stops)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of generation (nothing if a stop matched)."""
        out, self._pending = self._pending, ""
        return out

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest stop-string occurrence in `buf`, if any."""
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self._stops) if i >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None
