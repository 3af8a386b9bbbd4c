"""Stop strings: a request ends when its generated text contains one of them, and its output ends right before it.

Text arrives in pieces (each token's detokenized text), and a stop string may span several of them ("User:" as
"Us" + "er:"), so `StopStrings` holds back any text at the end that could still become the start of a stop
string, and releases it once it cannot (or at `finish()`, when the request ends for another reason). The text
released is always a prefix of the output that contains no stop string; when a stop string completes, everything
before it is released, the stop string and what follows are dropped, and `stopped` tells the caller to end the
request. `TextStream` puts the incremental detokenizer and the stop strings together: tokens in, text out.
Pure Python: the engine, the server and `scripts.generate` all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from model.checks import shown
from serve.detokenize import IncrementalText

MAX_STOP_STRINGS = 16


def stop_strings_problem(value: Any) -> str | None:
    """Why `value` is not a valid list of stop strings (None if it is): a string or a list of at most
    `MAX_STOP_STRINGS` non-empty strings."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)):
        return f"stop must be a string or a list of strings, got {shown(value)}"
    if len(stops) > MAX_STOP_STRINGS:
        return f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed"
    for i, stop in enumerate(stops):
        if not isinstance(stop, str):
            return f"stop[{i}] must be a string, got {shown(stop)}"
        if not stop:
            return f"stop[{i}] is empty: a stop string needs at least one character"
    return None


class StopStrings:
    """Feed text with `push`; each call returns the text that is now safe to show (maybe ""). After a stop string
    completes, `stopped` is True, `matched` is the stop string, and every later push returns ""."""

    def __init__(self, stops: Sequence[str] | str):
        problem = stop_strings_problem(stops)
        if problem is not None:
            raise ValueError(problem)
        self.stops = (stops,) if isinstance(stops, str) else tuple(stops)
        self.held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        """Add `text`; the output text it releases."""
        if self.stopped or not text:
            return ""
        buffer = self.held + text
        found = [(at + len(s), at, s) for s in self.stops if (at := buffer.find(s)) >= 0]
        if found:
            _, at, stop = min(found)  # the first to complete (as streaming one character at a time would find)
            self.matched, self.held = stop, ""
            return buffer[:at]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def _partial_suffix(self, buffer: str) -> int:
        """The length of the longest end of `buffer` that is the start of some stop string (and not all of it)."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def finish(self) -> str:
        """The held text: the request ended for another reason (length, a stop token), so it is output after all."""
        held, self.held = ("", "") if self.stopped else (self.held, "")
        return held


def truncate_at_stop(text: str, stops: Sequence[str] | str) -> tuple[str, str | None]:
    """`text` cut right before the first stop string to complete in it, and that stop string (None if there is
    none): what streaming `text` through `StopStrings`, in pieces of any sizes, outputs."""
    matcher = StopStrings(stops)
    out = matcher.push(text)
    return (out, matcher.matched) if matcher.stopped else (out + matcher.finish(), None)


class TextStream:
    """A request's output text as its tokens come: detokenized incrementally (`IncrementalText`) and cut at its
    stop strings (`StopStrings`). `push(token)` returns the new text to send; when `stopped` turns True the caller
    ends the request (its later tokens are ignored). `finish()` returns the rest when the request ends."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (), context: Sequence[int] = ()):
        self.detokenizer = IncrementalText(decode, context)
        self.stops = StopStrings(stops) if stops else None
        self.pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stops is not None and self.stops.stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.matched if self.stops is not None else None

    def _out(self, text: str) -> str:
        if self.stops is not None:
            text = self.stops.push(text)
        if text:
            self.pieces.append(text)
        return text

    def push(self, token: int) -> str:
        """Add `token`; the text it releases (maybe "")."""
        if self.stopped:
            return ""
        return self._out(self.detokenizer.push(token))

    def finish(self) -> str:
        """The text still held (an incomplete character, a possible stop string's start); call once, at the end."""
        if self.stopped:
            return ""
        text = self._out(self.detokenizer.finish())
        if self.stops is not None and not self.stopped:
            rest = self.stops.finish()
            if rest:
                self.pieces.append(rest)
            text += rest
        return text

    @property
    def text(self) -> str:
        """Everything output so far."""
        return "".join(self.pieces)
