"""Next-token cross-entropy: over materialised logits, or fused with the LM head so the [B, T, vocab] logits
and their gradient never exist whole (the chunked "linear cross-entropy" of Liger-Kernel and MaxText's vocab
tiling).

The fused form computes the loss's gradient during the forward pass, one chunk of tokens at a time: logits of the
chunk in float32, their softmax, `softmax - onehot` rounded to `grad_dtype`, and the two head matmuls. It keeps
only dL/dx ([B, T, d_model]) and dL/dhead (float32 [d_model, vocab]); the backward scales them by the loss's
cotangent. So training does the same three head matmuls as the unfused loss, with no recomputation, and the
largest temporary is one chunk's logits. Without differentiation (eval) only the loss is computed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from model import axes


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, in float32."""
    logits = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz_BxT - target_logit_BxT)


def linear_cross_entropy(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array, chunks: int,
                         grad_dtype: jnp.dtype | None = None) -> jax.Array:
    """`cross_entropy(x @ head, targets)` (float32 logits) without materialising the logits: the sequence is cut
    into `chunks` strided chunks (token t in chunk t % chunks, so a sequence-sharded axis stays sharded) and the
    loss and its gradient are computed one chunk at a time. `grad_dtype` is the dtype of the logits' gradient fed
    to the head's backward matmuls (default: float32; the compute dtype makes them bfloat16 GEMMs)."""
    T = targets_BxT.shape[1]
    if not isinstance(chunks, int) or chunks < 1 or T % chunks:
        raise ValueError(f"loss chunks must be a positive divisor of the sequence length {T}, got {chunks!r}")
    grad_dtype = jnp.dtype(jnp.float32 if grad_dtype is None else grad_dtype)
    return _fused(x_BxTxD, head_DxV, targets_BxT, chunks, grad_dtype)


def _to_chunks(a_BxTx_: jax.Array, chunks: int) -> jax.Array:
    """[B, T, ...] -> [chunks, B, T / chunks, ...] with token t in chunk t % chunks."""
    B, T = a_BxTx_.shape[:2]
    a = a_BxTx_.reshape(B, T // chunks, chunks, *a_BxTx_.shape[2:])
    return jnp.moveaxis(a, 2, 0)


def _from_chunks(a_NcxBxTcx_: jax.Array) -> jax.Array:
    """The inverse of `_to_chunks`."""
    a = jnp.moveaxis(a_NcxBxTcx_, 0, 2)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _chunk_logits(x_BxTxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    logits = jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV, preferred_element_type=jnp.float32)
    return axes.constrain(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))


def _nll_sum(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target), logsumexp [B, T])."""
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(logz_BxT - target_logit_BxT), logz_BxT


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array, chunks: int,
           grad_dtype: jnp.dtype) -> jax.Array:
    def body(total: jax.Array, chunk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        x_c, t_c = chunk
        return total + _nll_sum(_chunk_logits(x_c, head_DxV), t_c)[0], None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_to_chunks(x_BxTxD, chunks), _to_chunks(targets_BxT, chunks)))
    return total / targets_BxT.size


def _fused_fwd(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array, chunks: int,
               grad_dtype: jnp.dtype) -> tuple[jax.Array, tuple]:
    scale = 1.0 / targets_BxT.size

    def body(carry: tuple[jax.Array, jax.Array], chunk: tuple[jax.Array, jax.Array]
             ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        total, dhead_DxV = carry
        x_c, t_c = chunk
        logits = _chunk_logits(x_c, head_DxV)
        nll, logz = _nll_sum(logits, t_c)
        probs = jnp.exp(logits - logz[..., None])
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t_c[..., None]
        dlogits = ((jnp.where(is_target, probs - 1.0, probs)) * scale).astype(grad_dtype)
        dx_c = jnp.einsum("btv,dv->btd", dlogits, head_DxV.astype(grad_dtype), preferred_element_type=jnp.float32)
        dhead_DxV = dhead_DxV + jnp.einsum("btd,btv->dv", x_c.astype(grad_dtype), dlogits,
                                           preferred_element_type=jnp.float32)
        return (total + nll, dhead_DxV), dx_c.astype(x_BxTxD.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_DxV.shape, jnp.float32))
    (total, dhead_DxV), dx_chunks = jax.lax.scan(
        body, init, (_to_chunks(x_BxTxD, chunks), _to_chunks(targets_BxT, chunks)))
    head_dtype = jnp.zeros((0,), head_DxV.dtype)  # residuals must be arrays: this one carries the dtype
    return total * scale, (_from_chunks(dx_chunks), dhead_DxV, head_dtype)


def _fused_bwd(chunks: int, grad_dtype: jnp.dtype, residuals: tuple, g: jax.Array) -> tuple:
    dx_BxTxD, dhead_DxV, head_dtype = residuals
    return dx_BxTxD * g.astype(dx_BxTxD.dtype), (dhead_DxV * g).astype(head_dtype.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
