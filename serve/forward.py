"""One model step over the paged KV cache: B rows of up to C new tokens each (a decode is C = 1), K/V written
into their pages, attention over each row's cached sequence, and the logits of each row's last new token.

The model's own blocks run (`model.transformer.Block` with an `attend` hook), so serving computes exactly the
math of training; only attention changes: it reads keys and values from the pages. Layers run unrolled in Python
because each layer has its own page pool (see serve/kv_cache.py).

Decode (C = 1) attends through the Pallas kernel (`serve/kernels/paged_attention.py`) or its reference; prefill
chunks attend with `paged_prefill_attention`, which gathers the row's pages into a dense key range and masks
causally by absolute position -- compute-bound work where a gather costs little next to the matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import rope_tables
from serve.kernels.paged_attention import paged_attention, paged_attention_reference, paged_prefill_attention
from serve.kv_cache import KVCache, write_pages

DECODE_IMPLS = ("pallas", "reference")


class StepInputs(NamedTuple):
    """Device inputs of one step; pad rows have length 0 and write to the null page."""

    tokens_BxC: jax.Array        # int32 token ids
    positions_BxC: jax.Array     # int32 absolute positions in the sequence
    pages_BxC: jax.Array         # int32 page of each token's K/V slot
    offsets_BxC: jax.Array       # int32 offset in that page
    block_tables_BxM: jax.Array  # int32 page ids of each row's sequence (0 = null page)
    lengths_B: jax.Array         # int32 tokens in the cache after this step (0 for pad rows)
    last_B: jax.Array            # int32 index in C of each row's last new token


def model_step(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, inputs: StepInputs, *,
               decode_impl: str = "pallas") -> tuple[jax.Array, KVCache]:
    """Run `inputs` through the model (`graphdef` + `params`), writing their K/V into `cache`. Returns the float32
    logits [B, vocab] of each row's last new token and the updated cache."""
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, C = inputs.tokens_BxC.shape
    x_BxCxD = model.embed_tokens(inputs.tokens_BxC)
    cos, sin = rope_tables(inputs.positions_BxC, cfg.head_dim, cfg.rope_theta)
    block_graphdef, stacked = nnx.split(model.blocks)
    new_k, new_v = [], []
    for layer in range(cfg.n_layers):
        pools = [cache.k[layer], cache.v[layer]]

        def attend(q_BxCxHxD: jax.Array, k_BxCxKxD: jax.Array, v_BxCxKxD: jax.Array, pools=pools) -> jax.Array:
            pools[0] = write_pages(pools[0], k_BxCxKxD, inputs.pages_BxC, inputs.offsets_BxC)
            pools[1] = write_pages(pools[1], v_BxCxKxD, inputs.pages_BxC, inputs.offsets_BxC)
            if C == 1:
                decode = paged_attention if decode_impl == "pallas" else paged_attention_reference
                kwargs = {"interpret": jax.default_backend() == "cpu"} if decode_impl == "pallas" else {}
                out_BxHxD = decode(q_BxCxHxD[:, 0], pools[0], pools[1], inputs.lengths_B, inputs.block_tables_BxM,
                                   **kwargs)
                return out_BxHxD[:, None]
            return paged_prefill_attention(q_BxCxHxD, pools[0], pools[1], inputs.positions_BxC, inputs.lengths_B,
                                           inputs.block_tables_BxM)

        block = nnx.merge(block_graphdef, jax.tree.map(lambda a, i=layer: a[i], stacked))
        x_BxCxD, _ = block(x_BxCxD, cos, sin, attend)
        new_k.append(pools[0])
        new_v.append(pools[1])
    last_Bx1xD = jnp.take_along_axis(x_BxCxD, inputs.last_B[:, None, None], axis=1)
    return model.logits(last_Bx1xD)[:, 0], KVCache(tuple(new_k), tuple(new_v))
