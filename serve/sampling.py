"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits_BxV: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Token ids [B]: argmax when temperature == 0; otherwise a draw from softmax(logits / temperature)
    restricted to the `top_k` most likely ids (0 = all) and to the smallest set whose mass reaches `top_p`."""
    logits = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth_BxK = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_BxK, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token if the mass above it is < top_p
        cutoff_Bx1 = jnp.min(jnp.where(mass_before < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff_Bx1, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
