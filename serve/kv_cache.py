"""The paged KV cache on device: K and V page pools for every layer, sized from a memory budget.

Layout: `k` and `v` are each one array [kv_heads, n_layers * num_pages, page_size, head_dim]: layer l's page p is
pool page l * num_pages + p (`layer_pages`). The decode kernel runs one program per (sequence, kv head) and walks
that sequence's pages, so the page for one kv head is a contiguous [page_size, head_dim] tile (one DMA/load per
page, rows of head_dim elements for the matmul); keeping the kv head outermost makes those tiles contiguous for
every head. One array for all layers lets the serving step scan its layers (compile time independent of depth)
with the cache in the loop carry: each layer writes and reads its own pages by id offset -- no per-layer slice is
copied out -- and the jitted step updates the pools in place (the cache is donated).

Page 0 of each layer is the null page: padded tokens of a bucketed batch write there, and unused block-table
entries point there. Which page belongs to whom is decided on the host (`serve/block_allocator.py`); this file
only holds the arrays and says how many pages a budget buys.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model.checks import check_ints
from model.config import ModelConfig


class KVCache(NamedTuple):
    """K and V page pools, each [kv_heads, n_layers * num_pages, page_size, head_dim]; with a draft head
    (serve/draft_head_runner.py), also the target's last hidden state of every token, [1, num_pages, page_size,
    d_model] (the same slots)."""

    k: jax.Array
    v: jax.Array
    features: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """The shape of a paged cache for one model."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_ints("cache ", self, ("n_layers", "n_kv_heads", "head_dim", "page_size"))
        if not isinstance(self.num_pages, int) or self.num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (page 0 is reserved), got {self.num_pages!r}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, page_size: int, num_pages: int, dtype: str | None = None) -> CacheShape:
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, page_size, num_pages,
                   dtype or str(cfg.compute_dtype))

    @property
    def bytes_per_page(self) -> int:
        """K and V of every layer for page_size tokens."""
        return 2 * self.n_layers * self.n_kv_heads * self.page_size * self.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages


def pages_for_budget(cfg: ModelConfig, page_size: int, *, memory_bytes: int | None = None,
                     memory_fraction: float | None = None, dtype: str | None = None,
                     device: jax.Device | None = None) -> int:
    """How many pages fit in `memory_bytes`, or in `memory_fraction` of the device's free memory (needs a device
    that reports memory, i.e. a GPU/TPU). Raises ValueError naming the budget if not even 2 pages fit."""
    if (memory_bytes is None) == (memory_fraction is None):
        raise ValueError("give exactly one of memory_bytes and memory_fraction for the KV cache")
    per_page = CacheShape.for_model(cfg, page_size, 2, dtype).bytes_per_page
    if memory_fraction is not None:
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        stats = (device or jax.local_devices()[0]).memory_stats()
        if not stats or "bytes_limit" not in stats:
            raise ValueError("this device does not report its memory; give the KV cache size in bytes instead")
        memory_bytes = int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * memory_fraction)
    pages = memory_bytes // per_page
    if pages < 2:
        raise ValueError(f"a KV cache budget of {memory_bytes:,} bytes holds {pages} pages of {per_page:,} bytes; "
                         "at least 2 are needed")
    return int(pages)


def init_cache(shape: CacheShape) -> KVCache:
    """A zeroed cache."""
    dims = (shape.n_kv_heads, shape.n_layers * shape.num_pages, shape.page_size, shape.head_dim)
    return KVCache(k=jnp.zeros(dims, shape.dtype), v=jnp.zeros(dims, shape.dtype))


def layer_pages(page_ids: jax.Array, layer: jax.Array | int, num_pages: int) -> jax.Array:
    """Layer `layer`'s pool page ids for per-layer page ids (block tables, slots): offset by layer * num_pages."""
    return page_ids + layer * num_pages


def write_pages(pages_KxNpxPsxDh: jax.Array, new_BxTxKxDh: jax.Array, page_BxT: jax.Array,
                offset_BxT: jax.Array) -> jax.Array:
    """`pages` with token (b, t)'s K or V written at slot (page_BxT[b, t], offset_BxT[b, t])."""
    new_KxBxTxDh = jnp.moveaxis(new_BxTxKxDh, 2, 0).astype(pages_KxNpxPsxDh.dtype)
    return pages_KxNpxPsxDh.at[:, page_BxT, offset_BxT].set(new_KxBxTxDh)


def slots(block_table: list[int], positions: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Host-side slot mapping: (page ids, offsets in page) where tokens at `positions` of a sequence with
    `block_table` live."""
    table = np.asarray(block_table, np.int32)
    return table[positions // page_size], (positions % page_size).astype(np.int32)
