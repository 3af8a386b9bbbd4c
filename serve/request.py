"""What a request is (`Request`, `SamplingParams`), the one record the scheduler keeps for it while it is served
(`RequestState`), and the caller's view of that record (`Completion`; `rejected`: a refused request's).

A request's tokens are its prompt followed by its outputs; `num_computed` of them have K/V in the cache. With the
engine's overlap of host and device work, the token sampled by the step in flight is not known yet: it is held in
`output_ids` as a placeholder (`PENDING`) until the next step reads it back, and `token_ids` -- what callers
see -- stops before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve.request_checks import RequestError

PENDING = -1  # an output token sampled by a step whose result has not been read back yet


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = no cut; `seed` None = derived from the engine seed and request order;
    min_p 0 = no cut (serve/sampling.py)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate: up to `max_new_tokens` after `prompt_ids`, stopping early at any of `stop_ids`. With
    `logprobs` k (0..20), each output token comes with its log-probability and the k most likely ids'."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()
    request_id: str | None = None
    logprobs: int | None = None


@dataclasses.dataclass(eq=False)  # identity equality: two requests with equal fields are still two requests
class RequestState:
    """One request on the host, from arrival to its last token: ids, tokens, status, finish reason, counters."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()
    arrival_s: float = 0.0
    logprobs: int | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    # with `logprobs`: per output token read back, (its log-probability, ((id, log-probability), ...) top first)
    output_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = dataclasses.field(default_factory=list)
    token_times_s: list[float] = dataclasses.field(default_factory=list)  # when each output was read back
    num_computed: int = 0  # tokens (of prompt + outputs) with K/V in the cache
    block_table: list[int] = dataclasses.field(default_factory=list)  # page ids, in token order
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None  # "stop" | "length" | "error" | "aborted"
    error: str | None = None
    num_preemptions: int = 0
    admitted_at: int = -1  # admission counter: higher = admitted more recently; -1 = never admitted
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (at the latest admission)
    block_keys: list = dataclasses.field(default_factory=list)  # prefix-cache keys of full blocks, as far as known
    num_registered: int = 0  # blocks of block_table registered in the prefix cache
    num_drafted: int = 0  # speculative decoding: tokens drafted for this request, and accepted by the target
    num_accepted: int = 0
    num_draft_computed: int = 0  # tokens with K/V in a draft model's cache (serve/draft_model.py)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Output tokens sampled but not read back yet (0 or 1)."""
        return int(bool(self.output_ids) and self.output_ids[-1] == PENDING)

    @property
    def token_ids(self) -> list[int]:
        """The outputs read back so far."""
        return self.output_ids[:len(self.output_ids) - self.num_pending]


class Completion:
    """A request's result and timings (seconds on `time.perf_counter`'s clock): a view of its `RequestState`,
    finished once its last token has been read back."""

    def __init__(self, request_id: str, prompt_ids: list[int], *, finish_reason: str | None = None,
                 error: str | None = None, arrival_s: float = 0.0, state: RequestState | None = None):
        """A result with no state behind it (a request refused before it was queued), or the view of `state`."""
        if state is None:
            state = RequestState(request_id, list(prompt_ids), 0, arrival_s=arrival_s, status="finished",
                                 finish_reason=finish_reason, error=error)
        self.state = state

    @classmethod
    def of(cls, state: RequestState) -> Completion:
        return cls(state.request_id, state.prompt_ids, state=state)

    request_id = property(lambda self: self.state.request_id)
    prompt_ids = property(lambda self: self.state.prompt_ids)
    token_ids = property(lambda self: self.state.token_ids, doc="The output tokens read back so far.")
    error = property(lambda self: self.state.error)
    arrival_s = property(lambda self: self.state.arrival_s)
    token_times_s = property(lambda self: self.state.token_times_s)
    num_preemptions = property(lambda self: self.state.num_preemptions)
    num_cached_tokens = property(lambda self: self.state.num_cached_tokens)
    num_drafted = property(lambda self: self.state.num_drafted)
    num_accepted = property(lambda self: self.state.num_accepted)

    @property
    def finish_reason(self) -> str | None:
        """None while tokens may still come (its last one may be in flight)."""
        return None if self.state.num_pending else self.state.finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        """Time from arrival to the first output token."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        times = self.token_times_s
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None

    def __repr__(self) -> str:
        return (f"Completion(request_id={self.request_id!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r}, error={self.error!r})")


def rejected(error: RequestError, request: object = None) -> Completion:
    """The result of a request refused before serving: finish_reason "error", the error's text and id, and the
    prompt of `request` when it has one (a list or tuple of `prompt_ids`)."""
    prompt = getattr(request, "prompt_ids", None)
    return Completion(error.request_id, list(prompt) if isinstance(prompt, (list, tuple)) else [],
                      finish_reason="error", error=str(error))


def report_finished(ids: Sequence[str | None], results: Sequence[Completion | None], reported: set[int],
                    on_finish: Callable[[Completion], None]) -> None:
    """Call `on_finish` once for each submitted request (its id not None) whose result has finished; `reported`
    holds the indices already reported, and gains the new ones."""
    for i, rid in enumerate(ids):
        result = results[i]
        if rid is not None and i not in reported and result is not None and result.finished:
            reported.add(i)
            on_finish(result)
