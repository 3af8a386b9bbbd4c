"""Verifying drafted tokens: the rejection sampler of speculative decoding (Leviathan et al. 2023; Chen et al.
2023), which keeps the target model's distribution exactly.

A proposer drafts J tokens for a row, drawn from its distribution q (a draft model, a draft head), or chosen
deterministically (n-gram lookup: q is one-hot on the drafted token). The target scores the row's J + 1 positions in
one forward, giving p at each. Drafted token x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), in order,
until the first rejection; at a rejection at j the row's next token is drawn from the residual
normalize(max(0, p_j - q_j)); when all J are accepted a bonus token is drawn from p_J. A greedy row (temperature 0)
accepts while the draft equals the target's argmax and then takes the argmax. Each row emits between 1 and J + 1
tokens, distributed as the target's own sampling would make them (p is the target's *filtered* distribution:
temperature, top-k, top-p and min-p applied, serve/sampling.py `filtered_logits`).

Randomness: row r uses `row_key(seed, counter)` of serve/sampling.py, split once for the J acceptance uniforms and
the final draw, so a seeded request's tokens do not depend on what else shares the batch. Shapes: R rows, J drafted
tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from serve.sampling import filtered_logits, row_key


def target_probs(logits_RxJ1xV: jax.Array, temperature_R: jax.Array, top_k_R: jax.Array, top_p_R: jax.Array,
                 min_p_R: jax.Array) -> jax.Array:
    """Each row's filtered target distribution [R, J + 1, V] at each verified position (float32)."""
    def row(logits_J1xV: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
            min_p: jax.Array) -> jax.Array:
        filtered = jax.vmap(lambda lg: filtered_logits(lg, temperature, top_k, top_p, min_p))(logits_J1xV)
        return jax.nn.softmax(filtered, axis=-1)

    return jax.vmap(row)(logits_RxJ1xV, temperature_R, top_k_R, top_p_R, min_p_R)


def verify_drafts(draft_RxJ: jax.Array, draft_probs_RxJxV: jax.Array | None, probs_RxJ1xV: jax.Array,
                  greedy_R: jax.Array, seeds_R: jax.Array, counters_R: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tokens each row emits [R, J + 1] (the accepted drafts, then the residual or bonus token; entries past a
    row's count are -1) and the count [R] (1 to J + 1). `draft_probs_RxJxV` is q at each drafted position, or None
    for deterministic drafts (q one-hot). `probs_RxJ1xV` is the target's filtered distribution (`target_probs`);
    a greedy row compares the draft with its argmax."""
    R, J = draft_RxJ.shape

    def row(draft_J: jax.Array, q_JxV: jax.Array | None, p_J1xV: jax.Array, greedy: jax.Array, seed: jax.Array,
            counter: jax.Array) -> tuple[jax.Array, jax.Array]:
        V = p_J1xV.shape[-1]
        if q_JxV is None:
            q_JxV = jax.nn.one_hot(draft_J, V, dtype=jnp.float32)
        key_accept, key_draw = jax.random.split(row_key(seed, counter))
        p_tok_J = jnp.take_along_axis(p_J1xV[:J], draft_J[:, None], axis=1)[:, 0]
        q_tok_J = jnp.take_along_axis(q_JxV, draft_J[:, None], axis=1)[:, 0]
        u_J = jax.random.uniform(key_accept, (J,))
        sampled_ok_J = u_J * q_tok_J < p_tok_J  # u < p / q, without dividing by q
        greedy_ok_J = draft_J == jnp.argmax(p_J1xV[:J], axis=-1)
        accepted = jnp.sum(jnp.cumprod(jnp.where(greedy, greedy_ok_J, sampled_ok_J).astype(jnp.int32)))
        p_V = p_J1xV[accepted]
        q_V = jnp.where(accepted < J, q_JxV[jnp.minimum(accepted, J - 1)], 0.0)
        residual_V = jnp.maximum(p_V - q_V, 0.0)
        # p == q leaves no residual mass; a rejection then had probability 0 (only rounding gets here): draw from p
        residual_V = jnp.where(jnp.sum(residual_V) > 0, residual_V, p_V)
        drawn = jax.random.categorical(key_draw, jnp.log(residual_V))
        last = jnp.where(greedy, jnp.argmax(p_V), drawn).astype(jnp.int32)
        position_J1 = jnp.arange(J + 1)
        tokens_J1 = jnp.where(position_J1 < accepted, jnp.append(draft_J, 0), -1)
        return jnp.where(position_J1 == accepted, last, tokens_J1).astype(jnp.int32), accepted + 1

    if draft_probs_RxJxV is None:
        return jax.vmap(lambda d, p, g, s, c: row(d, None, p, g, s, c))(
            draft_RxJ, probs_RxJ1xV, greedy_R, seeds_R, counters_R)
    return jax.vmap(row)(draft_RxJ, draft_probs_RxJxV, probs_RxJ1xV, greedy_R, seeds_R, counters_R)
