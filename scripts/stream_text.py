"""Text of a token stream as it grows, for `scripts.generate --stream`: incremental, UTF-8-safe detokenization.

Decoding token by token goes wrong two ways: a character split over several tokens (a byte tokenizer's multi-byte
character, a byte-level BPE's emoji) decodes to U+FFFD halves, and tokenizers that drop a word's leading space at
the start of a text decode one token alone differently from the same token in context. So, as vLLM does, each new
token decodes a short window of the tokens before it, with and without it, and the text it adds is the difference;
while that difference ends in U+FFFD (an incomplete character) nothing is emitted and the window grows until the
character completes. `finish()` emits whatever is left, incomplete characters included, so the concatenated pieces
always equal the decode of the whole output. `StreamPrinter` prints a batch's streams one request after another.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

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


class StreamPrinter:
    """`--stream`: each request's text printed as its tokens come, in input order: the first unfinished request
    streams live while the later ones (served at the same time) are held, and each is printed, caught up, when
    the one before it finishes. Text is detokenized incrementally (`IncrementalText`): a character split over
    several tokens is printed once whole. Without a tokenizer the token ids are printed."""

    def __init__(self, items: list, decode: Callable[[list[int]], str] | None, out: TextIO | None = None):
        from serve.engine import Completion

        self.items, self.decode, self.out = items, decode, out or sys.stdout
        self.texts = [None if isinstance(item, Completion) else
                      IncrementalText(decode if decode else _ids_text, item.prompt_ids) for item in items]
        self.held: list[list[str]] = [[] for _ in items]
        self.done = [isinstance(item, Completion) for item in items]
        self.seen = [0] * len(items)
        self.by_id: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if not self.done[i]:
                self.by_id.setdefault(item.request_id, []).append(i)
        self.current = -1
        self._advance()

    def _index(self, rid: str) -> int | None:
        return next((i for i in self.by_id.get(rid, ()) if not self.done[i]), None)

    def _write(self, i: int, piece: str) -> None:
        if not piece:
            return
        if i == self.current:
            self.out.write(piece)
            self.out.flush()
        else:
            self.held[i].append(piece)

    def _header(self, i: int) -> str:
        item = self.items[i]
        if self.texts[i] is None:
            return "=" * 72 + f"\n[error: {item.error}]\n"
        prompt = self.decode(list(item.prompt_ids)) if self.decode else str(list(item.prompt_ids))
        return "=" * 72 + "\n" + prompt

    def _advance(self) -> None:
        """Move to the next request: print it (what it has so far), and go on past every finished one."""
        while self.current + 1 < len(self.items):
            self.current += 1
            i = self.current
            self.out.write(self._header(i) + "".join(self.held[i]))
            self.held[i] = []
            if not self.done[i]:
                self.out.flush()
                return
            if self.texts[i] is not None:
                self.out.write("\n")
        self.out.write("=" * 72 + "\n")
        self.out.flush()

    def on_token(self, rid: str, token: int) -> None:
        i = self._index(rid)
        if i is not None:
            self.seen[i] += 1
            self._write(i, self.texts[i].push(token))

    def on_finish(self, c) -> None:
        i = self._index(c.request_id)
        if i is None:
            return
        for token in c.token_ids[self.seen[i]:]:  # tokens no callback brought (static batching, an error)
            self.on_token(c.request_id, token)
        self._write(i, self.texts[i].finish())
        if c.error is not None:
            self._write(i, f"[error: {c.error}]")
        self.done[i] = True
        if i == self.current:
            self.out.write("\n")
            self._advance()


def _ids_text(ids: list[int]) -> str:
    return "".join(f" {t}" for t in ids)
