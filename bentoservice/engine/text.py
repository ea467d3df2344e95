"""Incremental detokenisation with stop strings: stream only text that can no longer change.

Each new token is decoded in a short window of the tokens before it (as vLLM does), so the cost of a
token does not grow with the length of the reply; the text is the same as decoding every id at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TextTracker:
    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text of ids[:read]
    sent: int = 0  # characters of `text` already released
    stopped: bool = False
    prefix: int = 0  # ids[prefix:read] decode to the end of `text`: the window's context
    read: int = 0

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to send (sets `stopped` on a stop string)."""
        self.ids.append(token)
        self._extend(force=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever was held back (a partial stop string or character that never completed)."""
        if self.stopped:
            return ""
        self._extend(force=True)
        return self._release(final=True)

    def _extend(self, force: bool) -> None:
        if self.read == len(self.ids):
            return
        context = self.decode(self.ids[self.prefix : self.read])
        window = self.decode(self.ids[self.prefix :])
        # An unfinished UTF-8 character decodes to U+FFFD: wait for the tokens that complete it.
        if len(window) > len(context) and (force or not window.endswith("\ufffd")):
            self.text += window[len(context) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                text, self.stopped = text[:at], True
        if not (self.stopped or final):
            text = text[: len(text) - self._held(text)]
        if len(text) <= self.sent:
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def _held(self, text: str) -> int:
        """How many trailing characters to hold: a partial stop string."""
        return max((n for stop in self.stop for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), default=0)
