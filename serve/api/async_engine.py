"""The engine in its own thread. The engine is not thread-safe, so only this thread calls it: requests and aborts
cross to it through a thread-safe queue, and each request's tokens come back to asyncio through its
`RequestStream` (loop.call_soon_threadsafe). The loop: take everything queued (submit, abort); if any request is
unfinished run one engine step and publish each request's new tokens, else block on the queue."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading

from serve.api.metrics import ServerMetrics
from serve.engine import Engine, Request
from serve.request_checks import RequestError

log = logging.getLogger(__name__)
WIRE_REASONS = {"aborted": "abort"}  # the engine's finish reasons -> OpenAI-compatible servers' names


@dataclasses.dataclass
class Update:
    """New output of one request: tokens (with their logprob entries, if asked for), and once finished, why."""

    tokens: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0


class RequestStream:
    """The asyncio side of one engine request: its Updates go, tagged `(index, update)`, into `queue` (which the
    n choices of one HTTP request share). The first Update says the engine took the request (no tokens, no finish
    reason) or refused it (finish_reason "error")."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int = 0):
        self.loop, self.queue, self.index = loop, queue, index


def _deliver(items: list[tuple[asyncio.Queue, tuple[int, Update]]]) -> None:
    for q, item in items:
        q.put_nowait(item)


@dataclasses.dataclass
class _Live:
    stream: RequestStream
    sent: int = 0


class AsyncEngine:
    """Runs `engine` in a daemon thread; `add` and `abort` may be called from any thread (the event loop's)."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._inbox: queue.Queue[tuple] = queue.Queue()
        self._live: dict[str, _Live] = {}
        self._queued = 0  # submits not taken by the engine thread yet
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="meshlm-engine", daemon=True)
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # updates of this iteration, sent together
        self.num_waiting = 0
        self.num_running = 0
        self.error: BaseException | None = None  # why the engine thread stopped, if it failed

    @property
    def model_cfg(self):
        return self.engine.model_cfg

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_queued(self) -> int:
        """Requests not running yet: waiting in the scheduler or still on their way to it."""
        return self.num_waiting + self._queued

    @property
    def num_unfinished(self) -> int:
        return len(self._live) + self._queued

    def start(self) -> AsyncEngine:
        self._publish_load()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    def add(self, request: Request, stream: RequestStream, arrival_s: float | None = None) -> None:
        with self._lock:
            self._queued += 1
        self._inbox.put(("submit", request, stream, arrival_s))

    def abort(self, request_id: str) -> None:
        """End the request now (a client went away): no more updates; its pages are freed."""
        self._inbox.put(("abort", request_id, False))

    def abort_all(self) -> None:
        """End every unfinished request with finish_reason "abort" (a drain that ran out of time)."""
        self._inbox.put(("abort_all",))

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._take_inbox(block=not self.engine.has_unfinished):
                    return
                self._flush()
                if self.engine.has_unfinished:
                    self.engine.step()
                    self._publish()
                    self._flush()
                self._publish_load()
        except BaseException as e:  # the engine's state is unknown now: fail every request, report unhealthy
            log.exception("the engine thread stopped")
            self.error = e
            for rid, live in list(self._live.items()):
                self._put(live.stream, Update([], finish_reason="error", error=f"the engine failed: {e!r}"))
                del self._live[rid]
            self._flush()

    def _take_inbox(self, block: bool) -> bool:
        """Carry out everything queued (waiting for one item if `block`); False on stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "submit":
                self._submit(*item[1:])
            elif kind == "abort":
                self._abort(item[1], notify=item[2])
            elif kind == "abort_all":
                for rid in list(self._live):
                    self._abort(rid, notify=True)

    def _submit(self, request: Request, stream: RequestStream, arrival_s: float | None) -> None:
        with self._lock:
            self._queued -= 1
        try:
            rid = self.engine.submit(request, arrival_s=arrival_s)
        except RequestError as e:
            self._put(stream, Update([], finish_reason="error", error=str(e)))
            return
        self._live[rid] = _Live(stream)
        self._put(stream, Update([]))

    def _abort(self, rid: str, notify: bool) -> None:
        live = self._live.pop(rid, None)
        if live is None:
            return
        self.engine.abort(rid)
        if notify:
            self._send(rid, live, finished=True)
        self._finished(rid)

    def _publish(self) -> None:
        for rid, live in list(self._live.items()):
            c = self.engine.completions[rid]
            finished = c.finished
            if finished or len(c.token_ids) > live.sent:
                self._send(rid, live, finished)
            if finished:
                del self._live[rid]
                self._finished(rid)

    def _send(self, rid: str, live: _Live, finished: bool) -> None:
        c = self.engine.completions[rid]
        tokens = c.token_ids
        new = tokens[live.sent:]
        logprobs = getattr(c.state, "output_logprobs", None)
        reason = c.state.finish_reason if finished else None
        self._put(live.stream, Update(new, logprobs[live.sent:len(tokens)] if logprobs else None,
                               WIRE_REASONS.get(reason, reason), c.error, c.num_cached_tokens))
        live.sent = len(tokens)

    def _put(self, stream: RequestStream, update: Update) -> None:
        self._outbox.setdefault(stream.loop, []).append((stream.queue, (stream.index, update)))

    def _flush(self) -> None:
        """Hand this iteration's updates to their event loops: one wake-up per loop, not one per request."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(_deliver, items)
        self._outbox = {}

    def _finished(self, rid: str) -> None:
        """Record the request's metrics and let the engine forget it (a server runs for ever)."""
        c = self.engine.forget(rid)
        if c is None:
            return
        self.metrics.observe_finished(prompt_tokens=len(c.prompt_ids), output_tokens=len(c.token_ids),
                                      cached_tokens=c.num_cached_tokens, preemptions=c.num_preemptions,
                                      arrival_s=c.arrival_s, token_times_s=list(c.token_times_s),
                                      finish_reason=WIRE_REASONS.get(c.state.finish_reason, c.state.finish_reason))

    def _publish_load(self) -> None:
        s = self.engine.scheduler
        self.num_waiting, self.num_running = s.num_waiting, s.num_running
        self.metrics.load(running=s.num_running, waiting=s.num_waiting, pages_used=self.engine.allocator.num_used,
                          pages_total=self.engine.allocator.num_usable)
        if self.engine.cfg.speculative is not None:
            self.metrics.speculation(**dataclasses.asdict(self.engine.speculation))
