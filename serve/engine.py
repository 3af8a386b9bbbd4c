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
from serve.forward import DECODE_IMPLS, StepInputs, model_step
from serve.kv_cache import CacheShape, KVCache, init_cache, pages_for_budget, slots
from serve.request_checks import RequestError
from serve.sampling import sample_rows
from serve.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from serve.scheduler import Sequence as Seq

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
    prefix (a shared system prompt, a multi-turn chat), so its prefill starts after them."""

    page_size: int = 16
    num_pages: int | None = None
    memory_bytes: int | None = None
    memory_fraction: float | None = None
    max_running: int = 16
    token_budget: int = 512
    max_prefill_chunk: int | None = None
    decode_impl: str = "pallas"
    min_chunk_bucket: int = 16
    seed: int = 0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running", "token_budget", "min_chunk_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serve.{name} must be a positive integer, got {value!r}")
        if sum(x is not None for x in (self.num_pages, self.memory_bytes, self.memory_fraction)) > 1:
            raise ValueError("give at most one of serve.num_pages, serve.memory_bytes, serve.memory_fraction")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"serve.prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(f"serve.decode_impl must be one of {DECODE_IMPLS}, got {self.decode_impl!r}")


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= max(n, smallest)."""
    return 1 << max(0, math.ceil(math.log2(max(n, smallest))))


def unpack(ints: jax.Array, floats: jax.Array, max_pages: int) -> tuple[StepInputs, tuple[jax.Array, ...]]:
    """`Engine._inputs`' packing undone: ints [B, 4C + M + 5] = tokens, positions, pages, offsets (C each), the
    block table (M), then length, last index, seed, output count, top_k; floats [B, 2] = temperature, top_p."""
    C = (ints.shape[1] - max_pages - 5) // 4
    cols = [ints[:, i * C:(i + 1) * C] for i in range(4)]
    tail = 4 * C + max_pages
    inputs = StepInputs(*cols, ints[:, 4 * C:tail], ints[:, tail], ints[:, tail + 1])
    sampling = (jax.lax.bitcast_convert_type(ints[:, tail + 2], jnp.uint32), ints[:, tail + 3], floats[:, 0],
                ints[:, tail + 4], floats[:, 1])
    return inputs, sampling


def _device_step(graphdef: nnx.GraphDef, decode_impl: str, max_pages: int, params: nnx.State, cache: KVCache,
                 ints: jax.Array, floats: jax.Array) -> tuple[jax.Array, KVCache]:
    inputs, sampling = unpack(ints, floats, max_pages)
    logits_BxV, cache = model_step(graphdef, params, cache, inputs, decode_impl=decode_impl)
    return sample_rows(logits_BxV, *sampling), cache


@functools.cache
def _jitted_step(graphdef: nnx.GraphDef, decode_impl: str, max_pages: int) -> Callable:
    """The jitted device step of one model structure, shared by every engine serving it, so a second engine (a
    benchmark's baseline, a restarted server, the next test) reuses the first one's compiled shapes."""
    return jax.jit(partial(_device_step, graphdef, decode_impl, max_pages), donate_argnums=1)


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
        self._step_fn = _jitted_step(self.graphdef, cfg.decode_impl, self.max_pages_per_seq)
        self.completions: dict[str, Completion] = {}
        self._requests: dict[str, Request] = {}
        self._callbacks: dict[str, TokenCallback] = {}
        self._seqs: dict[str, Seq] = {}
        self._ids = itertools.count()
        # per step: (tokens with K/V stored, token slots in allocated pages, slots a contiguous max-length
        # reservation would hold for the same running sequences)
        self.kv_samples: list[tuple[int, int, int]] = []

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
        """One iteration: schedule, run the decodes and the prefill chunks, sample, stream. Returns the
        (request id, token) pairs produced."""
        schedule = self.scheduler.schedule()
        for seq in schedule.preempted:
            self.completions[seq.request_id].num_preemptions += 1
        events: list[tuple[str, int]] = []
        for group in (schedule.decodes, schedule.prefills):
            if group:
                events += self._run(list(group))
        running = self.scheduler.running
        if running and self.allocator.num_used:
            stored = sum(seq.num_computed for seq in running)
            self.kv_samples.append((stored, self.allocator.num_used * self.cfg.page_size,
                                    len(running) * self.model_cfg.max_seq_len))
        return events

    def _run(self, chunks: list[ScheduledChunk]) -> list[tuple[str, int]]:
        ints, floats = self._inputs(chunks)
        with triton_deprecation_ignored():  # a new bucket's first call lowers the kernel
            tokens, self.cache = self._step_fn(self.params, self.cache, ints, floats)
        tokens = np.asarray(tokens)
        now = time.perf_counter()
        events = []
        for row, chunk in enumerate(chunks):
            seq = chunk.seq
            self.scheduler.after_step(chunk)
            if seq.num_computed < seq.num_tokens or seq.status == "finished":
                continue  # a prompt chunk that does not reach the end yet: no token
            token = int(tokens[row])
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

    def _inputs(self, chunks: list[ScheduledChunk]) -> tuple[jax.Array, jax.Array]:
        """The step's inputs for `chunks` (all decodes, or all prefills), bucketed and packed into one int32 and one
        float32 array (see `unpack`) so that each step makes two small host-to-device copies."""
        decode = all(c.is_decode for c in chunks)
        B = bucket(len(chunks))
        C = 1 if decode else bucket(max(c.length for c in chunks), self.cfg.min_chunk_bucket)
        M = self.max_pages_per_seq
        ints, floats = np.zeros((B, 4 * C + M + 5), np.int32), np.zeros((B, 2), np.float32)
        floats[:, 1] = 1.0  # top_p of padding rows
        for row, chunk in enumerate(chunks):
            seq, n, start = chunk.seq, chunk.length, chunk.start
            pos = np.arange(start, start + n)
            ints[row, :n] = seq.all_ids[start:start + n]
            ints[row, C:C + n] = pos
            ints[row, 2 * C:2 * C + n], ints[row, 3 * C:3 * C + n] = slots(seq.block_table, pos, self.cfg.page_size)
            ints[row, 4 * C:4 * C + len(seq.block_table)] = seq.block_table
            s = self._requests[seq.request_id].sampling
            ints[row, 4 * C + M:] = (start + n, n - 1, np.int32(np.uint32(s.seed)), len(seq.output_ids), s.top_k)
            floats[row] = (s.temperature, s.top_p)
        return jnp.asarray(ints), jnp.asarray(floats)

    def warmup(self) -> int:
        """Compile the device step for every bucket the scheduler can produce (decode rows; prefill rows x chunk
        lengths) with all-padding inputs, so no request waits for a compile. Returns the number compiled."""
        rows = [1 << i for i in range(bucket(self.cfg.max_running).bit_length())]
        longest = min(self.cfg.token_budget, self.cfg.max_prefill_chunk or self.cfg.token_budget)
        lengths = [c for c in (1 << i for i in range(bucket(longest).bit_length()))
                   if c >= bucket(1, self.cfg.min_chunk_bucket)]
        for B, C in [(b, 1) for b in rows] + [(b, c) for b in rows for c in lengths]:
            ints = jnp.zeros((B, 4 * C + self.max_pages_per_seq + 5), jnp.int32)
            floats = jnp.ones((B, 2), jnp.float32)
            with triton_deprecation_ignored():
                _, self.cache = self._step_fn(self.params, self.cache, ints, floats)
        return self.compile_count

    @property
    def compile_count(self) -> int:
        """How many shapes the device step has been compiled for, by any engine of this model structure (stops
        growing in steady state)."""
        return self._step_fn._cache_size()

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
