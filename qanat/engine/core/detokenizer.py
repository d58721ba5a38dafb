"""Incremental, UTF-8 safe detokenization with stop strings matched across token boundaries."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns tokens into text as they arrive.

    Never emits half of a multi-byte character: the incremental UTF-8 decoder keeps an incomplete
    sequence until its last byte arrives. Never emits a stop string, nor text that might be the start
    of one: that tail is held back until the next token settles it.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""  # everything decoded so far (may run past a stop string)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        start = len(self.text)
        self.text += self._decoder.decode(self._token_bytes(token_id))
        if not self._stop:
            return self._emit(len(self.text))
        # A stop string that ends in the new text may begin up to max_stop_len - 1 characters earlier.
        search_from = max(0, start - self._max_stop_len + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: whatever was held back (no stop string completed).

        Bytes of a character cut off by max_tokens are dropped, not turned into U+FFFD.
        """
        if self.stopped:
            return ""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        piece = self.text[self._emitted : end]
        self._emitted = end
        return piece
