"""The continuous-batching engine: requests in, tokens streamed out, one scheduler iteration per `step()`.

Each iteration the scheduler (serve/scheduler.py) picks decodes for the running requests and prefill chunks for
newly admitted or partly prefilled ones under one token budget; the engine runs them all as ONE device call over a
flat ragged token batch (serve/step_batch.py, serve/engine_step.py), which samples every row's next token on the device
with that request's own parameters and random stream. With `overlap` (the default) the host does not wait for a
step's tokens: it launches step n, then reads back step n-1's tokens while step n runs, so scheduling, input
building and streaming hide behind the device (vLLM's async scheduling, SGLang's overlap scheduler). A decode whose
input is the token still in flight takes it from the previous step's output on the device. A request that hit a
stop token is found one step late; the token computed for it in the meantime is dropped. With prefix caching
(the default) a newly admitted request first takes the cached pages of its prompt's longest already-computed
prefix of full pages, and its prefill starts after them (serve/block_allocator.py). Device calls have bucketed
shapes (serve/step_batch.py), so the loop stops compiling once each bucket has been seen.

With speculative decoding (`ServeConfig.speculative`), a step that speculates first reads back the step in flight
(drafting needs every sequence's last token), asks the scheduler for k lookahead slots per decode, has the proposer
draft (serve/ngram.py on the host; serve/draft_model.py or serve/draft_head_runner.py on the device), and verifies
each decode row's k + 1 positions in the same ragged step as the prefill chunks (serve/speculative.py); it is read
back at once, since the next drafts start from its tokens. serve/speculation_policy.py chooses each step's k among
`draft_choices` (k, about k / 2, and 0: plain decoding), from the tokens/s each has reached at this batch size.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.transformer import for_inference
from serve import request_checks
from serve.block_allocator import BlockAllocator
from serve.engine_step import compiled_steps
from serve.forward import StepParams, split_for_serving, unstacked
from serve.kv_cache import CacheShape, init_cache, pages_for_budget
from serve.ngram import NgramConfig, propose_ngram
from serve.ragged_attention import resolve_decode_impl
from serve.request import PENDING, Completion, Request, RequestState, SamplingParams, rejected, report_finished
from serve.request_checks import RequestError
from serve.scheduler import Schedule, ScheduledChunk, Scheduler, SchedulerConfig
from serve.serve_config import DEFAULT_KV_BYTES, ServeConfig
from serve.speculation_policy import SpeculationPolicy, draft_choices
from serve.speculation_stats import SpeculationStats
from serve.step_batch import (
    Row,
    SamplingInputs,
    StepInputs,
    StepLayout,
    bucket,
    build_step,
    padding_step,
    tiles_for,
)

TokenCallback = Callable[[str, int], None]


def request_problem(request: Request, model_cfg: ModelConfig) -> str | None:
    """Why `request` can never be served by this model (None if it can): serve/request_checks.py's check of every
    field, with token ids in the model's vocabulary and prompt + max_new_tokens within its context."""
    if not isinstance(request, Request):
        return f"expected a Request, got {request_checks.shown(request)}"
    s = request.sampling
    if not isinstance(s, SamplingParams):
        return f"sampling must be a SamplingParams, got {request_checks.shown(s)}"
    prompt = request.prompt_ids.tolist() if isinstance(request.prompt_ids, np.ndarray) else request.prompt_ids
    fields = {"id": request.request_id, "prompt_ids": prompt, "max_new_tokens": request.max_new_tokens,
              "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "seed": s.seed,
              "stop": request.stop_ids, "logprobs": request.logprobs}
    return request_checks.request_problem(fields, vocab_size=model_cfg.vocab_size,
                                          max_seq_len=model_cfg.max_seq_len)


