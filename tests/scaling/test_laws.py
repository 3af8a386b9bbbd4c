"""Scaling-law fits against published refits, closed forms and synthetic data from known laws.

References and tolerances:
- Chinchilla Figure-4 points (245, digitised by Besiroglu et al. 2024; the 5 highest losses dropped): their refit is
  E=1.817, A=482.0, B=2085.4, alpha=0.3478, beta=0.3658 (tests/scaling/data/README.md). E, alpha, beta must agree
  within 2%
  (the brief's bar; we land within 0.5%). A and B are weakly identified (A trades against alpha, B against beta):
  Besiroglu et al. minimise a Huber *likelihood* with a fitted scale, not Hoffmann's plain Huber loss, so their optimum
  differs slightly from ours (we land 1% and 3% away). We could not retrieve their published intervals here, so A and
  B are held to [400, 600] and [1500, 3000]: inside our own 80% bootstrap intervals (n_boot=1000, seed 0: A in
  [349, 651], B in [1437, 3776]) and tighter than them; the bootstrap test checks that the published point estimates
  fall inside our 80% intervals.
- Compute-optimal: Besiroglu et al. report N_opt proportional to C^0.513 and ~20 tokens per parameter.
- Synthetic data without noise: the fit is exact up to the optimiser (rtol 1e-4). With 0.5% multiplicative noise on
  240 points the A-alpha ridge moves A by up to ~20% (seeds 0-3), while E, the exponents and predictions stay tight.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling import laws

DATA = Path(__file__).resolve().parent / "data" / "chinchilla_svg_extracted_data.csv"
PUBLISHED = {"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658}
TRUE = laws.LossLaw(E=1.8, A=400.0, B=1500.0, alpha=0.33, beta=0.30)


@pytest.fixture(scope="module")
def chinchilla():
    """(N, D, L) of the 240 points of the published protocol."""
    assert len(laws.chinchilla_points(DATA, drop=0)[0]) == 245
    return laws.chinchilla_points(DATA, drop=5)


@pytest.fixture(scope="module")
def chinchilla_fit(chinchilla):
    return laws.fit_loss_law(*chinchilla)


def synthetic_grid():
    n, d = np.meshgrid(np.logspace(7.5, 10.5, 12), np.logspace(9, 12, 20), indexing="ij")
    return n.ravel(), d.ravel()


def reference_objective(x, n, d, loss, delta=1e-3):
    """Hoffmann's objective written the obvious way (autodiff, logsumexp, optax's Huber)."""
    a, b, e, alpha, beta = x
    pred = jax.nn.logsumexp(jnp.stack([a - alpha * jnp.log(n), b - beta * jnp.log(d), jnp.full(n.shape, e)]), axis=0)
    return jnp.sum(optax.losses.huber_loss(pred, jnp.log(loss), delta=delta))


def test_compute_optimal_matches_brute_force():
    for C in (1e20, 5.76e23):
        n_opt, d_opt = TRUE.compute_optimal(C)
        assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-12)
        n = n_opt * np.exp(np.linspace(-1, 1, 200001))
        brute = n[np.argmin(TRUE.loss(n, C / (6 * n)))]
        assert n_opt == pytest.approx(brute, rel=1e-4)  # grid step 1e-5 in ln N
        assert TRUE.tokens_per_param(C) == pytest.approx(d_opt / n_opt)
    a, b = TRUE.exponents
    assert a == pytest.approx(0.30 / 0.63) and a + b == pytest.approx(1.0)


def test_hand_written_gradient_matches_autodiff():
    n, d = synthetic_grid()
    loss = TRUE.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.02, n.shape))
    data = (np.log(n), np.log(d), np.log(loss), np.ones_like(n), 1e-3)
    with jax.enable_x64(True):
        for x in np.random.default_rng(1).uniform([0, 0, -1, 0, 0], [25, 25, 1, 2, 2], size=(8, 5)):
            value, grad = jax.value_and_grad(laws.chinchilla_objective)(jnp.asarray(x), tuple(map(jnp.asarray, data)))
            ref_value, ref_grad = jax.value_and_grad(reference_objective)(jnp.asarray(x), n, d, loss)
            np.testing.assert_allclose(value, ref_value, rtol=1e-12)
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_chinchilla_fit_matches_besiroglu(chinchilla, chinchilla_fit):
    law = chinchilla_fit.law
    for name in ("E", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(PUBLISHED[name], rel=0.02), name
    assert 400 <= law.A <= 600 and 1500 <= law.B <= 3000
    assert chinchilla_fit.n_starts == 4500 and chinchilla_fit.n_converged >= 10
    # our optimum is at least as good as the published parameters under Hoffmann's objective
    with jax.enable_x64(True):
        p = PUBLISHED
        at_published = reference_objective(
            jnp.array([math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"]]), *chinchilla)
    assert chinchilla_fit.objective <= float(at_published)


@pytest.mark.slow
def test_chinchilla_compute_optimal(chinchilla_fit):
    law = chinchilla_fit.law
    assert law.exponents[0] == pytest.approx(0.513, rel=0.03)
    assert 10 <= law.tokens_per_param(5.76e23) <= 40  # Chinchilla: 70B params, 1.4T tokens, 20 tokens/param


@pytest.mark.slow
def test_bootstrap_intervals(chinchilla, chinchilla_fit):
    boot = laws.bootstrap_loss_law(*chinchilla, n_boot=64, seed=0, level=0.8, fit=chinchilla_fit)
    assert boot.samples.shape == (64, 5)
    for name, (lo, hi) in boot.intervals.items():
        assert lo < getattr(chinchilla_fit.law, name) < hi, name
        assert lo < PUBLISHED[name] < hi, name
    assert boot.intervals["E"][1] - boot.intervals["E"][0] < 0.2
    with pytest.raises(ValueError, match="level"):
        laws.bootstrap_loss_law(*chinchilla, level=80, fit=chinchilla_fit)


@pytest.mark.slow
def test_synthetic_recovery_exact():
    n, d = synthetic_grid()
    law = laws.fit_loss_law(n, d, TRUE.loss(n, d)).law
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name


@pytest.mark.slow
def test_synthetic_recovery_noisy():
    n, d = synthetic_grid()
    clean = TRUE.loss(n, d)
    law = laws.fit_loss_law(n, d, clean * np.exp(np.random.default_rng(0).normal(0, 0.005, n.shape))).law
    assert law.E == pytest.approx(TRUE.E, rel=0.03)
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.06) and law.beta == pytest.approx(TRUE.beta, rel=0.06)
    assert law.A == pytest.approx(TRUE.A, rel=0.3) and law.B == pytest.approx(TRUE.B, rel=0.3)
    assert law.exponents[0] == pytest.approx(TRUE.exponents[0], rel=0.03)
    assert np.max(np.abs(law.loss(n, d) / clean - 1)) < 0.01  # 2 sigma of the noise


def isoflop_points(noise: float, seed: int = 0):
    """9 budgets from 1e18 to 1e22 FLOPs, 9 model sizes each from N_opt/4 to 4 N_opt (off-centre by 1.3x)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.logspace(18, 22, 9):
        n_opt, _ = TRUE.compute_optimal(c)
        for n in 1.3 * n_opt * np.geomspace(0.25, 4, 9):
            rows.append((n, c, TRUE.loss(n, c / (6 * n)) * math.exp(rng.normal(0, noise))))
    return (np.array(col) for col in zip(*rows, strict=True))


