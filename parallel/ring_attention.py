"""Ring attention (Liu et al., 2023): causal self-attention over a sequence sharded in contiguous chunks over a
ring of devices, without ever gathering it, in activation memory O(chunk) per device.

Forward. Device i holds query, key and value chunk i. In n - 1 steps the key/value chunks travel once around
the ring (`ppermute` to the next device) while each device attends its queries to the chunk it holds with our
flash kernel: its own chunk with the causal mask, earlier chunks in full, later chunks not at all. The partial
results are merged by their log-sum-exps in float32 (`merge_blocks`). Only q, k, v, the output and the final lse
are kept for the backward.

Backward (a custom VJP, not JAX's transpose, which would keep every visiting K/V chunk: the whole sequence's K/V
per layer). K and V go around the ring a second time, now with float32 dK/dV accumulators travelling beside
them; each device adds its queries' share of the chunk's gradients (the flash backward kernels for one block,
given the whole softmax's lse and delta) and accumulates dQ locally. After n - 1 hops a chunk's dK/dV sits one
device short of its owner; one more hop brings it home. Per layer each device sends K and V 2(n - 1) times and
dK/dV n times.

With a contiguous layout the causal ring is unbalanced: device i computes i + 1 blocks, so the last device sets
the pace; skipped blocks cost nothing (`lax.cond`) but do not shorten the critical path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from model.kernels.flash_attention import flash_attention, flash_attention_block_grads, merge_blocks


def ring_attention(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array, *,
                   axis_name: str | tuple[str, ...], axis_size: int, causal: bool = True,
                   interpret: bool = False) -> jax.Array:
    """Attention of this device's query chunk over the whole ring's keys and values. Call inside `shard_map`
    with the sequence dimension split over `axis_name` (`axis_size` devices, chunk i on the device of index i).
    Returns [B, T, H, Dh] in q's dtype. `interpret` runs the flash kernels interpreted (CPU)."""
    ring = _Ring(axis_name if isinstance(axis_name, str) else tuple(axis_name), int(axis_size), bool(causal),
                 bool(interpret))
    return _ring_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, ring)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The ring's static description: a hashable non-differentiable argument of the custom VJP."""

    axis_name: str | tuple[str, ...]
    axis_size: int
    causal: bool
    interpret: bool

    def shift(self, *xs: jax.Array) -> tuple[jax.Array, ...]:
        """Send each array to the next device on the ring (device j's to device j + 1)."""
        to_next = [(j, (j + 1) % self.axis_size) for j in range(self.axis_size)]
        return jax.lax.ppermute(xs, self.axis_name, to_next)

    def sees(self, step: int) -> jax.Array | bool:
        """Whether this device's queries see the chunk it holds after `step` hops: chunk (me - step) mod n,
        which is at or before its own exactly when step <= me."""
        return True if not self.causal else step <= jax.lax.axis_index(self.axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_attention(q, k, v, ring: _Ring):
    return _forward(q, k, v, ring)[0]


def _forward(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, ring: _Ring):
    out, lse = flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, causal=ring.causal, interpret=ring.interpret)
    out = out.astype(jnp.float32)

    def attend(q, k, v) -> tuple[jax.Array, jax.Array]:
        return flash_attention(q, k, v, causal=False, interpret=ring.interpret)

    def skip(q, k, v) -> tuple[jax.Array, jax.Array]:
        B, T, H, Dh = q.shape
        return jnp.zeros((B, T, H, Dh), q.dtype), jnp.full((B, H, T), -jnp.inf, jnp.float32)

    k_cur, v_cur = k_BxTxKxDh, v_BxTxKxDh
    for step in range(1, ring.axis_size):
        k_cur, v_cur = ring.shift(k_cur, v_cur)
        out_b, lse_b = jax.lax.cond(ring.sees(step), attend, skip, q_BxTxHxDh, k_cur, v_cur)
        out, lse = merge_blocks(out, lse, out_b, lse_b)
    out = out.astype(q_BxTxHxDh.dtype)
    return out, (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, out, lse)


def _backward(ring: _Ring, residuals, do_BxTxHxDh):
    q, k, v, out, lse = residuals
    delta_BxHxT = jnp.sum(out.astype(jnp.float32) * do_BxTxHxDh.astype(jnp.float32), axis=-1).transpose(0, 2, 1)

    def grads(q, k, v, causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        return flash_attention_block_grads(q, k, v, do_BxTxHxDh, lse, delta_BxHxT, causal=causal,
                                           interpret=ring.interpret)

    def skip(q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

    dq, dk, dv = grads(q, k, v, ring.causal)
    dq, dk, dv = (x.astype(jnp.float32) for x in (dq, dk, dv))
    k_cur, v_cur = k, v
    for step in range(1, ring.axis_size):
        k_cur, v_cur, dk, dv = ring.shift(k_cur, v_cur, dk, dv)  # a chunk's dK/dV travel with it
        dq_b, dk_b, dv_b = jax.lax.cond(ring.sees(step), functools.partial(grads, causal=False), skip,
                                        q, k_cur, v_cur)
        dq, dk, dv = dq + dq_b.astype(jnp.float32), dk + dk_b.astype(jnp.float32), dv + dv_b.astype(jnp.float32)
    if ring.axis_size > 1:
        dk, dv = ring.shift(dk, dv)  # home: chunk j's gradients were one device short, on j - 1
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention.defvjp(lambda q, k, v, ring: _forward(q, k, v, ring), _backward)
