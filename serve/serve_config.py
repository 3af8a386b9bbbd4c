"""`ServeConfig`: the engine's settings (cache size, scheduling budget, step shapes, overlap, prefix caching,
speculation), validated at construction."""

from __future__ import annotations

import dataclasses

from model.checks import check_bool, check_ints, check_one_of
from serve.forward import LAYER_LOOPS
from serve.ragged_attention import DECODE_IMPLS
from serve.speculation_config import SpeculativeConfig

DEFAULT_KV_BYTES = 2 << 30  # the default cache's cap: 16 full 8,192-token contexts of a 135M model would be 6 GB


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Engine settings. The cache holds `num_pages` pages, or as many as `memory_bytes` or `memory_fraction` of
    free device memory buys; with none given, enough for `max_running` sequences of the model's full context, up to
    `DEFAULT_KV_BYTES` (beyond that, sequences share the pages and the scheduler preempts when they run out).
    `prefix_caching` lets a request reuse the K/V pages of full blocks an earlier request computed for the same
    prefix (a shared system prompt, a multi-turn chat), so its prefill starts after them. `overlap` reads each
    step's tokens back while the next step runs (see the module docstring). `decode_impl` "auto" is
    the Pallas decode kernel on GPU and the plain-JAX path elsewhere; `layer_loop` "scan" compiles the layers once,
    "unrolled" once per layer (serve/forward.py). Step shapes (serve/step_batch.py): prefill
    chunks go in tiles of `prefill_tile` tokens; block tables are at least `min_context_bucket` tokens wide."""

    page_size: int = 16
    num_pages: int | None = None
    memory_bytes: int | None = None
    memory_fraction: float | None = None
    max_running: int = 16
    token_budget: int = 512
    max_prefill_chunk: int | None = None
    decode_impl: str = "auto"
    layer_loop: str = "scan"
    prefill_tile: int = 32
    min_context_bucket: int = 128
    seed: int = 0
    prefix_caching: bool = True
    overlap: bool = True
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        check_ints("serve.", self, ("page_size", "max_running", "token_budget", "prefill_tile", "min_context_bucket"))
        if sum(x is not None for x in (self.num_pages, self.memory_bytes, self.memory_fraction)) > 1:
            raise ValueError("give at most one of serve.num_pages, serve.memory_bytes, serve.memory_fraction")
        for name in ("prefix_caching", "overlap"):
            check_bool(f"serve.{name}", getattr(self, name))
        check_one_of("serve.decode_impl", self.decode_impl, DECODE_IMPLS)
        check_one_of("serve.layer_loop", self.layer_loop, LAYER_LOOPS)
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"serve.speculative must be a SpeculativeConfig or None, got {self.speculative!r}")
