"""Verifying drafted tokens: the rejection sampler of speculative decoding (Leviathan et al. 2023; Chen et al.
2023), which keeps the target model's distribution exactly.

A proposer drafts Nd tokens for a row, drawn from its distribution q (a draft model, a draft head), or chosen
deterministically (n-gram lookup: q is one-hot on the drafted token). The target scores the row's Nd + 1 positions
in one forward, giving p at each. Drafted token x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), in
order, until the first rejection; at a rejection at j the row's next token is drawn from the residual
normalize(max(0, p_j - q_j)); when all Nd are accepted a bonus token is drawn from p at position Nd. A greedy row
(temperature 0) accepts while the draft equals the target's argmax and then takes the argmax. Each row emits
between 1 and Nd + 1 tokens, distributed as the target's own sampling would make them (p is the target's
*filtered* distribution: temperature, top-k, top-p and min-p applied, serve/sampling.py `filtered_logits`).

Randomness: row r uses `row_key(seed, counter)` of serve/sampling.py, split once for the Nd acceptance uniforms
and the final draw, so a seeded request's tokens do not depend on what else shares the batch. Shapes (the legend
of model/kernels/flash_attention.py): Rs rows (sampling slots), Nd drafted tokens per row, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from serve.sampling import filtered_logits, row_key


def target_probs(logits_RsxNd1xV: jax.Array, temperature_Rs: jax.Array, top_k_Rs: jax.Array, top_p_Rs: jax.Array,
                 min_p_Rs: jax.Array) -> jax.Array:
    """Each row's filtered target distribution [Rs, Nd + 1, V] at each verified position (float32)."""
    def row(logits_Nd1xV: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
            min_p: jax.Array) -> jax.Array:
        filtered = jax.vmap(lambda lg: filtered_logits(lg, temperature, top_k, top_p, min_p))(logits_Nd1xV)
        return jax.nn.softmax(filtered, axis=-1)

    return jax.vmap(row)(logits_RsxNd1xV, temperature_Rs, top_k_Rs, top_p_Rs, min_p_Rs)