@dataclasses.dataclass
class _Launched:
    """A step on the device: the requests it samples for, and where each one's token is in its output (a verified
    decode row's tokens are at its slot and the `decode_width` - 1 after it, -1 past the last)."""

    tokens_Rs: jax.Array
    logprobs: tuple[jax.Array, jax.Array, jax.Array]  # serve/sampling.py token_logprobs
    sampled: list[tuple[RequestState, int]]  # (request, sampling slot)
    decode_width: int = 1
    decode_slots: int = 0  # slots of the decode rows (Bd * Td)
    drafted: dict[int, int] = dataclasses.field(default_factory=dict)  # id(request) -> tokens drafted for it

    @property
    def verifying(self) -> bool:
        return self.decode_width > 1

    def emitted(self, tokens_Rs: np.ndarray, slot: int) -> list[int]:
        """The tokens the request at `slot` emits."""
        if not self.verifying or slot >= self.decode_slots:
            return [int(tokens_Rs[slot])]
        row = tokens_Rs[slot:slot + self.decode_width]
        return [int(t) for t in row[:int(np.argmax(row < 0)) if (row < 0).any() else len(row)]]

    @property
    def slot_of(self) -> dict[int, int]:
        """id(request) -> its sampling slot."""
        return {id(seq): slot for seq, slot in self.sampled}


