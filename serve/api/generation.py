"""One HTTP generation request on the engine: its n choices submitted as n engine requests, their updates turned
into text (serve/stop_strings.py's TextStream: detokenized, stop strings held back and cut) and into OpenAI's
response objects: a whole response, or a stream of chunks (server-sent events) with exactly one finish_reason per
choice and, if asked, a usage chunk last."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve.api.async_engine import AsyncEngine, RequestStream, Update
from serve.api.protocol import APIError, Generation
from serve.engine import Request, SamplingParams
from serve.stop_strings import TextStream

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
REQUEST_FIELDS = {f.name for f in dataclasses.fields(Request)}


@dataclasses.dataclass
class Choice:
    """One choice's progress: its text, tokens counted, logprob entries not sent yet, and finish reason."""

    index: int
    text: TextStream
    request_id: str
    num_tokens: int = 0
    logprobs: list = dataclasses.field(default_factory=list)  # (token, logprob, ((token, logprob), ...))
    finish_reason: str | None = None
    text_offset: int = 0  # where the next token's text starts (completions' logprobs.text_offset)


def engine_requests(gen: Generation, prompt_ids: list[int], max_tokens: int, stop_ids: tuple[int, ...],
                    base_id: str) -> list[Request]:
    """The n engine requests of `gen` (seeds seed, seed+1, ...: each choice its own reproducible stream)."""
    sampling: dict[str, Any] = {"temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p}
    if gen.min_p:
        if "min_p" not in SAMPLING_FIELDS:
            raise APIError(400, "min_p is not supported by this engine yet", param="min_p")
        sampling["min_p"] = gen.min_p
    extra = {}
    if gen.logprobs is not None:
        if "logprobs" not in REQUEST_FIELDS:
            raise APIError(400, "logprobs are not supported by this engine yet", param="logprobs")
        extra["logprobs"] = gen.logprobs
    return [Request(tuple(prompt_ids), max_tokens, stop_ids,
                    SamplingParams(**sampling, seed=None if gen.seed is None else (gen.seed + i) % 2**32),
                    request_id=f"{base_id}-{i}", **extra) for i in range(gen.n)]


class GenerationRun:
    """The n engine requests of one HTTP request and the text they make."""

    def __init__(self, engine: AsyncEngine, gen: Generation, requests: list[Request], prompt_ids: list[int],
                 decode: Callable[[list[int]], str], model_name: str, arrival_s: float):
        self.engine, self.gen, self.requests, self.prompt_ids = engine, gen, requests, prompt_ids
        self.decode, self.model_name, self.arrival_s = decode, model_name, arrival_s
        self.id = ("chatcmpl-" if gen.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(i, TextStream(decode, gen.stop, prompt_ids), r.request_id)
                        for i, r in enumerate(requests)]
        self.stop_ids = set(requests[0].stop_ids)
        self._queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def start(self) -> None:
        """Submit the choices and wait until the engine has taken them all; raises APIError(400) naming the
        problem if it refused one (the others are aborted)."""
        loop = asyncio.get_running_loop()
        for i, r in enumerate(self.requests):
            self.engine.add(r, RequestStream(loop, self._queue, i), arrival_s=self.arrival_s)
        error = None
        for _ in self.requests:
            i, update = await self._queue.get()
            if update.finish_reason == "error":
                error = update.error
                self.choices[i].finish_reason = "error"
        if error is not None:
            self.abort()
            raise APIError(400, error.split(": ", 1)[-1] if error.startswith("request ") else error)

    def abort(self) -> None:
        """End every unfinished choice in the engine (a client gone, a request refused)."""
        for c in self.choices:
            if c.finish_reason is None:
                self.engine.abort(c.request_id)
                c.finish_reason = "abort"

    async def deltas(self) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, new text) as updates come; a choice's `finish_reason` is set on its last delta."""
        while not self.done:
            i, update = await self._queue.get()
            c = self.choices[i]
            if c.finish_reason is not None:
                continue  # ended by a stop string: the engine's last updates are not wanted
            yield c, self._apply(c, update)

    def _apply(self, c: Choice, u: Update) -> str:
        tokens = list(u.tokens)
        end_token = tokens.pop() if u.finish_reason == "stop" and tokens and tokens[-1] in self.stop_ids else None
        text = []
        for j, token in enumerate(tokens):
            c.num_tokens += 1
            self._log(c, token, u, j)
            text.append(c.text.push(token))
            if c.text.stopped:
                self.engine.abort(c.request_id)
                c.finish_reason = "stop"
                return "".join(text)
        if end_token is not None:
            c.num_tokens += 1
            self._log(c, end_token, u, len(tokens))
        if u.finish_reason is not None:
            text.append(c.text.finish())
            c.finish_reason = u.finish_reason
        return "".join(text)

    def _log(self, c: Choice, token: int, u: Update, j: int) -> None:
        if self.gen.logprobs is not None and u.logprobs is not None and j < len(u.logprobs):
            logprob, top = u.logprobs[j]
            c.logprobs.append((token, float(logprob), tuple(top)))

    # --- the wire format -----------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        out = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": out,
                "total_tokens": len(self.prompt_ids) + out}

    def _token_text(self, token: int) -> str:
        """The token's text, or "token_id:N" (vLLM's form) for a token with no text of its own (a special token, a
        part of a character): logprob keys must tell tokens apart."""
        text = self.decode([token])
        return text if text and "\ufffd" not in text else f"token_id:{token}"

    def logprobs_of(self, c: Choice, chunk: bool) -> dict[str, Any] | None:
        """The logprobs of the entries in `c.logprobs` (emptied), in the chat or the completions format; None
        without logprobs, or for a chunk without tokens."""
        if self.gen.logprobs is None or (chunk and not c.logprobs):
            return None
        entries, c.logprobs = c.logprobs, []
        if self.gen.chat:
            def item(token: int, logprob: float) -> dict[str, Any]:
                text = self._token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                                for t, lp, top in entries]}
        tokens = [self._token_text(t) for t, _, _ in entries]
        offsets, at = [], c.text_offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        c.text_offset = at
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._token_text(a): alp for a, alp in top} for _, _, top in entries],
                "text_offset": offsets}

    def _choice(self, c: Choice, text: str, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        logprobs = self.logprobs_of(c, chunk)
        if not self.gen.chat:
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.gen.chat else "text_completion") + (".chunk" if chunk and self.gen.chat
                                                                               else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices}

    async def response(self, echo_text: str = "") -> dict[str, Any]:
        """The whole response, once every choice has finished."""
        texts = {c.index: [echo_text] for c in self.choices}
        async for c, text in self.deltas():
            texts[c.index].append(text)
        body = self._envelope([self._choice(c, "".join(texts[c.index]), chunk=False) for c in self.choices], False)
        body["usage"] = self.usage()
        return body

    async def events(self, echo_text: str = "") -> AsyncIterator[str]:
        """The stream: server-sent events, one chunk per update with text or a finish reason, then [DONE]."""
        usage = self.gen.include_usage
        started = set()
        if echo_text or self.gen.chat:
            for c in self.choices:
                started.add(c.index)
                yield self._sse(self._envelope([self._choice(c, echo_text, chunk=True, first=True)], True), usage)
        async for c, text in self.deltas():
            if text or c.finish_reason is not None or c.logprobs:
                first = c.index not in started
                started.add(c.index)
                yield self._sse(self._envelope([self._choice(c, text, chunk=True, first=first)], True), usage)
        if usage:
            yield "data: " + json.dumps({**self._envelope([], True), "usage": self.usage()}) + "\n\n"
        yield "data: [DONE]\n\n"

    @staticmethod
    def _sse(body: dict[str, Any], usage: bool) -> str:
        if usage:
            body["usage"] = None
        return "data: " + json.dumps(body) + "\n\n"
