"""Ring attention (Liu et al., 2023): causal self-attention over a sequence sharded in contiguous chunks over a
ring of devices, without ever gathering it.

Device i holds query, key and value chunk i. In n - 1 steps the key/value chunks travel once around the ring
(`ppermute` to the next device) while each device attends its queries to the chunk it holds: its own chunk with
the causal mask, earlier chunks in full, later chunks not at all (causal). The per-chunk results are combined by
their log-sum-exps (`merge_blocks`, float32). Each block is our flash kernel by default; its lse output and lse
cotangent are what make the merge, and so the gradients, exact. The backward is JAX's transpose of the forward
ring (the `ppermute`s reversed), so it also never gathers the sequence; it keeps every visiting chunk's K/V and
block outputs as residuals.

With a contiguous layout the causal ring is unbalanced: device i computes i + 1 blocks, so the last device sets
the pace; skipped blocks cost nothing (`lax.cond`), but they do not shorten the critical path.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from model.kernels.flash_attention import flash_attention, merge_blocks

Block = Callable[..., tuple[jax.Array, jax.Array]]  # (q, k, v, *, causal) -> (out [B,T,H,D], lse [B,H,T] f32)


def flash_block(interpret: bool) -> Block:
    """Our Pallas flash kernel as the ring's inner block (`interpret=True` on CPU)."""
    def block(q, k, v, *, causal: bool) -> tuple[jax.Array, jax.Array]:
        return flash_attention(q, k, v, causal=causal, interpret=interpret)
    return block


def ring_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, *,
                   axis_name: str | tuple[str, ...], axis_size: int, causal: bool = True,
                   block: Block | None = None) -> jax.Array:
    """Attention of this device's query chunk over the whole ring's keys and values. Call inside `shard_map`
    with the sequence dimension split over `axis_name` (`axis_size` devices, chunk i on the device of index i).
    Returns [B, T, H, D] in q's dtype. `block` computes one (out, lse) pair; the default is the flash kernel."""
    block = block or flash_block(interpret=jax.default_backend() == "cpu")
    out_BxTxHxD, lse_BxHxT = block(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, causal=causal)
    out_BxTxHxD = out_BxTxHxD.astype(jnp.float32)
    me = jax.lax.axis_index(axis_name)
    to_next = [(j, (j + 1) % axis_size) for j in range(axis_size)]
    k_cur, v_cur = k_BxTxKxD, v_BxTxKxD

    def skipped(q, k, v) -> tuple[jax.Array, jax.Array]:
        B, T, H, D = q.shape
        return jnp.zeros((B, T, H, D), q.dtype), jnp.full((B, H, T), -jnp.inf, jnp.float32)

    def full(q, k, v) -> tuple[jax.Array, jax.Array]:
        out, lse = block(q, k, v, causal=False)
        return out.astype(q.dtype), lse

    for step in range(1, axis_size):
        k_cur, v_cur = jax.lax.ppermute((k_cur, v_cur), axis_name, to_next)
        # this device now holds chunk (me - step) mod n: earlier than its own exactly when step <= me
        if causal:
            out_b, lse_b = jax.lax.cond(step <= me, full, skipped, q_BxTxHxD, k_cur, v_cur)
        else:
            out_b, lse_b = full(q_BxTxHxD, k_cur, v_cur)
        out_BxTxHxD, lse_BxHxT = merge_blocks(out_BxTxHxD, lse_BxHxT, out_b, lse_b)
    return out_BxTxHxD.astype(q_BxTxHxD.dtype)
