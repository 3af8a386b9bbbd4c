"""The rejection sampler of speculative decoding against the target distribution it must preserve (the style of
vLLM's rejection-sampler tests): many seeded draws over a small vocabulary, with drafts drawn from a different
distribution; a subtly wrong acceptance rule must fail the same test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from serve.sampling import filtered_logits
from serve.speculative import target_probs, verify_drafts

V, J = 6, 3
SIGNIFICANCE = 1e-3  # chi-square: a correct sampler fails it one run in a thousand


def _distributions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V), size=J + 1).astype(np.float32)  # the target at each verified position
    q = rng.dirichlet(np.ones(V) * 0.5, size=J).astype(np.float32)  # a draft that disagrees with it
    return p, q


def _emitted(p: np.ndarray, q: np.ndarray | None, n: int, seed: int, verify=verify_drafts) -> np.ndarray:
    """n rows verified at once; returns tokens [n, J + 1] (-1 past each row's count). The target does not depend
    on the prefix, so every emitted token, at every position, must be distributed as p at its position."""
    key = jax.random.key(seed)
    if q is None:
        drafts = jnp.asarray(np.random.default_rng(seed).integers(0, V, (n, J)), jnp.int32)
    else:
        keys = jax.random.split(key, J)
        drafts = jnp.stack([jax.random.categorical(keys[j], jnp.log(q[j]), shape=(n,)) for j in range(J)], 1)
    qs = None if q is None else jnp.broadcast_to(jnp.asarray(q), (n, J, V))
    tokens, counts = verify(drafts.astype(jnp.int32), qs, jnp.broadcast_to(jnp.asarray(p), (n, J + 1, V)),
                            jnp.zeros(n, bool), jnp.arange(n, dtype=jnp.uint32) + seed * n, jnp.zeros(n, jnp.int32))
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    assert ((counts >= 1) & (counts <= J + 1)).all()
    assert ((tokens >= 0) == (np.arange(J + 1)[None] < counts[:, None])).all()
    return tokens


def _chi_square_p(tokens_at: np.ndarray, p_V: np.ndarray) -> float:
    counts = np.bincount(tokens_at, minlength=V)
    p_V = p_V.astype(np.float64) / p_V.sum(dtype=np.float64)
    return stats.chisquare(counts, p_V * counts.sum()).pvalue


def _wrong_no_residual(draft, q, p, greedy, seeds, counters):
    """A subtly wrong rule: on rejection, draw from p itself instead of the residual max(0, p - q)."""
    def row(d, qq, pp, s):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(s), 0))
        p_tok = pp[jnp.arange(J), d]
        q_tok = qq[jnp.arange(J), d]
        ok = jax.random.uniform(keys[0], (J,)) * q_tok < p_tok
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        last = jax.random.categorical(keys[1], jnp.log(pp[n]))
        pos = jnp.arange(J + 1)
        out = jnp.where(pos < n, jnp.append(d, 0), -1)
        return jnp.where(pos == n, last, out).astype(jnp.int32), n + 1
    return jax.vmap(row)(draft, q, p, seeds)


@pytest.mark.parametrize("deterministic_drafts", [False, True], ids=["draft-distribution", "one-hot-drafts"])
def test_emitted_tokens_follow_the_target_distribution(deterministic_drafts):
    p, q = _distributions(0)
    tokens = _emitted(p, None if deterministic_drafts else q, 40_000, seed=1)
    for j in range(J + 1):
        at = tokens[:, j][tokens[:, j] >= 0]
        assert _chi_square_p(at, p[j]) > SIGNIFICANCE, f"position {j}"


@pytest.mark.slow
def test_error_shrinks_against_the_target_not_against_random_distributions():
    """vLLM's check: the empirical distribution of the first emitted token approaches p as draws grow, while its
    distance to random reference distributions does not shrink."""
    p, q = _distributions(2)
    rng = np.random.default_rng(3)
    references = rng.dirichlet(np.ones(V), size=20)
    errors, ref_errors = [], []
    for n in (500, 50_000):
        first = _emitted(p, q, n, seed=4)[:, 0]
        empirical = np.bincount(first, minlength=V) / n
        errors.append(np.abs(empirical - p[0]).sum())
        ref_errors.append(np.abs(empirical[None] - references).sum(1).min())
    assert errors[1] < errors[0] / 3  # ~ 1/sqrt(n): a 10x smaller error expected
    assert ref_errors[1] > 0.5 * ref_errors[0]


def test_a_rule_without_the_residual_fails_the_same_test():
    p, q = _distributions(0)
    tokens = _emitted(p, q, 40_000, seed=1, verify=_wrong_no_residual)
    p_values = [_chi_square_p(tokens[:, j][tokens[:, j] >= 0], p[j]) for j in range(J)]
    assert min(p_values) < SIGNIFICANCE


def test_the_target_as_its_own_draft_accepts_everything():
    p, _ = _distributions(5)
    n = 2000
    keys = jax.random.split(jax.random.key(6), J)
    drafts = jnp.stack([jax.random.categorical(keys[j], jnp.log(p[j]), shape=(n,)) for j in range(J)], 1)
    tokens, counts = verify_drafts(drafts.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(p[:J]), (n, J, V)),
                                   jnp.broadcast_to(jnp.asarray(p), (n, J + 1, V)), jnp.zeros(n, bool),
                                   jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32))
    assert (np.asarray(counts) == J + 1).all()
    np.testing.assert_array_equal(np.asarray(tokens)[:, :J], np.asarray(drafts))


def test_greedy_rows_accept_while_the_draft_is_the_argmax():
    p, q = _distributions(7)
    best = p.argmax(-1)
    drafts = np.array([[best[0], best[1], best[2]],  # all accepted: the bonus is argmax p[3]
                       [best[0], (best[1] + 1) % V, best[2]],  # rejected at 1: the argmax there
                       [(best[0] + 1) % V, best[1], best[2]]], np.int32)
    tokens, counts = verify_drafts(jnp.asarray(drafts), jnp.broadcast_to(jnp.asarray(q), (3, J, V)),
                                   jnp.broadcast_to(jnp.asarray(p), (3, J + 1, V)), jnp.ones(3, bool),
                                   jnp.zeros(3, jnp.uint32), jnp.zeros(3, jnp.int32))
    np.testing.assert_array_equal(np.asarray(counts), [4, 2, 1])
    np.testing.assert_array_equal(np.asarray(tokens), [[best[0], best[1], best[2], best[3]],
                                                       [best[0], best[1], -1, -1],
                                                       [best[0], -1, -1, -1]])


def test_target_probs_are_the_samplers_filtered_distribution():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.standard_normal((2, J + 1, 50)), jnp.float32)
    temperature, top_k, top_p, min_p = (jnp.array([0.7, 1.3]), jnp.array([0, 5]), jnp.array([0.9, 1.0]),
                                        jnp.array([0.05, 0.0]))
    got = np.asarray(target_probs(logits, temperature, top_k, top_p, min_p))
    for r in range(2):
        for j in range(J + 1):
            want = jax.nn.softmax(filtered_logits(logits[r, j], temperature[r], top_k[r], top_p[r], min_p[r]))
            np.testing.assert_allclose(got[r, j], np.asarray(want), rtol=1e-6, atol=1e-7)
    assert (np.count_nonzero(got[1], axis=-1) == 5).all()  # top_k 5 keeps exactly 5 ids
