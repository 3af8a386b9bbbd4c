"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus) and min-p sampling, each row with
its own parameters and random stream (the one sampler of the engine, static batching and the naive decoder); and
the log-probabilities a request may ask for."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's limit); the device always computes this many


def filtered_logits(logits_V: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array) -> jax.Array:
    """One row's logits [V] divided by the temperature, with the ids top-k, top-p and min-p drop set to -inf: the
    distribution a request samples from (softmax of this), which speculative decoding must preserve. Top_k 0
    keeps all ids; min_p drops ids whose probability is below min_p times the most likely id's."""
    scaled_V = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_V = jnp.sort(scaled_V)[::-1]
    kth = jnp.where(top_k > 0, sorted_V[jnp.clip(top_k - 1, 0, sorted_V.shape[0] - 1)], -jnp.inf)
    probs_V = jax.nn.softmax(jnp.where(sorted_V < kth, -jnp.inf, sorted_V))
    mass_before_V = jnp.cumsum(probs_V) - probs_V
    cutoff = jnp.min(jnp.where((mass_before_V < top_p) & (sorted_V >= kth), sorted_V, jnp.inf))
    min_p_cut = jnp.where(min_p > 0, sorted_V[0] + jnp.log(jnp.maximum(min_p, 1e-30)), -jnp.inf)
    return jnp.where(scaled_V < jnp.maximum(jnp.maximum(cutoff, kth), min_p_cut), -jnp.inf, scaled_V)


def row_key(seed: jax.Array, counter: jax.Array) -> jax.Array:
    """The random key of a request's draw number `counter` (its output tokens so far)."""
    return jax.random.fold_in(jax.random.key(seed), counter)


def sample_rows(logits_BxV: jax.Array, seeds_B: jax.Array, counters_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array, min_p_B: jax.Array | None = None) -> jax.Array:
    """Token ids [B], each row with its own sampling parameters (`filtered_logits`) and its own random stream: row
    b draws with `row_key(seeds_B[b], counters_B[b])` (counter = the request's output tokens so far), so a seeded
    request gets the same tokens whatever else shares the batch. Temperature 0 is greedy."""
    if min_p_B is None:
        min_p_B = jnp.zeros_like(top_p_B)

    def one(logits_V: jax.Array, seed: jax.Array, counter: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array, min_p: jax.Array) -> jax.Array:
        drawn = jax.random.categorical(row_key(seed, counter),
                                       filtered_logits(logits_V, temperature, top_k, top_p, min_p))
        return jnp.where(temperature == 0, jnp.argmax(logits_V), drawn).astype(jnp.int32)

    def drawn() -> jax.Array:
        return jax.vmap(one)(logits_BxV, seeds_B, counters_B, temperature_B, top_k_B, top_p_B, min_p_B)

    # An all-greedy batch (the common case) skips the per-row sort of the vocabulary: on a CPU that sort costs as
    # much as a small model's forward pass.
    greedy_B = jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature_B != 0), drawn, lambda: greedy_B)


def token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array, wanted: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log-probability of each row's token [B] and the MAX_LOGPROBS most likely ids and their log-probabilities
    [B, MAX_LOGPROBS], under the model's own distribution (the logits before temperature and cuts, as vLLM
    reports them). Computed only when `wanted` (a scalar bool) is true; zeros otherwise."""
    B = logits_BxV.shape[0]

    def compute() -> tuple[jax.Array, jax.Array, jax.Array]:
        logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
        top_lp_BxK, top_ids_BxK = jax.lax.top_k(logp_BxV, MAX_LOGPROBS)
        return jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=1)[:, 0], top_ids_BxK.astype(jnp.int32), top_lp_BxK

    def skip() -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros(B, jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((B, MAX_LOGPROBS), jnp.float32))

    return jax.lax.cond(wanted, compute, skip)
