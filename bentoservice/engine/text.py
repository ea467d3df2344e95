"""Incremental detokenisation with stop strings: stream only text that can no longer change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class TextTracker:
    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to send (sets `stopped` on a stop string)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at != -1:
                text, self.stopped = text[:at], True
        if not self.stopped:
            text = text[: len(text) - self._held(text)]
        return self._advance(text)

    def flush(self) -> str:
        """At the end: whatever was held back (a partial stop string that never completed)."""
        return "" if self.stopped else self._advance(self.decode(self.ids))

    def _held(self, text: str) -> int:
        """How many trailing characters to hold: an unfinished UTF-8 character or a partial stop string."""
        if text.endswith("\ufffd"):
            return 1
        return max((n for stop in self.stop for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
                   default=0)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