class Engine:
    """Continuous batching over a paged KV cache for one model (any `model.transformer.Transformer`), with
    speculative decoding when `cfg.speculative` says so (serve/speculative.py verifies; `draft_model` is the
    proposer of method "draft", a model with the same vocabulary, or of method "head", a trained
    `model.draft_head.DraftHead` of this model; method "mtp" drafts with the model's own depth-1 multi-token
    prediction module and takes none)."""

    def __init__(self, model: nnx.Module, cfg: ServeConfig = ServeConfig(), draft_model: nnx.Module | None = None):
        model = for_inference(model)
        self.cfg, self.model_cfg = cfg, model.cfg
        self.graph, self.params = split_for_serving(model)
        if cfg.layer_loop == "unrolled":
            self.params = unstacked(self.params)
        mc = model.cfg
        self.max_pages_per_seq = math.ceil(mc.max_seq_len / cfg.page_size)
        if cfg.num_pages is not None:
            num_pages = cfg.num_pages
        elif cfg.memory_bytes is not None or cfg.memory_fraction is not None:
            num_pages = pages_for_budget(mc, cfg.page_size, memory_bytes=cfg.memory_bytes,
                                         memory_fraction=cfg.memory_fraction)
        else:
            full = 1 + cfg.max_running * self.max_pages_per_seq
            num_pages = min(full, pages_for_budget(mc, cfg.page_size, memory_bytes=DEFAULT_KV_BYTES))
        self.cache_shape = CacheShape.for_model(mc, cfg.page_size, num_pages)
        self.cache = init_cache(self.cache_shape)
        self.allocator = BlockAllocator(num_pages)
        self.scheduler = Scheduler(SchedulerConfig(page_size=cfg.page_size, max_running=cfg.max_running,
                                                   token_budget=cfg.token_budget,
                                                   max_prefill_chunk=cfg.max_prefill_chunk,
                                                   prefix_caching=cfg.prefix_caching), self.allocator)
        self.decode_impl = resolve_decode_impl(cfg.decode_impl)
        self.layout = StepLayout(page_size=cfg.page_size, max_decode_rows=bucket(cfg.max_running),
                                 tile=cfg.prefill_tile,
                                 min_pages=min(math.ceil(cfg.min_context_bucket / cfg.page_size),
                                               self.max_pages_per_seq),
                                 max_pages=self.max_pages_per_seq)
        self._steps = compiled_steps(self.graph, self.decode_impl)
        shapes = self.step_shapes()
        self._prev_tokens = jnp.zeros(max(bd + nt for bd, nt, _ in shapes), jnp.int32)
        self.completions: dict[str, Completion] = {}
        self._states: dict[str, RequestState] = {}
        self._callbacks: dict[str, TokenCallback] = {}
        self._ids = itertools.count()
        self._in_flight: _Launched | None = None
        # per step: (tokens with K/V stored, token slots in allocated pages, slots a contiguous max-length
        # reservation would hold for the same running requests)
        self.kv_samples: list[tuple[int, int, int]] = []
        self.last_step: tuple[StepInputs, SamplingInputs] | None = None
        self.shapes_seen: set[tuple[int, int, int]] = set()  # (Bd, Np, W) buckets this engine has run
        self.last_host_s = 0.0  # the last step's host time: scheduling, input building, output handling
        self.host_s = self.wait_s = 0.0  # totals: host work, and time blocked reading tokens back
        self.num_steps = 0
        spec = cfg.speculative
        self.speculation = SpeculationStats(accepted_at=[0] * (spec.num_tokens if spec else 0))
        self.draft_choices = draft_choices(spec.num_tokens, spec.adaptive) if spec else (0,)
        self.policy = SpeculationPolicy(self.draft_choices) if spec and spec.adaptive else None
        self._last_mode: tuple[int, int] | None = None  # the last step's (k, decode bucket), if measurable
        self._run = 0  # measurable steps of that k and bucket in a row, the last one included
        self._ngram = NgramConfig(spec.ngram_max_n, spec.ngram_min_n, spec.num_tokens) if spec else None
        self._drafter = None
        if spec and spec.method == "mtp":
            if draft_model is not None:
                raise ValueError("speculative method 'mtp' drafts with the model's own multi-token prediction module; "
                                 "it takes no draft_model")
            from model.draft_head import mtp_draft_head  # noqa: PLC0415
            from serve.draft_head_runner import HeadRunner  # noqa: PLC0415
            self._drafter = HeadRunner(mtp_draft_head(model), self, self.draft_choices)
        elif spec and spec.method in ("draft", "head"):
            if draft_model is None:
                raise ValueError(f"speculative method {spec.method!r} needs a draft_model (a model, or a DraftHead)")
            if spec.method == "draft":
                from serve.draft_model import DraftRunner  # noqa: PLC0415 (only engines with a draft model load it)
                self._drafter = DraftRunner(draft_model, self, self.draft_choices)
            else:
                from serve.draft_head_runner import HeadRunner  # noqa: PLC0415
                self._drafter = HeadRunner(draft_model, self, self.draft_choices)
        elif draft_model is not None:
            raise ValueError("a draft_model was given but serve.speculative.method is neither 'draft' nor 'head'")

    # --- requests ------------------------------------------------------------------------------------------

    def _problem(self, request: Request) -> str | None:
        problem = request_problem(request, self.model_cfg)
        if problem is not None:
            return problem
        pages = math.ceil((len(request.prompt_ids) + request.max_new_tokens) / self.cfg.page_size)
        if pages > self.allocator.num_usable:
            return (f"needs {pages} pages of {self.cfg.page_size} tokens but the whole cache has "
                    f"{self.allocator.num_usable}")
        return None

    def _request_id(self, request: Request) -> str:
        """The request's own id if it has a usable one, else the next `req-N` not already taken."""
        rid = getattr(request, "request_id", None)
        if isinstance(rid, str) and rid:
            return rid
        while (rid := f"req-{next(self._ids)}") in self.completions:
            pass
        return rid

    def submit(self, request: Request, on_token: TokenCallback | None = None, arrival_s: float | None = None) -> str:
        """Queue `request`; returns its id. Raises RequestError naming the request and the reason if it can never
        be served (nothing is queued then, and the engine carries on with the others); the error's `request_id`
        is the id the message names."""
        rid = self._request_id(request)
        problem = self._problem(request)
        if problem:
            raise RequestError(f"request {rid!r}: {problem}", rid)
        if rid in self._states and self._states[rid].status != "finished":
            raise RequestError(f"request {rid!r}: a request with this id is already in progress", rid)
        sampling = request.sampling
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=zlib.crc32(f"{self.cfg.seed}:{rid}".encode(
                "utf-8", "surrogatepass")))
        state = RequestState(rid, [int(t) for t in request.prompt_ids], request.max_new_tokens,
                             stop_ids=tuple(int(t) for t in request.stop_ids), sampling=sampling,
                             logprobs=request.logprobs,
                             arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
        self.scheduler.add(state)
        self._states[rid] = state
        self.completions[rid] = Completion.of(state)
        if on_token:
            self._callbacks[rid] = on_token
        else:
            self._callbacks.pop(rid, None)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now; its pages are freed (a token of it still in flight is dropped)."""
        state = self._states.get(request_id)
        if state is not None and state.status != "finished":
            self.scheduler.finish(state, "aborted")
            self._callbacks.pop(request_id, None)

    def forget(self, request_id: str) -> Completion | None:
        """Drop a finished request's record (a server runs for ever); returns its Completion, None if unknown.
        Raises ValueError if the request is not finished."""
        state = self._states.get(request_id)
        if state is None:
            return None
        if not self.completions[request_id].finished:
            raise ValueError(f"request {request_id!r} is not finished: abort it first")
        del self._states[request_id]
        return self.completions.pop(request_id)

    @property
    def has_unfinished(self) -> bool:
        """Requests waiting or running, or tokens still in flight."""
        return self.scheduler.has_unfinished or self._in_flight is not None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (e.g. between a benchmark's warm-up and its timed run). Running
        requests keep their pages; blocks they complete later are cached again."""
        self.allocator.reset_cache()
        for seq in self.scheduler.running:
            seq.num_registered = len(seq.block_table)  # their current blocks stay out of the cache

    def reset_speculation_stats(self) -> None:
        """Zero the speculative-decoding counts (e.g. between a benchmark's warm-up and its timed run)."""
        self.speculation = SpeculationStats(accepted_at=[0] * len(self.speculation.accepted_at))

    # --- the loop ------------------------------------------------------------------------------------------

    def step(self) -> list[tuple[str, int]]:
        """One iteration: schedule, launch every scheduled chunk (decodes and prefill chunks) as one device call,
        and read back the tokens of the step before it (with `overlap`; without, of this one). Returns the
        (request id, token) pairs read back."""
        start = time.perf_counter()
        self._waited = 0.0
        compiles = self.compiles()
        events = []
        lookahead = self._lookahead()
        if lookahead and self._in_flight:  # drafting needs every sequence's last token
            events = self._read_back(self._in_flight)
            self._in_flight = None
        schedule = self.scheduler.schedule(lookahead)
        built = self._build(schedule, lookahead) if schedule.chunks else None
        if built and self._in_flight and not self._steps.compiled(built[0], self.cache, self._prev_tokens,
                                                                 *built[1:3], built[4]):
            events += self._read_back(self._in_flight)  # the tokens in flight do not wait for a compile
            self._in_flight = None
        launched = self._launch(*built) if built else None
        if self._in_flight:
            events += self._read_back(self._in_flight)
        if launched:
            self._advance(schedule, launched)
        self._in_flight = launched
        produced = len(launched.sampled) if launched else 0  # its tokens, whichever step reads them back
        if launched and (not self.cfg.overlap or launched.verifying):  # the next drafts start from its tokens
            own = self._read_back(launched)
            events += own
            produced = len(own)
            self._in_flight = None
        # a step is measurable when it neither compiled nor prefilled; the policy takes it as its k's steady cost
        # only after a run of such steps of one k and bucket (`SpeculationPolicy.settle`): with the overlap a step's
        # time holds the device time of the step before, and the first steps after a change of shapes run slower
        measurable = schedule.chunks and not schedule.prefills and self.compiles() == compiles
        mode = (lookahead, bucket(len(schedule.decodes))) if measurable else None
        self._run = 0 if mode is None else self._run + 1 if mode == self._last_mode else 1
        if self.policy and mode is not None:
            self.policy.record(mode[1], mode[0], produced, time.perf_counter() - start, self._run)
        self._last_mode = mode
        running = self.scheduler.running
        if running and self.allocator.num_used:
            stored = sum(seq.num_computed for seq in running)
            self.kv_samples.append((stored, self.allocator.num_used * self.cfg.page_size,
                                    len(running) * self.model_cfg.max_seq_len))
        self.last_host_s = time.perf_counter() - start - self._waited
        self.host_s += self.last_host_s
        self.wait_s += self._waited
        self.num_steps += 1
        return events

    def compiles(self) -> int:
        """Shapes compiled so far by this engine's model structure and its draft model's."""
        return self.compile_count + (self._drafter.compile_count if self._drafter else 0)

    def _lookahead(self) -> int:
        """Drafted tokens per decode this step: the configured k, or the policy's choice for this many running
        sequences (`SpeculationPolicy.choose`: a smaller k, or 0), or 0 while prompts are being prefilled."""
        spec, scheduler = self.cfg.speculative, self.scheduler
        if spec is None or not scheduler.num_running:
            return 0
        # a step that runs prompt chunks is not measured by the policy, and its cost is the prompts': decode plainly
        if scheduler.num_waiting and scheduler.num_running < self.cfg.max_running:
            return 0
        if any(seq.num_computed < seq.num_tokens - 1 for seq in scheduler.running):
            return 0
        return self.policy.choose(bucket(self.scheduler.num_running)) if self.policy else spec.num_tokens

    def _row(self, chunk: ScheduledChunk, drafts: list[int] = ()) -> Row:
        seq, s = chunk.seq, chunk.seq.sampling
        tokens = seq.all_ids[chunk.start:chunk.start + chunk.length - chunk.lookahead]
        prev_slot = -1
        if tokens[-1] == PENDING:  # a decode of the token in flight: the device has it
            prev_slot = self._in_flight.slot_of[id(seq)]
            tokens = tokens[:-1] + [0]
        return Row(tokens, chunk.start, seq.block_table, seed=s.seed, counter=len(seq.output_ids),
                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                   logprobs=seq.logprobs is not None, prev_slot=prev_slot, drafts=drafts)

    def _build(self, schedule: Schedule, k: int) -> tuple[StepParams, StepInputs, SamplingInputs, list,
                                                           tuple | None, dict]:
        """The step's weights, inputs, sampling inputs, (request, sampling slot) pairs, the draft model's drafts
        (None without one) and the tokens drafted for each request (by id); `k` the step's lookahead."""
        decodes, prefills = list(schedule.decodes), list(schedule.prefills)
        drafts = self._propose(decodes)
        num_drafts = k if any(drafts) else 0
        inputs, sampling, slots_of = build_step([self._row(c, d) for c, d in zip(decodes, drafts, strict=True)],
                                                [self._row(c) for c in prefills], self.layout, num_drafts)
        self.shapes_seen.add(self.layout.shape_of(inputs))
        chunks = decodes + prefills
        drafted = {id(c.seq): len(d) for c, d in zip(decodes, drafts, strict=True) if d}
        # host arrays go to the compiled step as they are: one transfer each, not a dispatch each
        draft = self._drafter.draft(decodes, inputs) if self._drafter and num_drafts else None
        return (self.params, inputs, sampling,
                [(c.seq, slot) for c, slot in zip(chunks, slots_of, strict=True)], draft, drafted)

    def _propose(self, decodes: list[ScheduledChunk]) -> list[list[int]]:
        """Each decode's drafted tokens, up to its lookahead (for a draft model: placeholders, the tokens are
        drafted on the device)."""
        if self.cfg.speculative is None:
            return [[] for _ in decodes]
        if self._drafter:
            return [[0] * c.lookahead for c in decodes]
        return [propose_ngram(c.seq.all_ids, self._ngram)[:c.lookahead] if c.lookahead else [] for c in decodes]

    def _launch(self, params: StepParams, inputs: StepInputs, sampling: SamplingInputs,
                sampled: list[tuple[RequestState, int]], draft: tuple | None = None,
                drafted: dict[int, int] | None = None) -> _Launched:
        """Dispatch a built step (asynchronously: nothing here waits for the device, unless it compiles)."""
        self.last_step = (inputs, sampling)
        self._last_params = params
        tokens_Rs, logprobs, self.cache, self._prev_tokens = self._steps(params, self.cache, self._prev_tokens,
                                                                        inputs, sampling, draft)
        Bd, Nd = inputs.drafts_BxNd.shape
        return _Launched(tokens_Rs, logprobs, sampled, Nd + 1, Bd * (Nd + 1), drafted or {})

    def _advance(self, schedule: Schedule, launched: _Launched) -> None:
        """Tell the scheduler what the launched step computes: its chunks' tokens have K/V, and each request
        whose known tokens are all computed now has a sampled token in flight."""
        by_seq = {id(seq): slot for seq, slot in launched.sampled}
        sampled = []
        for chunk in (*schedule.decodes, *schedule.prefills):
            seq = chunk.seq
            self.scheduler.after_step(chunk)
            if seq.status == "finished" or seq.num_computed < seq.num_tokens:
                continue  # finished meanwhile (a stop read back late), or a prompt chunk short of the end
            self.scheduler.sampled(seq)
            sampled.append((seq, by_seq[id(seq)]))
        launched.sampled = sampled

    def _read_back(self, launched: _Launched) -> list[tuple[str, int]]:
        """Wait for a launched step's tokens and hand them to the scheduler; stream them."""
        waiting = time.perf_counter()
        tokens = np.asarray(launched.tokens_Rs)
        now = time.perf_counter()
        self._waited += now - waiting
        emitted = [(seq, launched.emitted(tokens, slot)) for seq, slot in launched.sampled]
        if launched.verifying:
            self._count_accepted(launched, emitted)
        events = self.scheduler.update_from_output(emitted, now)
        if any(seq.logprobs is not None for seq, _ in launched.sampled):
            self._record_logprobs(launched, events)
        for rid, token in events:
            if rid in self._callbacks:
                self._callbacks[rid](rid, token)
                if self._states[rid].status == "finished":
                    self._callbacks.pop(rid, None)  # the callback may have aborted its own request
        return events

    def _count_accepted(self, launched: _Launched, emitted: list[tuple[RequestState, list[int]]]) -> None:
        """Add a verifying step's drafted and accepted tokens to the engine's and each request's counts."""
        stats = self.speculation
        for seq, tokens in emitted:
            drafted = launched.drafted.get(id(seq), 0)
            if not drafted:
                continue
            accepted = len(tokens) - 1
            stats.rows += 1
            stats.drafted += drafted
            stats.accepted += accepted
            for j in range(accepted):
                stats.accepted_at[j] += 1
            seq.num_drafted += drafted
            seq.num_accepted += accepted

    def _record_logprobs(self, launched: _Launched, events: list[tuple[str, int]]) -> None:
        """Append each accepted token's log-probabilities to its request's `output_logprobs`."""
        token_lp, top_ids, top_lps = (np.asarray(a) for a in launched.logprobs)
        counts: dict[str, int] = {}
        for rid, _ in events:
            counts[rid] = counts.get(rid, 0) + 1
        for seq, first in launched.sampled:
            if seq.logprobs is None:
                continue
            for slot in range(first, first + counts.get(seq.request_id, 0)):
                top = tuple((int(i), float(lp)) for i, lp in zip(top_ids[slot, :seq.logprobs],
                                                                  top_lps[slot, :seq.logprobs], strict=True))
                seq.output_logprobs.append((float(token_lp[slot]), top))

    @property
    def max_tiles(self) -> int:
        """The most prefill tiles a step can have: chunks share the token budget, and each pads its last tile."""
        return tiles_for([self.cfg.token_budget], self.cfg.prefill_tile) + self.cfg.max_running - 1

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (decode rows, prefill tiles, block-table pages) bucket this engine's steps can take."""
        return self.layout.all_shapes(self.max_tiles)

    def warmup(self, max_context: int | None = None) -> int:
        """Compile the step for every bucket whose block tables cover up to `max_context` tokens (default: the
        smallest width, `min_context_bucket`), with all-padding inputs, so no request waits for those compiles;
        wider steps compile when first needed. With speculative decoding, also the verifying step of every
        decode-row bucket at those widths for each k of `draft_choices`, and a draft model's or head's catch-up and
        drafting (its `warmup`).
        Returns the number of shapes compiled so far (`compiles()`: the draft's too)."""
        if self._in_flight is not None:
            raise RuntimeError("warm up before serving: a step is in flight")
        pages = math.ceil((max_context or 1) / self.cfg.page_size)
        widest = min(max(bucket(pages), self.layout.min_pages), self.layout.max_pages)
        for bd, nt, w in self.step_shapes():
            if w <= widest:
                self._warm_step(bd, nt, w)
        if self.cfg.speculative is not None:
            widths = self.layout.widths(widest)
            for w in widths:
                for bd in self.layout.decode_buckets():  # a step that verifies has no prefill chunks
                    for k in filter(None, self.draft_choices):
                        self._warm_step(bd, 0, w, k)
            if self._drafter is not None:
                self._drafter.warmup(widths)
        return self.compiles()

    def _warm_step(self, bd: int, nt: int, w: int, num_drafts: int = 0) -> None:
        """Run the step of one bucket on all-padding inputs (it writes only the null page); with `num_drafts`, a
        verifying step, with a drafter's all-zero drafts and draft probabilities if it has one."""
        inputs, sampling = padding_step(bd, nt, w, self.cfg.prefill_tile, num_drafts)
        draft = None
        if num_drafts and self._drafter is not None:
            draft = (jnp.zeros((bd, num_drafts), jnp.int32),
                     jnp.zeros((bd, num_drafts, self.model_cfg.vocab_size), jnp.float32))
        _, _, self.cache, self._prev_tokens = self._steps(self.params, self.cache, self._prev_tokens, inputs,
                                                          sampling, draft)

    def last_step_cost(self) -> dict:
        """XLA's cost analysis (flops, bytes accessed, ...) of the last step this engine ran."""
        if self.last_step is None:
            raise ValueError("no step has run yet")
        return self._steps.cost(self._last_params, self.cache, self._prev_tokens, *self.last_step, None)

    @property
    def compile_count(self) -> int:
        """How many step shapes have been compiled for this model structure, by any engine serving it (bounded by
        `step_shapes()`, and stops growing in steady state)."""
        return self._steps.count

    @property
    def compile_s(self) -> float:
        """Seconds spent tracing and compiling step shapes for this model structure, by any engine serving it."""
        return self._steps.compile_s

    # --- conveniences --------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], *, arrivals_s: Sequence[float] | None = None,
                 on_token: TokenCallback | None = None,
                 on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Serve `requests` to completion, each submitted `arrivals_s[i]` seconds after the start (default: all at
        once). A request that cannot be served gets a Completion with finish_reason "error" and the reason."""
        start = time.perf_counter()
        order = sorted(range(len(requests)), key=lambda i: arrivals_s[i] if arrivals_s else 0.0)
        ids: list[str | None] = [None] * len(requests)
        results: list[Completion | None] = [None] * len(requests)  # held here: a later request may reuse an id
        pending = list(order)
        reported: set[int] = set()
        while pending or self.has_unfinished:
            now = time.perf_counter() - start
            while pending and (arrivals_s is None or arrivals_s[pending[0]] <= now):
                i = pending.pop(0)
                try:
                    ids[i] = self.submit(requests[i], on_token,
                                         arrival_s=start + (arrivals_s[i] if arrivals_s else 0.0))
                    results[i] = self.completions[ids[i]]
                except RequestError as e:
                    results[i] = rejected(e, requests[i])
                    if on_finish:
                        on_finish(results[i])
            if self.has_unfinished:
                self.step()
            elif pending and arrivals_s is not None:
                time.sleep(max(0.0, min(0.01, arrivals_s[pending[0]] - (time.perf_counter() - start))))
            if on_finish:
                report_finished(ids, results, reported, on_finish)
        return results

    def stream(self, request: Request) -> Iterator[int]:
        """Submit `request` and yield its tokens as they come, stepping the engine (and any other requests)."""
        rid = self.submit(request)
        seen = 0
        while True:
            done = self.completions[rid]
            while seen < len(done.token_ids):
                yield done.token_ids[seen]
                seen += 1
            if done.finished:
                return
            self.step()