def verify_drafts(draft_RsxNd: jax.Array, draft_probs_RsxNdxV: jax.Array | None, probs_RsxNd1xV: jax.Array,
                  greedy_Rs: jax.Array, seeds_Rs: jax.Array, counters_Rs: jax.Array,
                  num_drafts_Rs: jax.Array | None = None, argmax_RsxNd1: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """The tokens each row emits [Rs, Nd + 1] (the accepted drafts, then the residual or bonus token; entries past a
    row's count are -1) and the count [Rs] (1 to Nd + 1). `draft_probs_RsxNdxV` is q at each drafted position, or None
    for deterministic drafts (q one-hot). `probs_RsxNd1xV` is the target's filtered distribution (`target_probs`).
    A row with `num_drafts_Rs` n < Nd verifies its first n drafts only (the rest are padding): accepting all n draws
    the bonus at position n. A greedy row compares the draft with `argmax_RsxNd1` (default: the argmax of p)."""
    Rs, Nd = draft_RsxNd.shape
    if num_drafts_Rs is None:
        num_drafts_Rs = jnp.full((Rs,), Nd, jnp.int32)
    if argmax_RsxNd1 is None:
        argmax_RsxNd1 = jnp.argmax(probs_RsxNd1xV, axis=-1)

    def row(draft_Nd: jax.Array, q_NdxV: jax.Array | None, p_Nd1xV: jax.Array, greedy: jax.Array, seed: jax.Array,
            counter: jax.Array, num_drafts: jax.Array, argmax_Nd1: jax.Array) -> tuple[jax.Array, jax.Array]:
        V = p_Nd1xV.shape[-1]
        draft_Nd = jnp.maximum(draft_Nd, 0)
        if q_NdxV is None:
            q_NdxV = jax.nn.one_hot(draft_Nd, V, dtype=jnp.float32)
        key_accept, key_draw = jax.random.split(row_key(seed, counter))
        p_tok_Nd = jnp.take_along_axis(p_Nd1xV[:Nd], draft_Nd[:, None], axis=1)[:, 0]
        q_tok_Nd = jnp.take_along_axis(q_NdxV, draft_Nd[:, None], axis=1)[:, 0]
        u_Nd = jax.random.uniform(key_accept, (Nd,))
        sampled_ok_Nd = u_Nd * q_tok_Nd < p_tok_Nd  # u < p / q, without dividing by q
        greedy_ok_Nd = draft_Nd == argmax_Nd1[:Nd]
        ok_Nd = jnp.where(greedy, greedy_ok_Nd, sampled_ok_Nd) & (jnp.arange(Nd) < num_drafts)
        accepted = jnp.sum(jnp.cumprod(ok_Nd.astype(jnp.int32)))
        p_V = p_Nd1xV[accepted]
        q_V = jnp.where(accepted < num_drafts, q_NdxV[jnp.minimum(accepted, Nd - 1)], 0.0)
        residual_V = jnp.maximum(p_V - q_V, 0.0)
        # p == q leaves no residual mass; a rejection then had probability 0 (only rounding gets here): draw from p
        residual_V = jnp.where(jnp.sum(residual_V) > 0, residual_V, p_V)
        drawn = jax.random.categorical(key_draw, jnp.log(residual_V))
        last = jnp.where(greedy, argmax_Nd1[accepted], drawn).astype(jnp.int32)
        position_Nd1 = jnp.arange(Nd + 1)
        tokens_Nd1 = jnp.where(position_Nd1 < accepted, jnp.append(draft_Nd, 0), -1)
        return jnp.where(position_Nd1 == accepted, last, tokens_Nd1).astype(jnp.int32), accepted + 1

    args = (draft_RsxNd, probs_RsxNd1xV, greedy_Rs, seeds_Rs, counters_Rs, num_drafts_Rs, argmax_RsxNd1)
    if draft_probs_RsxNdxV is None:
        return jax.vmap(lambda d, p, g, s, c, n, a: row(d, None, p, g, s, c, n, a))(*args)
    return jax.vmap(row)(draft_RsxNd, draft_probs_RsxNdxV, *args[1:])


def verify_rows(logits_RsxNd1xV: jax.Array, draft_RsxNd: jax.Array, draft_probs_RsxNdxV: jax.Array | None,
                seeds_Rs: jax.Array, counters_Rs: jax.Array, temperature_Rs: jax.Array, top_k_Rs: jax.Array,
                top_p_Rs: jax.Array, min_p_Rs: jax.Array) -> jax.Array:
    """The engine's verification of a step's decode rows: each row's target logits at its Nd + 1 positions and its
    drafts (-1: padding, none drafted there). Returns the tokens each row emits [Rs, Nd + 1], -1 past its count. An
    all-greedy batch skips the filtered distributions (a sort of the vocabulary per position)."""
    num_drafts_Rs = jnp.sum(draft_RsxNd >= 0, axis=1).astype(jnp.int32)
    argmax_RsxNd1 = jnp.argmax(logits_RsxNd1xV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    greedy_Rs = temperature_Rs == 0

    def sampled() -> jax.Array:
        probs = target_probs(logits_RsxNd1xV, temperature_Rs, top_k_Rs, top_p_Rs, min_p_Rs)
        return verify_drafts(draft_RsxNd, draft_probs_RsxNdxV, probs, greedy_Rs, seeds_Rs, counters_Rs,
                             num_drafts_Rs, argmax_RsxNd1)[0]

    def greedy() -> jax.Array:
        Nd = draft_RsxNd.shape[1]
        ok_RsxNd = (draft_RsxNd == argmax_RsxNd1[:, :Nd]) & (jnp.arange(Nd)[None] < num_drafts_Rs[:, None])
        accepted_Rs = jnp.sum(jnp.cumprod(ok_RsxNd.astype(jnp.int32), axis=1), axis=1)
        position_Nd1 = jnp.arange(Nd + 1)[None]
        kept = jnp.where(position_Nd1 < accepted_Rs[:, None], jnp.pad(draft_RsxNd, ((0, 0), (0, 1))), -1)
        last_Rs = jnp.take_along_axis(argmax_RsxNd1, accepted_Rs[:, None], axis=1)
        return jnp.where(position_Nd1 == accepted_Rs[:, None], last_Rs, kept).astype(jnp.int32)

    return jax.lax.cond(jnp.any(~greedy_Rs), sampled, greedy)