def test_isoflop_recovers_closed_form_exponent():
    a_true = TRUE.exponents[0]
    n, c, loss = isoflop_points(noise=0.0)
    exact = laws.isoflop_fit(n, c, loss)
    assert len(exact.budgets) == 9 and exact.a == pytest.approx(a_true, rel=1e-6)
    n, c, loss = isoflop_points(noise=0.002)
    jittered = c * np.exp(np.random.default_rng(1).normal(0, 0.01, c.shape))  # near-equal budgets: binned
    for fit in (laws.isoflop_fit(n, jittered, loss), laws.isoflop_fit(n, c, loss, budgets=np.logspace(18, 22, 9))):
        assert len(fit.budgets) == 9
        assert fit.a == pytest.approx(a_true, rel=0.03) and fit.b == pytest.approx(1 - fit.a)
        n_opt, d_opt = fit.compute_optimal(1e21)
        assert n_opt == pytest.approx(TRUE.compute_optimal(1e21)[0], rel=0.1)
        assert 6 * n_opt * d_opt == pytest.approx(1e21)


@pytest.mark.slow
def test_kaplan_recovery():
    true = laws.KaplanLaw(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095)  # Kaplan et al. 2020, eq. 1.5
    n, d = synthetic_grid()
    fit = laws.fit_kaplan_law(n, d, true.loss(n, d))
    for name in ("N_c", "D_c", "alpha_N", "alpha_D"):
        assert getattr(fit.law, name) == pytest.approx(getattr(true, name), rel=1e-3), name
    assert fit.n_starts == len(laws.kaplan_grid())


