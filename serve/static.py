"""Static batching, the baseline continuous batching is measured against: take up to `batch_size` waiting
requests, prefill them together in one step, decode every row until the longest output is done (finished rows keep
computing), and only then start the next batch. Each request reserves a contiguous max-length KV region (no
paging).

It runs the same device step as the engine (`serve/forward.py`, with each row's block table a fixed contiguous
run of pages, as wide as its tokens so far), so the two differ only in scheduling and memory reservation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.checks import check_int, check_one_of
from model.transformer import for_inference
from serve.engine import Completion, Request, RequestError, request_problem
from serve.engine_step import compiled_steps
from serve.forward import LAYER_LOOPS, split_for_serving, unstacked
from serve.kv_cache import CacheShape, init_cache
from serve.ragged_attention import resolve_decode_impl
from serve.request import RequestState
from serve.step_batch import Row, StepLayout, bucket, build_step


class StaticBatcher:
    """Serve requests in fixed batches of up to `batch_size` (see the module docstring)."""

    def __init__(self, model: nnx.Module, batch_size: int = 16, page_size: int = 16, decode_impl: str = "auto",
                 seed: int = 0, prefill_tile: int = 32, layer_loop: str = "scan"):
        check_int("batch_size", batch_size)
        model = for_inference(model)
        self.model_cfg, self.batch_size, self.page_size, self.seed = model.cfg, batch_size, page_size, seed
        self.graph, self.params = split_for_serving(model)
        check_one_of("layer_loop", layer_loop, LAYER_LOOPS)
        if layer_loop == "unrolled":
            self.params = unstacked(self.params)
        self.pages_per_row = math.ceil(model.cfg.max_seq_len / page_size)
        shape = CacheShape.for_model(model.cfg, page_size, 1 + batch_size * self.pages_per_row)
        self.cache = init_cache(shape)
        self.reserved_slots = batch_size * self.pages_per_row * page_size
        self.kv_utilisation_samples: list[float] = []

        self.layout = StepLayout(page_size=page_size, max_decode_rows=bucket(batch_size), tile=prefill_tile,
                                 min_pages=1, max_pages=self.pages_per_row)
        self._steps = compiled_steps(self.graph, resolve_decode_impl(decode_impl))
        self._prev_tokens = jnp.zeros(1, jnp.int32)  # the engine's overlap buffer; static batching reads every step

    def generate(self, requests: Sequence[Request], *, arrivals_s: Sequence[float] | None = None,
                 on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Serve `requests` (arriving `arrivals_s[i]` seconds after the start; default all at once) in batches."""
        start = time.perf_counter()
        arrivals = list(arrivals_s) if arrivals_s is not None else [0.0] * len(requests)
        results: list[Completion | None] = [None] * len(requests)
        queue = sorted(range(len(requests)), key=lambda i: arrivals[i])
        while queue:
            now = time.perf_counter() - start
            if arrivals[queue[0]] > now:
                time.sleep(arrivals[queue[0]] - now)
                now = time.perf_counter() - start
            batch = []
            while queue and arrivals[queue[0]] <= now and len(batch) < self.batch_size:
                i = queue.pop(0)
                rid = requests[i].request_id or f"req-{i}"
                problem = request_problem(requests[i], self.model_cfg)
                if problem:
                    results[i] = Completion(rid, list(requests[i].prompt_ids), finish_reason="error",
                                            error=str(RequestError(f"request {rid!r}: {problem}")))
                else:
                    results[i] = Completion.of(RequestState(rid, list(requests[i].prompt_ids),
                                                            requests[i].max_new_tokens, arrival_s=start + arrivals[i]))
                    batch.append(i)
            if batch:
                self._run_batch([requests[i] for i in batch], [results[i] for i in batch])
            for i in batch:
                if on_finish:
                    on_finish(results[i])
        return results

    def _run_batch(self, requests: list[Request], done: list[Completion]) -> None:
        P, M = self.page_size, self.pages_per_row
        tables = [list(1 + row * M + np.arange(M)) for row in range(len(requests))]
        seeds = [r.sampling.seed if r.sampling.seed is not None else (self.seed + i) % 2**32
                 for i, r in enumerate(requests)]

        def row(i: int, tokens: list[int], start: int) -> Row:
            s = requests[i].sampling
            return Row(tokens, start, tables[i][:-(-(start + len(tokens)) // P)], seed=seeds[i],
                       counter=len(done[i].token_ids), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       min_p=s.min_p)

        # Prefill every prompt in one step, then decode every row until the longest output is done: a finished
        # row keeps computing (rewriting its last slot), as a static batch does.
        lengths = [len(r.prompt_ids) for r in requests]
        live = [True] * len(requests)
        decodes: list[Row] = []
        prefills = [row(i, list(r.prompt_ids), 0) for i, r in enumerate(requests)]
        while True:
            inputs, sampling, slots_of = build_step(decodes, prefills, self.layout)
            new, _, self.cache, self._prev_tokens = self._steps(self.params, self.cache, self._prev_tokens, inputs,
                                                                sampling, None)
            new, now = np.asarray(new), time.perf_counter()
            last_tokens = []
            for i, r in enumerate(requests):
                token = int(new[slots_of[i]])
                state = done[i].state
                if live[i]:
                    state.output_ids.append(token)
                    state.token_times_s.append(now)
                    lengths[i] += 1
                    if token in r.stop_ids:
                        state.status, state.finish_reason, live[i] = "finished", "stop", False
                    elif len(state.output_ids) >= r.max_new_tokens:
                        state.status, state.finish_reason, live[i] = "finished", "length", False
                last_tokens.append(done[i].token_ids[-1])
            self.kv_utilisation_samples.append(float(sum(lengths)) / self.reserved_slots)
            if not any(live):
                return
            prefills = []
            decodes = [row(i, [last_tokens[i]], lengths[i] - 1) for i in range(len(requests))]
