"""The text of one choice as its tokens come: incremental UTF-8-safe detokenization, then stop strings matched on
that text. Text that could still be the start of a stop string is held back, so a stop string split across tokens
(or across stream chunks) never reaches the client; the stop string itself is not part of the output."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Feed tokens with `push`; each returns the new complete text. Each token decodes a short window of the tokens
    before it with and without it and adds the difference, as vLLM does, so a character split over tokens appears
    once whole. (A shim of scripts/stream_text.py's class until serve/detokenize.py lands.)"""

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = (), context_tokens: int = 5):
        self.decode = decode
        self.ids = [int(t) for t in context][-context_tokens:] if context_tokens else []
        self.prefix = 0
        self.read = len(self.ids)

    def _delta(self) -> tuple[str, str]:
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        return before, self.decode(self.ids[self.prefix:])

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before, after = self._delta()
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def finish(self) -> str:
        if self.read == len(self.ids):
            return ""
        before, after = self._delta()
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class ChoiceText:
    """One choice's output text: `push(token)` and `finish()` return the text that may be sent now; `stopped` is
    True once a stop string matched (the text ends before it; the caller ends the request)."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.detok = IncrementalText(decode, prompt_ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # detokenized so far (up to the stop string once one matched)
        self.sent = 0  # characters of `text` released
        self.stopped = False

    def push(self, token: int) -> str:
        return "" if self.stopped else self._add(self.detok.push(token), final=False)

    def finish(self) -> str:
        """The rest of the text (held-back characters that turned out not to start a stop string)."""
        return "" if self.stopped else self._add(self.detok.finish(), final=True)

    def _add(self, piece: str, final: bool) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        if self.stop:
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