def test_minimizer_is_generic():
    def rosenbrock(x, data):
        (scale,) = data
        return (1 - x[0]) ** 2 + scale * (x[1] - x[0] ** 2) ** 2

    x0s = np.random.default_rng(0).uniform(-2, 2, size=(16, 2))
    res = laws.minimize_multistart(rosenbrock, x0s, (100.0,), max_iter=500, linesearch_steps=10, x64=True)
    np.testing.assert_allclose(res.params, np.ones((16, 2)), atol=1e-5)
    assert res.values[res.best] < 1e-10


@pytest.mark.parametrize(("n", "d", "loss", "match"), [
    ([1e8, 1e9], [1e10, 1e10, 1e10], [3.0, 2.5], "same length"),
    ([1e8, 0.0, 1e9, 1e9, 1e9], [1e10] * 5, [3.0] * 5, "n_params must be positive.*index 1"),
    ([1e8] * 5, [1e10] * 5, [3.0, -1.0, 3.0, 3.0, 3.0], "losses must be positive"),
    ([1e8] * 5, [1e10, np.nan, 1e10, 1e10, 1e10], [3.0] * 5, "n_tokens contains NaN at index 1"),
    ([1e8] * 5, [1e10] * 5, [3.0, 3.0, 3.0, np.inf, 3.0], "losses must be positive and finite"),
    ([[1e8] * 5], [[1e10] * 5], [[3.0] * 5], "1-D"),
    ([1e8] * 3, [1e10] * 3, [3.0] * 3, "at least 5 points"),
])
def test_bad_input_raises(n, d, loss, match):
    with pytest.raises(ValueError, match=match):
        laws.fit_loss_law(n, d, loss)


def test_bad_input_raises_elsewhere():
    with pytest.raises(ValueError, match="flops contains NaN"):
        laws.isoflop_fit([1e8] * 5, [1e18, 1e18, np.nan, 1e18, 1e18], [3.0] * 5)
    with pytest.raises(ValueError, match="at least 2 budgets"):
        laws.isoflop_fit([1e8, 2e8, 4e8, 8e8, 1.6e9], [1e18] * 5, [3.0, 2.9, 2.85, 2.9, 3.0])
    with pytest.raises(ValueError, match="budgets must be positive"):
        laws.isoflop_fit([1e8] * 5, [1e18] * 5, [3.0] * 5, budgets=[1e18, -1.0])
    with pytest.raises(ValueError, match="same length"):
        laws.fit_kaplan_law([1e8] * 5, [1e10] * 6, [3.0] * 5)
    with pytest.raises(ValueError, match="LossLaw.E must be finite"):
        laws.LossLaw(E=float("nan"), A=1.0, B=1.0, alpha=0.3, beta=0.3)
    with pytest.raises(ValueError, match="alpha, beta > 0"):
        laws.LossLaw(E=1.0, A=1.0, B=1.0, alpha=0.0, beta=0.3).compute_optimal(1e20)
