"""Which tokens of which sequences the next engine step computes (vLLM V1's scheduler, model-free).

A sequence's tokens are its prompt followed by its outputs; `num_computed` of them have K/V in the cache. Each
step gives some sequences a chunk [num_computed, num_computed + n) to compute under one token budget:

1. Running sequences first, oldest admission first. A decoding sequence needs 1 token (its last sampled one); a
   partly prefilled one the rest of its tokens (capped by the budget and `max_prefill_chunk`). If its pages cannot
   be allocated, the most recently admitted running sequence is preempted -- pages freed, `num_computed` reset,
   back to the FRONT of the waiting queue, to be recomputed (prompt + outputs so far) when readmitted -- until
   the allocation succeeds or the sequence itself was the one preempted.
2. Then, if nothing was preempted, waiting sequences are admitted strictly first come first served while
   `max_running`, the budget and free pages allow; admission never preempts. An admitted sequence gets pages for
   its first chunk only; later chunks and decodes grow its block table step by step. With `prefix_caching`, an
   admitted sequence first takes the cached pages of its longest cached run of full blocks
   (`BlockAllocator.lookup`). Those tokens count as computed, and its first chunk starts after them. At least
   one token is always left to compute, so the step samples from its logits. Every block a chunk completes is
   registered for later sequences.

With speculative decoding the engine asks `schedule(lookahead=k)`: a decoding sequence then also gets pages and
budget for up to k drafted tokens after its last one (`ScheduledChunk.lookahead`, vLLM's lookahead slots). Only its
real token counts as computed when the chunk is launched; the drafts the target accepts are added when their step
is read back (`update_from_output`), and the pages past the sequence's new length are freed again (rejected
drafts' K/V sits beyond its length, where nothing reads it and the next tokens overwrite it).

Budget goes in admission order, so an older sequence's long prefill can hold back younger decodes for a step;
`max_prefill_chunk` < `token_budget` keeps room for them. The returned chunks list decodes first.

The engine reports back with `after_step` (the chunk was launched), `sampled` (a chunk reached the end of the known
tokens, so the step samples the next one: its place is held until it is read back), `update_from_output` (the
sampled tokens read back: stop tokens finish their requests) and `finish` (pages freed at once). Each request's one
record is its `RequestState` (serve/request.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from collections.abc import Sequence

from model.checks import check_bool, check_int, check_ints
from serve.block_allocator import BlockAllocator, block_keys
from serve.request import PENDING, RequestState


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + length) of `seq` this step, the last `lookahead` of them slots for drafted
    tokens. `is_decode` is fixed when the chunk is made: one known token, the last sampled output (a 1-token prompt
    or a prompt's 1-token last chunk is a prefill)."""

    seq: RequestState
    start: int
    length: int
    lookahead: int = 0
    is_decode: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 1 or not 0 <= self.lookahead < self.length:
            raise ValueError(f"request {self.seq.request_id!r}: bad chunk start={self.start} length={self.length} "
                             f"lookahead={self.lookahead}")
        decode = (self.length - self.lookahead == 1 and bool(self.seq.output_ids)
                  and self.start == self.seq.num_tokens - 1)
        object.__setattr__(self, "is_decode", decode)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One step's work: `chunks` (decodes first, each group in scheduling order) and the sequences preempted while
    making it (already back in the waiting queue, not scheduled this step)."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[RequestState, ...]

    @property
    def decodes(self) -> tuple[ScheduledChunk, ...]:
        return tuple(c for c in self.chunks if c.is_decode)

    @property
    def prefills(self) -> tuple[ScheduledChunk, ...]:
        return tuple(c for c in self.chunks if not c.is_decode)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """page_size tokens per KV page; at most max_running sequences running and token_budget tokens per step (a
    decode counts 1); max_prefill_chunk caps one prefill chunk (None: the budget is the only cap);
    prefix_caching reuses the pages of full blocks already computed for the same prefix."""

    page_size: int = 16
    max_running: int = 32
    token_budget: int = 512
    max_prefill_chunk: int | None = None
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        check_ints("scheduler.", self, ("page_size", "max_running", "token_budget"))
        if self.max_prefill_chunk is not None:
            check_int("scheduler.max_prefill_chunk", self.max_prefill_chunk)
        check_bool("scheduler.prefix_caching", self.prefix_caching)


