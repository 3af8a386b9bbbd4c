"""Text of a token stream as it grows: incremental, UTF-8-safe detokenization (for `scripts.generate --stream` and
the server's streamed responses). It needs only a `decode(ids) -> str` callable, no tokenizer class.

Decoding token by token goes wrong two ways: a character split over several tokens (a byte tokenizer's multi-byte
character, a byte-level BPE's emoji) decodes to U+FFFD halves, and tokenizers that drop a word's leading space at
the start of a text decode one token alone differently from the same token in context. So, as vLLM does, each new
token decodes a short window of the tokens before it, with and without it, and the text it adds is the difference;
while that difference ends in U+FFFD (an incomplete character) nothing is emitted and the window grows until the
character completes. `finish()` emits whatever is left, incomplete characters included, so the concatenated pieces
always equal the decode of the whole output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Feed tokens with `push`; each call returns the new complete text (maybe ""). `context` is the tail of the
    prompt to decode the first output tokens against (for tokenizers whose decode depends on what precedes)."""

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = (), context_tokens: int = 5):
        self.decode = decode
        self.ids = [int(t) for t in context][-context_tokens:] if context_tokens else []
        self.prefix = 0                # window start: tokens before it are done with
        self.read = len(self.ids)      # tokens up to here have had their text emitted
        self.emitted: list[str] = []

    def _delta(self) -> tuple[str, str]:
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        after = self.decode(self.ids[self.prefix:])
        return before, after

    def push(self, token: int) -> str:
        """Add `token`; the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        before, after = self._delta()
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted.append(piece)
        return piece

    def finish(self) -> str:
        """The text not emitted yet (an incomplete character at the end decodes as U+FFFD); call once, at the end."""
        if self.read == len(self.ids):
            return ""
        before, after = self._delta()
        piece = after[len(before):]
        self.prefix = self.read = len(self.ids)
        self.emitted.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self.emitted)
