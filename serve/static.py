"""Static batching, the baseline continuous batching is measured against: take up to `batch_size` waiting
requests, prefill them padded to the longest prompt, decode every row until the longest output is done, and only
then start the next batch. Each request reserves a contiguous max-length KV region (no paging).

It runs the same device step as the engine (`serve/forward.py`, with each row's block table a fixed contiguous
run of pages), so the two differ only in scheduling and memory reservation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.kernels.triton import triton_deprecation_ignored
from model.transformer import for_inference
from serve.engine import Completion, Request, RequestError, bucket, request_problem
from serve.forward import StepInputs, model_step
from serve.kv_cache import CacheShape, init_cache
from serve.sampling import sample_rows


class StaticBatcher:
    """Serve requests in fixed batches of up to `batch_size` (see the module docstring)."""

    def __init__(self, model: nnx.Module, batch_size: int = 16, page_size: int = 16, decode_impl: str = "pallas",
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model = for_inference(model)
        self.model_cfg, self.batch_size, self.page_size, self.seed = model.cfg, batch_size, page_size, seed
        self.graphdef, self.params = nnx.split(model)
        self.pages_per_row = math.ceil(model.cfg.max_seq_len / page_size)
        shape = CacheShape.for_model(model.cfg, page_size, 1 + batch_size * self.pages_per_row)
        self.cache = init_cache(shape)
        self.reserved_slots = batch_size * self.pages_per_row * page_size
        self.kv_utilisation_samples: list[float] = []

        def step(params, cache, inputs, sampling):
            logits_BxV, cache = model_step(self.graphdef, params, cache, inputs, decode_impl=decode_impl)
            return sample_rows(logits_BxV, *sampling), cache

        self._step = jax.jit(step, donate_argnums=1)

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
                    results[i] = Completion(rid, list(requests[i].prompt_ids), arrival_s=start + arrivals[i])
                    batch.append(i)
            if batch:
                self._run_batch([requests[i] for i in batch], [results[i] for i in batch])
            for i in batch:
                if on_finish:
                    on_finish(results[i])
        return results

    def _run_batch(self, requests: list[Request], done: list[Completion]) -> None:
        B, P, M = bucket(len(requests)), self.page_size, self.pages_per_row
        lengths = np.zeros(B, np.int32)
        lengths[:len(requests)] = [len(r.prompt_ids) for r in requests]
        tables = np.zeros((B, M), np.int32)
        for row in range(len(requests)):
            tables[row] = 1 + row * M + np.arange(M)
        seeds = np.array([r.sampling.seed if r.sampling.seed is not None else self.seed + i
                          for i, r in enumerate(requests)] + [0] * (B - len(requests)), np.uint32)
        temperature = np.zeros(B, np.float32)
        top_k, top_p = np.zeros(B, np.int32), np.ones(B, np.float32)
        for row, r in enumerate(requests):
            temperature[row], top_k[row], top_p[row] = r.sampling.temperature, r.sampling.top_k, r.sampling.top_p
        longest_prompt = int(lengths.max())
        steps = max(r.max_new_tokens for r in requests)
        # Prefill: every row padded to the longest prompt.
        C = longest_prompt
        tokens, positions = np.zeros((B, C), np.int32), np.tile(np.arange(C, dtype=np.int32), (B, 1))
        for row, r in enumerate(requests):
            tokens[row, :len(r.prompt_ids)] = r.prompt_ids
        positions = np.minimum(positions, np.maximum(lengths[:, None] - 1, 0))  # pads rewrite the last real slot
        pages, offsets = np.take_along_axis(tables, positions // P, axis=1), positions % P
        for row, r in enumerate(requests):  # the pad rows' and pad tokens' writes go to the null page
            pages[row, len(r.prompt_ids):], offsets[row, len(r.prompt_ids):] = 0, 0
        pages[len(requests):] = 0
        last = np.maximum(lengths - 1, 0)
        live = np.zeros(B, bool)
        live[:len(requests)] = True
        for t in range(steps):
            counters = np.full(B, t, np.int32)
            inputs = StepInputs(*(jnp.asarray(a) for a in (tokens, positions, pages, offsets, tables,
                                                           np.where(live | (t == 0), lengths, 0), last)))
            sampling = tuple(jnp.asarray(a) for a in (seeds, counters, temperature, top_k, top_p))
            with triton_deprecation_ignored():
                new, self.cache = self._step(self.params, self.cache, inputs, sampling)
            new, now = np.asarray(new), time.perf_counter()
            for row, r in enumerate(requests):
                if live[row]:
                    token = int(new[row])
                    done[row].token_ids.append(token)
                    done[row].token_times_s.append(now)
                    if token in r.stop_ids:
                        done[row].finish_reason, live[row] = "stop", False
                    elif len(done[row].token_ids) >= r.max_new_tokens:
                        done[row].finish_reason, live[row] = "length", False
            self.kv_utilisation_samples.append(float(lengths[:len(requests)].sum()) / self.reserved_slots)
            if not live.any():
                break
            # Decode: one token per row (finished rows keep computing, as static batching does, into the null page).
            tokens = new[:, None].astype(np.int32)
            positions = lengths[:, None].copy()
            pages = np.where(live[:, None], np.take_along_axis(tables, positions // P, axis=1), 0)
            offsets = np.where(live[:, None], positions % P, 0)
            lengths = np.where(live, lengths + 1, lengths)
            last = np.zeros(B, np.int32)
