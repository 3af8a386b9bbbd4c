"""One model step over the paged KV cache: the flat ragged token batch of serve/step_batch.py through the model,
K/V written into their pages, attention over each row's cached sequence, logits of each sampling slot.

The model's own blocks run (`model.transformer.Block` with an `attend` hook), so serving computes exactly the
math of training; only attention changes: it reads keys and values from the pages
(serve/ragged_attention.py). The layers run as one `jax.lax.scan` over the stacked block parameters, with the
whole cache (serve/kv_cache.py: all layers in one pool, layer l's pages offset by l * num_pages) in the loop
carry, so the compile time does not grow with depth and the pools are updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import rope_tables
from serve.kv_cache import KVCache, layer_pages, write_pages
from serve.ragged_attention import ragged_paged_attention
from serve.step_batch import StepInputs


def model_step(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, inputs: StepInputs, *,
               decode_impl: str = "reference") -> tuple[jax.Array, KVCache]:
    """Run `inputs` through the model (`graphdef` + `params`), writing their K/V into `cache`. Returns the float32
    logits [R, vocab] of each sampling slot's last token and the updated cache. `decode_impl` is "pallas" or
    "reference" (serve/ragged_attention.py `resolve_decode_impl` turns "auto" into one of them)."""
    if decode_impl not in ("pallas", "reference"):
        raise ValueError(f"model_step needs decode_impl 'pallas' or 'reference', got {decode_impl!r}")
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    num_pages = cache.k.shape[1] // cfg.n_layers
    tokens_1xT, positions_1xT = inputs.tokens_T[None], inputs.positions_T[None]
    x_1xTxD = model.embed_tokens(tokens_1xT)
    cos, sin = rope_tables(jnp.maximum(positions_1xT, 0), cfg.head_dim, cfg.rope_theta)
    block_graphdef, stacked = nnx.split(model.blocks)

    def layer(carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[nnx.State, jax.Array]
              ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x_1xTxD, k_pool, v_pool = carry
        layer_state, index = xs
        pools = [k_pool, v_pool]
        pages_1xT = layer_pages(inputs.pages_T, index, num_pages)[None]
        offsets_1xT = inputs.offsets_T[None]

        def attend(q_1xTxHxD: jax.Array, k_1xTxKxD: jax.Array, v_1xTxKxD: jax.Array) -> jax.Array:
            pools[0] = write_pages(pools[0], k_1xTxKxD, pages_1xT, offsets_1xT)
            pools[1] = write_pages(pools[1], v_1xTxKxD, pages_1xT, offsets_1xT)
            out_TxHxD = ragged_paged_attention(
                q_1xTxHxD[0], pools[0], pools[1], inputs.positions_T,
                layer_pages(inputs.decode_tables_BxW, index, num_pages), inputs.decode_lengths_B,
                layer_pages(inputs.tile_tables_NxW, index, num_pages), inputs.tile_lengths_N,
                decode_impl=decode_impl)
            return out_TxHxD[None]

        x_1xTxD, _ = nnx.merge(block_graphdef, layer_state)(x_1xTxD, cos, sin, attend)
        return (x_1xTxD, pools[0], pools[1]), None

    (x_1xTxD, k_pool, v_pool), _ = jax.lax.scan(layer, (x_1xTxD, cache.k, cache.v),
                                                (stacked, jnp.arange(cfg.n_layers)))
    last_1xRxD = x_1xTxD[:, inputs.last_R]
    return model.logits(last_1xRxD)[0], KVCache(k_pool, v_pool)
