"""`scripts.generate --stream`'s printer: each request's text as its tokens come, one request after another
(`StreamPrinter`), detokenized incrementally by serve/detokenize.py's `IncrementalText` and cut at the request's
stop strings (serve/stop_strings.py's `TextStream`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from serve.detokenize import REPLACEMENT, IncrementalText
from serve.stop_strings import TextStream

__all__ = ["REPLACEMENT", "IncrementalText", "StreamPrinter"]


class StreamPrinter:
    """`--stream`: each request's text printed as its tokens come, in input order: the first unfinished request
    streams live while the later ones (served at the same time) are held, and each is printed, caught up, when
    the one before it finishes. Text is detokenized incrementally (`IncrementalText`): a character split over
    several tokens is printed once whole, and nothing from a stop string on (`stops[i]`: request i's stop strings)
    is printed. Without a tokenizer the token ids are printed."""

    def __init__(self, items: list, decode: Callable[[list[int]], str] | None,
                 stops: Sequence[Sequence[str]] | None = None, out: TextIO | None = None):
        from serve.engine import Completion

        self.items, self.decode, self.out = items, decode, out or sys.stdout
        stops = stops if stops is not None and decode else [()] * len(items)
        self.texts = [None if isinstance(item, Completion) else
                      TextStream(decode if decode else _ids_text, st, item.prompt_ids)
                      for item, st in zip(items, stops, strict=True)]
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
