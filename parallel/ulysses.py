"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al., 2023): attention over a sequence sharded in contiguous
chunks over n devices, by trading sequence shards for head shards.

An all-to-all turns each device's [B, T/n, H, Dh] into [B, T, H/n, Dh] (every position, 1/n of the heads), the
device runs ordinary causal attention for its heads (our flash kernel), and a second all-to-all turns the output
back into sequence shards. Per layer each device sends about 4 x (n-1)/n of its q/k/v/out chunk, independent of
the ring's n - 1 K/V hops; the price is that the heads must split n ways. With grouped-query attention and fewer
KV heads than n, K and V are repeated to one head per query head first (so every device gets its own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.kernels.flash_attention import flash_attention


def ulysses_attention(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array, *,
                      axis_name: str | tuple[str, ...], axis_size: int, causal: bool = True,
                      interpret: bool = False) -> jax.Array:
    """Attention of this device's sequence chunk over the whole sequence. Call inside `shard_map` with the
    sequence dimension split over `axis_name` (`axis_size` devices, chunk i on the device of index i); H must be
    a multiple of `axis_size`. Returns [B, T, H, Dh] in q's dtype."""
    H, K = q_BxTxHxDh.shape[2], k_BxTxKxDh.shape[2]
    if H % axis_size:
        raise ValueError(f"ulysses splits the {H} query heads on this device {axis_size} ways over the sequence "
                         f"axis; {H} is not a multiple of {axis_size}")
    if K % axis_size:
        k_BxTxKxDh, v_BxTxKxDh = (jnp.repeat(x, H // K, axis=2) for x in (k_BxTxKxDh, v_BxTxKxDh))

    def heads_for_sequence(x_BxTcxNxDh: jax.Array) -> jax.Array:  # [B, T/n, N, Dh] -> [B, T, N/n, Dh]
        return jax.lax.all_to_all(x_BxTcxNxDh, axis_name, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = (heads_for_sequence(x) for x in (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh))
    out_BxTxHnxDh, _ = flash_attention(q, k, v, causal=causal, interpret=interpret)
    return jax.lax.all_to_all(out_BxTxHnxDh, axis_name, split_axis=1, concat_axis=2, tiled=True)
