"""Prometheus metrics of the server (prometheus-client, one registry per app): request latencies (time to first
token, inter-token latency, end to end), the engine's load (running and waiting requests, KV pages used), the
prefix cache's hit rate, preemptions, tokens in and out, and requests by finish reason."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The metrics, written by the engine thread (prometheus-client's metrics are thread-safe) and read by /metrics."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        counter, gauge = functools.partial(Counter, registry=r), functools.partial(Gauge, registry=r)
        latency = functools.partial(Histogram, registry=r, buckets=LATENCY_BUCKETS)
        self.ttft = latency("meshlm_time_to_first_token_seconds", "Arrival to first output token")
        self.itl = latency("meshlm_inter_token_latency_seconds", "Time between a request's output tokens")
        self.e2e = latency("meshlm_e2e_request_latency_seconds", "Arrival to last output token")
        self.running = gauge("meshlm_num_requests_running", "Requests being computed")
        self.waiting = gauge("meshlm_num_requests_waiting", "Requests waiting for admission")
        self.kv_pages_used = gauge("meshlm_kv_cache_pages_used", "KV cache pages held by requests")
        self.kv_pages_total = gauge("meshlm_kv_cache_pages_total", "KV cache pages that can be allocated")
        self.prefix_queries = counter("meshlm_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                      "cache")
        self.prefix_hits = counter("meshlm_prefix_cache_hit_tokens", "Prompt tokens the prefix cache supplied")
        self.prefix_hit_rate = gauge("meshlm_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens")
        self.preemptions = counter("meshlm_num_preemptions", "Preemptions of requests")
        self.prompt_tokens = counter("meshlm_prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("meshlm_generation_tokens", "Output tokens of finished requests")
        self.requests = counter("meshlm_request_success", "Finished requests by finish reason", ["finished_reason"])
        # speculative decoding, the engine's totals so far (vLLM's spec_decode_* figures)
        self.spec_drafts = gauge("meshlm_spec_decode_num_drafts", "Decode rows that verified drafted tokens")
        self.spec_draft_tokens = gauge("meshlm_spec_decode_num_draft_tokens", "Tokens drafted")
        self.spec_accepted_tokens = gauge("meshlm_spec_decode_num_accepted_tokens", "Drafted tokens accepted")
        self.spec_accepted_per_pos = gauge("meshlm_spec_decode_num_accepted_tokens_per_pos",
                                           "Rows that accepted their drafted token at this position", ["position"])

    def observe_finished(self, *, prompt_tokens: int, output_tokens: int, cached_tokens: int, preemptions: int,
                         arrival_s: float, token_times_s: list[float], finish_reason: str) -> None:
        """Record a finished request's counts and latencies (times on `time.perf_counter`'s clock)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        queried = self.prefix_queries._value.get()
        self.prefix_hit_rate.set(self.prefix_hits._value.get() / queried if queried else 0.0)
        self.preemptions.inc(preemptions)
        self.requests.labels(finish_reason).inc()
        if token_times_s:
            self.ttft.observe(max(0.0, token_times_s[0] - arrival_s))
            self.e2e.observe(max(0.0, token_times_s[-1] - arrival_s))
            for a, b in zip(token_times_s, token_times_s[1:]):  # noqa: B905 -- pairs of neighbours
                self.itl.observe(b - a)

    def load(self, *, running: int, waiting: int, pages_used: int, pages_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_pages_used.set(pages_used)
        self.kv_pages_total.set(pages_total)

    def speculation(self, *, rows: int, drafted: int, accepted: int, accepted_at: list[int]) -> None:
        """The engine's speculative-decoding totals (serve/speculation_stats.py)."""
        self.spec_drafts.set(rows)
        self.spec_draft_tokens.set(drafted)
        self.spec_accepted_tokens.set(accepted)
        for position, count in enumerate(accepted_at):
            self.spec_accepted_per_pos.labels(str(position)).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