class Scheduler:
    """Waiting and running sequences over one page pool (see the module docstring)."""

    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.cfg, self.allocator = cfg, allocator
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []  # in admission order: the last one is the most recently admitted
        self._admissions = itertools.count()

    # --- bookkeeping -------------------------------------------------------------------------------------

    @property
    def waiting(self) -> tuple[RequestState, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[RequestState, ...]:
        return tuple(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def pages_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.cfg.page_size)

    def kv_utilisation(self) -> float:
        """Tokens with K/V stored / token slots in the pages the running sequences hold: how much of the allocated
        cache is in use. 1.0 when no pages are held (nothing allocated, nothing wasted)."""
        slots = sum(len(s.block_table) for s in self._running) * self.cfg.page_size
        return sum(s.num_computed for s in self._running) / slots if slots else 1.0

    def add(self, seq: RequestState) -> None:
        """Queue `seq` (first come first served). Raises ValueError naming it if it is malformed, its id is already
        queued or running, or prompt + max_new_tokens could never fit in the whole pool."""
        rid = seq.request_id
        if not seq.prompt_ids:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if seq.max_new_tokens < 1:
            raise ValueError(f"request {rid!r}: max_new_tokens must be >= 1, got {seq.max_new_tokens}")
        if any(s.request_id == rid for s in (*self._running, *self._waiting)):
            raise ValueError(f"request {rid!r} is already queued or running")
        pages = self.pages_needed(len(seq.prompt_ids) + seq.max_new_tokens)
        if pages > self.allocator.num_usable:
            raise ValueError(f"request {rid!r} needs {pages} pages but the pool has {self.allocator.num_usable}")
        seq.status = "waiting"
        self._waiting.append(seq)

    def after_step(self, chunk: ScheduledChunk) -> None:
        """The engine computed `chunk`: its tokens now have K/V. No-op for a sequence finished since (aborted)."""
        seq = chunk.seq
        if seq.status == "finished":
            return
        if chunk.start != seq.num_computed:
            raise ValueError(f"request {seq.request_id!r}: chunk starts at {chunk.start} but {seq.num_computed} "
                             f"tokens are computed")
        seq.num_computed += chunk.length - chunk.lookahead
        self._register(seq)

    def _register(self, seq: RequestState) -> None:
        """Register the full blocks of `seq`'s computed tokens in the prefix cache."""
        if self.cfg.prefix_caching:
            full = seq.num_computed // self.cfg.page_size
            for i, key in enumerate(self._keys(seq, full)[seq.num_registered:], seq.num_registered):
                self.allocator.register(seq.block_table[i], key)
            seq.num_registered = max(seq.num_registered, full)

    def sampled(self, seq: RequestState) -> None:
        """A step that computed all of `seq`'s known tokens sampled its next one, not read back yet: hold its place
        (`PENDING`), so the next step can be scheduled now. A request that reaches `max_new_tokens` finishes at once
        ("length", its pages freed: the device runs steps in order, so no later step sees them before this one
        is done); its Completion shows it finished once the token is read back."""
        if seq.num_computed != seq.num_tokens:
            raise ValueError(f"request {seq.request_id!r}: a token was sampled after {seq.num_computed} of "
                             f"{seq.num_tokens} tokens were computed")
        seq.output_ids.append(PENDING)
        if len(seq.output_ids) >= seq.max_new_tokens:
            self.finish(seq, "length")

    def update_from_output(self, sampled: list[tuple[RequestState, int | Sequence[int]]], now: float
                           ) -> list[tuple[str, int]]:
        """The sampled tokens of a step, read back: each replaces its request's `PENDING` place; a stop token
        finishes its request (pages freed). Requests aborted meanwhile are skipped. A verified decode gives several
        tokens (its accepted drafts, then one sampled token): the drafts become computed tokens, the request stops
        at a stop token or `max_new_tokens` inside them (the rest is dropped), and pages past its new length are
        freed. Returns the (request id, token) outputs."""
        outputs = []
        for seq, emitted in sampled:
            if not seq.num_pending:
                continue  # aborted since the step was launched
            tokens = [emitted] if isinstance(emitted, int) else list(emitted)
            seq.output_ids.pop()
            for token in tokens:
                seq.output_ids.append(token)
                seq.token_times_s.append(now)
                outputs.append((seq.request_id, token))
                if token in seq.stop_ids and seq.status != "finished":
                    self.finish(seq, "stop")
                if seq.status == "finished":
                    break
                if len(seq.output_ids) >= seq.max_new_tokens:
                    self.finish(seq, "length")
                    break
            if len(tokens) > 1 and seq.status == "running":
                seq.num_computed = seq.num_tokens - 1  # the accepted drafts' K/V is the target's own
                self._register(seq)
                keep = self.pages_needed(seq.num_tokens)
                if len(seq.block_table) > keep:
                    self.allocator.free(seq.block_table[keep:])
                    del seq.block_table[keep:]
        return outputs

    def finish(self, seq: RequestState, reason: str) -> None:
        """`seq` is done (length, stop, aborted, ...): its pages go back to the pool now. An aborted request drops
        the token in flight."""
        if reason == "aborted" and seq.num_pending:
            seq.output_ids.pop()
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        seq.status, seq.finish_reason = "finished", reason

    def abort(self, request_id: str) -> None:
        """Finish the waiting or running request `request_id` with reason "aborted"; unknown ids are ignored (the
        request may have finished already)."""
        for seq in [*self._running, *self._waiting]:
            if seq.request_id == request_id:
                self.finish(seq, "aborted")

    # --- the decision ------------------------------------------------------------------------------------

    def schedule(self, lookahead: int = 0) -> Schedule:
        """This step's chunks under the token budget (see the module docstring for the rules); decodes get up to
        `lookahead` slots for drafted tokens, within their budget and `max_new_tokens`."""
        budget = self.cfg.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[RequestState] = []
        for seq in list(self._running):
            if budget == 0:
                break
            if seq.status != "running":
                continue  # preempted earlier in this loop
            n = self._chunk_length(seq, budget)
            if n == 0:
                continue  # nothing to compute until the engine appends a token
            extra = 0
            if lookahead and n == 1 and seq.output_ids and seq.output_ids[-1] != PENDING:
                extra = max(0, min(lookahead, budget - 1, seq.max_new_tokens - len(seq.output_ids) - 1))
                n += extra
            while not self._grow(seq, seq.num_computed + n):
                victim = self._running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == "running":
                chunks.append(ScheduledChunk(seq, seq.num_computed, n, extra))
                budget -= n
        if not preempted:
            while self._waiting and budget > 0 and len(self._running) < self.cfg.max_running:
                seq = self._waiting[0]
                if self.cfg.prefix_caching:
                    self._take_cached_prefix(seq)
                n = self._chunk_length(seq, budget)
                if not self._grow(seq, seq.num_computed + n):
                    self._release(seq)
                    seq.num_computed = seq.num_registered = seq.num_cached_tokens = 0
                    break  # strictly first come first served: nobody overtakes the head of the queue
                self._waiting.popleft()
                seq.status, seq.admitted_at = "running", next(self._admissions)
                seq.num_draft_computed = 0  # its cached pages may hold another sequence's draft K/V
                self._running.append(seq)
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
        chunks.sort(key=lambda c: not c.is_decode)  # stable: decodes first, each group in scheduling order
        return Schedule(tuple(chunks), tuple(preempted))

    def _keys(self, seq: RequestState, n_blocks: int) -> list:
        """The prefix-cache keys of `seq`'s first `n_blocks` full blocks (computed once per sequence)."""
        keys, ps = seq.block_keys, self.cfg.page_size
        if len(keys) < n_blocks:
            keys += block_keys(seq.all_ids[len(keys) * ps:n_blocks * ps], ps, keys[-1] if keys else None)
        return keys[:n_blocks]

    def _take_cached_prefix(self, seq: RequestState) -> None:
        """Start a sequence that holds no pages on the cached pages of its longest cached prefix of full blocks,
        leaving at least its last token to compute."""
        ps = self.cfg.page_size
        pages = self.allocator.lookup(self._keys(seq, (seq.num_tokens - 1) // ps))
        seq.block_table = pages
        seq.num_computed = seq.num_cached_tokens = len(pages) * ps
        seq.num_registered = len(pages)

    def _chunk_length(self, seq: RequestState, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed, budget, self.cfg.max_prefill_chunk or budget)

    def _grow(self, seq: RequestState, n_tokens: int) -> bool:
        """Give `seq` pages for its first `n_tokens` tokens if the pool has them; False (nothing taken) if not."""
        missing = self.pages_needed(n_tokens) - len(seq.block_table)
        if missing > 0:
            if not self.allocator.can_allocate(missing):
                return False
            seq.block_table += self.allocator.allocate(missing)
        return True

    def _release(self, seq: RequestState) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
        seq.block_table = []

    def _preempt(self, seq: RequestState) -> None:
        """Preemption by recompute: drop its K/V and queue it first; its outputs are kept and re-prefilled."""
        self._release(seq)
        self._running.remove(seq)
        seq.num_computed, seq.num_registered, seq.num_draft_computed, seq.status = 0, 0, 0, "waiting"
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)
