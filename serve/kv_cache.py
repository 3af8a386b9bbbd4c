"""The paged KV cache on device: K and V page pools for every layer, sized from a memory budget.

Layout: `k` and `v` are each one array [kv_heads, n_layers * num_pages, page_size, head_dim]: layer l's page p is
pool page l * num_pages + p (`layer_pages`). The decode kernel runs one program per (sequence, kv head) and walks
that sequence's pages, so the page for one kv head is a contiguous [page_size, head_dim] tile (one DMA/load per
page, rows of head_dim elements for the matmul); keeping the kv head outermost makes those tiles contiguous for
every head. One array for all layers lets the serving step scan its layers (compile time independent of depth)
with the cache in the loop carry: each layer writes and reads its own pages by id offset -- no per-layer slice is
copied out -- and the jitted step updates the pools in place (the cache is donated).

A model with multi-head latent attention (model/mla.py) caches, per token and layer, its latent and its rotary key
instead: `k` holds the latents [1, n_layers * num_pages, page_size, kv_lora_rank] and `v` the rotary keys
[1, ..., qk_rope_head_dim] (one "kv head" shared by all query heads; two pools, so each is a power-of-two width on
GPU, as FlashMLA splits DeepSeek-V3's 512 + 64), which serve/forward.py attends over in MLA's absorbed form.

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
    """K and V page pools, each [kv_heads, n_layers * num_pages, page_size, head_dim] (MLA: latents and rotary
    keys, see the module docstring); with a draft head
    (serve/draft_head_runner.py), also the target's last hidden state of every token, [1, num_pages, page_size,
    d_model] (the same slots)."""

    k: jax.Array
    v: jax.Array
    features: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """The shape of a paged cache for one model: the `k` pool's head dim `head_dim`, the `v` pool's `v_head_dim`
    (None: the same; MLA: the latent's and the rotary key's widths)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: str = "float32"
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        check_ints("cache ", self, ("n_layers", "n_kv_heads", "head_dim", "page_size"))
        if self.v_head_dim is not None:
            check_ints("cache ", self, ("v_head_dim",))
        if not isinstance(self.num_pages, int) or self.num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (page 0 is reserved), got {self.num_pages!r}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, page_size: int, num_pages: int, dtype: str | None = None) -> CacheShape:
        dtype = dtype or str(cfg.compute_dtype)
        if cfg.mla.enabled:
            return cls(cfg.n_layers, 1, cfg.mla.kv_lora_rank, page_size, num_pages, dtype,
                       v_head_dim=cfg.mla.qk_rope_head_dim)
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, page_size, num_pages, dtype)

    @property
    def k_dims(self) -> tuple[int, int, int, int]:
        return self.n_kv_heads, self.n_layers * self.num_pages, self.page_size, self.head_dim

    @property
    def v_dims(self) -> tuple[int, int, int, int]:
        return self.k_dims[:3] + (self.head_dim if self.v_head_dim is None else self.v_head_dim,)

    @property
    def bytes_per_page(self) -> int:
        """K and V (MLA: latent and rotary key) of every layer for page_size tokens."""
        per_slot = self.n_kv_heads * (self.k_dims[3] + self.v_dims[3])
        return self.n_layers * self.page_size * per_slot * jnp.dtype(self.dtype).itemsize

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
    return KVCache(k=jnp.zeros(shape.k_dims, shape.dtype), v=jnp.zeros(shape.v_dims, shape.dtype))


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
