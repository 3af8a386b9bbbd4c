"""The continuous-batching engine: requests in, tokens streamed out, one scheduler iteration per `step()`.

Each iteration the scheduler (serve/scheduler.py) picks decodes for the running sequences and prefill chunks for
newly admitted or partly prefilled ones under a token budget; the engine runs the decodes as one device call and
the prefill chunks as another (`serve/forward.py`), samples every row's next token on the device with that
request's own parameters and random stream, and hands tokens back to the scheduler, which frees a finished
sequence's pages at once. With prefix caching (the default) a newly admitted sequence first takes the cached
pages of its prompt's longest already-computed prefix of full pages, and its prefill starts after them
(serve/block_allocator.py). Device calls have bucketed shapes -- rows and chunk lengths rounded up to powers of
two, block tables as wide as the model's context -- so the loop stops compiling once each bucket has been seen.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.kernels.triton import triton_deprecation_ignored
from model.transformer import for_inference
from serve import request_checks
from serve.block_allocator import BlockAllocator
from serve.forward import model_step
from serve.kv_cache import CacheShape, KVCache, init_cache, pages_for_budget
from serve.ragged_attention import DECODE_IMPLS, resolve_decode_impl
from serve.request_checks import RequestError
from serve.sampling import sample_rows
from serve.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from serve.scheduler import Sequence as Seq
from serve.step_batch import Row, SamplingInputs, StepInputs, StepLayout, bucket, build_step, tiles_for

TokenCallback = Callable[[str, int], None]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = no cut; `seed` None = derived from the engine seed and request order."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate: up to `max_new_tokens` after `prompt_ids`, stopping early at any of `stop_ids`."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()
    request_id: str | None = None


@dataclasses.dataclass
class Completion:
    """A request's result and timings (seconds on `time.perf_counter`'s clock)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "error" | "aborted"
    error: str | None = None
    arrival_s: float = 0.0
    token_times_s: list[float] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (at the latest admission)

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
              "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
              "stop": request.stop_ids}
    return request_checks.request_problem(fields, vocab_size=model_cfg.vocab_size,
                                          max_seq_len=model_cfg.max_seq_len)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Engine settings. The cache holds `num_pages` pages, or as many as `memory_bytes` or `memory_fraction` of
    free device memory buys; with none given, enough for `max_running` sequences of the model's full context.
    `prefix_caching` lets a request reuse the K/V pages of full blocks an earlier request computed for the same
    prefix (a shared system prompt, a multi-turn chat), so its prefill starts after them. `decode_impl` "auto" is
    the Pallas decode kernel on GPU and the plain-JAX path elsewhere. Step shapes (serve/step_batch.py): prefill
    chunks go in tiles of `prefill_tile` tokens; block tables are at least `min_context_bucket` tokens wide."""

    page_size: int = 16
    num_pages: int | None = None
    memory_bytes: int | None = None
    memory_fraction: float | None = None
    max_running: int = 16
    token_budget: int = 512
    max_prefill_chunk: int | None = None
    decode_impl: str = "auto"
    prefill_tile: int = 32
    min_context_bucket: int = 256
    seed: int = 0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running", "token_budget", "prefill_tile", "min_context_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serve.{name} must be a positive integer, got {value!r}")
        if sum(x is not None for x in (self.num_pages, self.memory_bytes, self.memory_fraction)) > 1:
            raise ValueError("give at most one of serve.num_pages, serve.memory_bytes, serve.memory_fraction")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"serve.prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(f"serve.decode_impl must be one of {DECODE_IMPLS}, got {self.decode_impl!r}")


def _device_step(graphdef: nnx.GraphDef, decode_impl: str, params: nnx.State, cache: KVCache, inputs: StepInputs,
                 sampling: SamplingInputs) -> tuple[jax.Array, KVCache]:
    logits_RxV, cache = model_step(graphdef, params, cache, inputs, decode_impl=decode_impl)
    return sample_rows(logits_RxV, *sampling), cache


class CompiledSteps:
    """The device step of one model structure, compiled ahead of time once per step shape and shared by every
    engine serving that structure (a benchmark's baseline, a restarted server, the next test reuse the first
    one's executables). Counts the shapes and the seconds spent tracing and compiling them."""

    def __init__(self, graphdef: nnx.GraphDef, decode_impl: str):
        self._jitted = jax.jit(partial(_device_step, graphdef, decode_impl), donate_argnums=1)
        self._compiled: dict[tuple, Callable] = {}
        self.compile_s = 0.0

    def __call__(self, params: nnx.State, cache: KVCache, inputs: StepInputs, sampling: SamplingInputs
                 ) -> tuple[jax.Array, KVCache]:
        key = tuple(a.shape for a in inputs) + (cache.k.shape, str(cache.k.dtype))
        fn = self._compiled.get(key)
        if fn is None:
            start = time.perf_counter()
            with triton_deprecation_ignored():
                fn = self._jitted.lower(params, cache, inputs, sampling).compile()
            self.compile_s += time.perf_counter() - start
            self._compiled[key] = fn
        return fn(params, cache, inputs, sampling)

    def cost(self, params: nnx.State, cache: KVCache, inputs: StepInputs, sampling: SamplingInputs) -> dict:
        """XLA's cost analysis (flops, bytes accessed) of the step for these inputs' shapes."""
        with triton_deprecation_ignored():
            return self._jitted.lower(params, cache, inputs, sampling).compile().cost_analysis()

    @property
    def count(self) -> int:
        return len(self._compiled)


@functools.cache
def compiled_steps(graphdef: nnx.GraphDef, decode_impl: str) -> CompiledSteps:
    """The shared `CompiledSteps` of this model structure and decode implementation."""
    return CompiledSteps(graphdef, decode_impl)


class Engine:
    """Continuous batching over a paged KV cache for one model (any `model.transformer.Transformer`)."""

    def __init__(self, model: nnx.Module, cfg: ServeConfig = ServeConfig()):
        model = for_inference(model)
        self.cfg, self.model_cfg = cfg, model.cfg
        self.graphdef, self.params = nnx.split(model)
        mc = model.cfg
        self.max_pages_per_seq = math.ceil(mc.max_seq_len / cfg.page_size)
        if cfg.num_pages is not None:
            num_pages = cfg.num_pages
        elif cfg.memory_bytes is not None or cfg.memory_fraction is not None:
            num_pages = pages_for_budget(mc, cfg.page_size, memory_bytes=cfg.memory_bytes,
                                         memory_fraction=cfg.memory_fraction)
        else:
            num_pages = 1 + cfg.max_running * self.max_pages_per_seq
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
        self._steps = compiled_steps(self.graphdef, self.decode_impl)
        self.completions: dict[str, Completion] = {}
        self._requests: dict[str, Request] = {}
        self._callbacks: dict[str, TokenCallback] = {}
        self._seqs: dict[str, Seq] = {}
        self._ids = itertools.count()
        # per step: (tokens with K/V stored, token slots in allocated pages, slots a contiguous max-length
        # reservation would hold for the same running sequences)
        self.kv_samples: list[tuple[int, int, int]] = []
        self.last_step: tuple[StepInputs, SamplingInputs] | None = None
        self.shapes_seen: set[tuple[int, int, int]] = set()  # (Bd, Np, W) buckets this engine has run

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
        if rid in self.completions and not self.completions[rid].finished:
            raise RequestError(f"request {rid!r}: a request with this id is already in progress", rid)
        if request.sampling.seed is None:
            seed = zlib.crc32(f"{self.cfg.seed}:{rid}".encode("utf-8", "surrogatepass"))
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=seed))
        seq = Seq(request_id=rid, prompt_ids=[int(t) for t in request.prompt_ids],
                  max_new_tokens=request.max_new_tokens)
        self.scheduler.add(seq)
        self._requests[rid], self._seqs[rid] = request, seq
        self.completions[rid] = Completion(rid, list(seq.prompt_ids),
                                           arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
        if on_token:
            self._callbacks[rid] = on_token
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now; its pages are freed."""
        if request_id in self._seqs and not self.completions[request_id].finished:
            self.scheduler.abort(request_id)
            self._finish(request_id, "aborted")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (e.g. between a benchmark's warm-up and its timed run). Running
        sequences keep their pages; blocks they complete later are cached again."""
        self.allocator.reset_cache()
        for seq in self.scheduler.running:
            seq.num_registered = len(seq.block_table)  # their current blocks stay out of the cache

    # --- the loop ------------------------------------------------------------------------------------------

    def step(self) -> list[tuple[str, int]]:
        """One iteration: schedule, run every scheduled chunk (decodes and prefill chunks) as one device call,
        sample, stream. Returns the (request id, token) pairs produced."""
        schedule = self.scheduler.schedule()
        for seq in schedule.preempted:
            self.completions[seq.request_id].num_preemptions += 1
        events = self._run(list(schedule.decodes), list(schedule.prefills)) if schedule.chunks else []
        running = self.scheduler.running
        if running and self.allocator.num_used:
            stored = sum(seq.num_computed for seq in running)
            self.kv_samples.append((stored, self.allocator.num_used * self.cfg.page_size,
                                    len(running) * self.model_cfg.max_seq_len))
        return events

    def _row(self, chunk: ScheduledChunk) -> Row:
        seq, s = chunk.seq, self._requests[chunk.seq.request_id].sampling
        return Row(seq.all_ids[chunk.start:chunk.start + chunk.length], chunk.start, seq.block_table, seed=s.seed,
                   counter=len(seq.output_ids), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)

    def _run(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]) -> list[tuple[str, int]]:
        chunks = decodes + prefills
        inputs, sampling, slots_of = build_step([self._row(c) for c in decodes], [self._row(c) for c in prefills],
                                                self.layout)
        self.last_step = (StepInputs(*map(jnp.asarray, inputs)), SamplingInputs(*map(jnp.asarray, sampling)))
        self.shapes_seen.add(self.layout.shape_of(inputs))
        tokens, self.cache = self._steps(self.params, self.cache, *self.last_step)
        tokens = np.asarray(tokens)
        now = time.perf_counter()
        events = []
        for chunk, slot in zip(chunks, slots_of, strict=True):
            seq = chunk.seq
            self.scheduler.after_step(chunk)
            if seq.num_computed < seq.num_tokens or seq.status == "finished":
                continue  # a prompt chunk that does not reach the end yet: no token
            token = int(tokens[slot])
            self.scheduler.append_token(seq, token)
            done = self.completions[seq.request_id]
            done.token_ids.append(token)
            done.token_times_s.append(now)
            events.append((seq.request_id, token))
            if seq.request_id in self._callbacks:
                self._callbacks[seq.request_id](seq.request_id, token)
            request = self._requests[seq.request_id]
            if token in request.stop_ids:
                self._finish(seq.request_id, "stop")
            elif len(seq.output_ids) >= request.max_new_tokens:
                self._finish(seq.request_id, "length")
        return events

    def _finish(self, rid: str, reason: str) -> None:
        seq = self._seqs[rid]
        if seq.status != "finished":
            self.scheduler.finish(seq, reason)
        self.completions[rid].finish_reason = reason
        self.completions[rid].num_cached_tokens = seq.num_cached_tokens
        self._callbacks.pop(rid, None)

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (decode rows, prefill tiles, block-table pages) bucket this engine's steps can take."""
        # prefill chunks share the token budget; each pads its last tile
        max_tiles = tiles_for([self.cfg.token_budget], self.cfg.prefill_tile) + self.cfg.max_running - 1
        return self.layout.all_shapes(max_tiles)

    def warmup(self, max_context: int | None = None) -> int:
        """Compile the step for every bucket whose block tables cover up to `max_context` tokens (default: the
        smallest width, `min_context_bucket`), with all-padding inputs, so no request waits for those compiles;
        wider steps compile when first needed. Returns the number of shapes compiled so far."""
        pages = math.ceil((max_context or 1) / self.cfg.page_size)
        widest = min(max(bucket(pages), self.layout.min_pages), self.layout.max_pages)
        for bd, np_, w in self.step_shapes():
            if w <= widest:
                inputs, sampling = self._padding(bd, np_, w)
                _, self.cache = self._steps(self.params, self.cache, inputs, sampling)
        return self.compile_count

    def _padding(self, bd: int, np_: int, w: int) -> tuple[StepInputs, SamplingInputs]:
        """All-padding inputs of one bucket (every token writes the null page, every row has length 0)."""
        T, R = bd + np_ * self.cfg.prefill_tile, bd + np_
        z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
        inputs = StepInputs(z(T), jnp.full((T,), -1, jnp.int32), z(T), z(T), z(bd, w), z(bd), z(np_, w), z(np_),
                            z(R))
        return inputs, SamplingInputs(jnp.zeros(R, jnp.uint32), z(R), jnp.zeros(R, jnp.float32), z(R),
                                      jnp.ones(R, jnp.float32))

    def last_step_cost(self) -> dict:
        """XLA's cost analysis (flops, bytes accessed, ...) of the last step this engine ran."""
        if self.last_step is None:
            raise ValueError("no step has run yet")
        return self._steps.cost(self.params, self.cache, *self.last_step)

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
                    prompt = getattr(requests[i], "prompt_ids", None)
                    results[i] = Completion(e.request_id, list(prompt) if isinstance(prompt, (list, tuple)) else [],
                                            finish_reason="error", error=str(e))
                    if on_finish:
                        on_finish(results[i])
            if self.has_unfinished:
                self.step()
            elif pending and arrivals_s is not None:
                time.sleep(max(0.0, min(0.01, arrivals_s[pending[0]] - (time.perf_counter() - start))))
            if on_finish:
                for i, rid in enumerate(ids):
                    if rid is not None and i not in reported and results[i].finished:
                        reported.add(i)
                        on_finish(results[i])
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
