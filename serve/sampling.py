"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling, each row with its
own parameters and random stream (the one sampler of the engine, static batching and the naive decoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits_BxV: jax.Array, seeds_B: jax.Array, counters_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Token ids [B], each row with its own sampling parameters and its own random stream: row b draws with the
    key fold_in(key(seeds_B[b]), counters_B[b]) (counter = the request's output tokens so far), so a seeded
    request gets the same tokens whatever else shares the batch. Temperature 0 is greedy; top_k 0 keeps all ids."""
    def one(logits_V: jax.Array, seed: jax.Array, counter: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> jax.Array:
        logits_V = logits_V.astype(jnp.float32)
        scaled_V = logits_V / jnp.maximum(temperature, 1e-6)
        sorted_V = jnp.sort(scaled_V)[::-1]
        kth = jnp.where(top_k > 0, sorted_V[jnp.clip(top_k - 1, 0, sorted_V.shape[0] - 1)], -jnp.inf)
        probs_V = jax.nn.softmax(jnp.where(sorted_V < kth, -jnp.inf, sorted_V))
        mass_before_V = jnp.cumsum(probs_V) - probs_V
        cutoff = jnp.min(jnp.where((mass_before_V < top_p) & (sorted_V >= kth), sorted_V, jnp.inf))
        masked_V = jnp.where(scaled_V < jnp.maximum(cutoff, kth), -jnp.inf, scaled_V)
        key = jax.random.fold_in(jax.random.key(seed), counter)
        drawn = jax.random.categorical(key, masked_V)
        return jnp.where(temperature == 0, jnp.argmax(logits_V), drawn).astype(jnp.int32)

    def drawn() -> jax.Array:
        return jax.vmap(one)(logits_BxV, seeds_B, counters_B, temperature_B, top_k_B, top_p_B)

    # An all-greedy batch (the common case) skips the per-row sort of the vocabulary: on a CPU that sort costs as
    # much as a small model's forward pass.
    greedy_B = jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature_B != 0), drawn, lambda: greedy_B)
