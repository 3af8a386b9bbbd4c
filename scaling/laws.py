"""Scaling laws: the Chinchilla loss law L(N, D) = E + A/N^alpha + B/D^beta, its compute-optimal frontier, and fits.

Fits follow Hoffmann et al. 2022 (Approach 3): minimise sum_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e)
- ln L_i) by L-BFGS from a grid of 4,500 starts, keep the lowest objective; A, B, E = exp(a), exp(b), exp(e). Every
start runs at once: `minimize_multistart` vmaps one `optax.lbfgs` loop over starts (and, for the bootstrap, over
resampled data sets). Also here: bootstrap intervals, Approach 2 (IsoFLOP parabolas) and the Kaplan et al. 2020 form
L(N, D) = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D. N counts all parameters, D tokens, C = 6 N D FLOPs.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array | np.ndarray


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __post_init__(self):
        for name in ("E", "A", "B", "alpha", "beta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"LossLaw.{name} must be finite, got {getattr(self, name)}")

    def loss(self, N, D):
        """Predicted loss; broadcasts numpy or jax arrays."""
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L subject to 6 N D = C, in closed form (Hoffmann et al. eq. 4)."""
        if self.alpha <= 0 or self.beta <= 0 or self.A <= 0 or self.B <= 0:
            raise ValueError(f"compute_optimal needs A, B, alpha, beta > 0, got {self}")
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a, b = self.exponents
        return G * (C / 6) ** a, (C / 6) ** b / G

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt proportional to C^a and D_opt to C^b; a + b = 1."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    def tokens_per_param(self, C):
        """D_opt / N_opt at compute C."""
        n_opt, d_opt = self.compute_optimal(C)
        return d_opt / n_opt


@dataclass(frozen=True)
class KaplanLaw:
    """L(N, D) = ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D (Kaplan et al. 2020, eq. 1.5)."""

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float

    def loss(self, N, D):
        """Predicted loss; broadcasts numpy or jax arrays."""
        return ((self.N_c / N) ** (self.alpha_N / self.alpha_D) + self.D_c / D) ** self.alpha_D


@dataclass(frozen=True)
class LossFit:
    """A fitted law, its objective (sum of Huber terms) and how many starts reached it.

    `n_converged` counts the starts of the final stage whose objective is within 1e-6 (relative) of the best."""

    law: LossLaw | KaplanLaw
    objective: float
    n_starts: int
    n_converged: int


@dataclass(frozen=True)
class MultiStartResult:
    """Final parameters (S, P) and objectives (S,) of every start; `iterations` run (shared by all starts)."""

    params: np.ndarray
    values: np.ndarray
    iterations: int

    @property
    def best(self) -> int:
        return int(np.argmin(np.where(np.isfinite(self.values), self.values, np.inf)))


# ---------------------------------------------------------------------------------------------------------------
# The generic minimiser: one L-BFGS loop, vmapped over starts (and optionally over per-start data).


def _lbfgs_one(objective, x0, data, max_iter, linesearch_steps, ftol, patience):
    """L-BFGS on `objective(x, data)` from x0, until max_iter or `patience` iterations in a row each improve the
    objective by <= ftol * |f| (single stalls are common: a capped line search may fail once, then recover)."""
    opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(linesearch_steps, initial_guess_strategy="one"))
    fun = lambda x: objective(x, data)  # noqa: E731
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        x, state, k, stalls, prev = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
        x = optax.apply_updates(x, updates)
        new = optax.tree_utils.tree_get(state, "value")
        progressed = prev - new > ftol * jnp.abs(new)  # False for NaN
        return x, state, k + 1, jnp.where(progressed, 0, stalls + 1), new

    def keep_going(carry):
        return (carry[2] < max_iter) & (carry[3] < patience)

    carry = (x0, opt.init(x0), 0, 0, jnp.asarray(jnp.inf, x0.dtype))
    x, state, k, _, value = jax.lax.while_loop(keep_going, step, carry)
    return x, value, k


@partial(jax.jit, static_argnames=("objective", "data_axes", "max_iter", "linesearch_steps", "patience"))
def _lbfgs_many(x0s, data, ftol, *, objective, data_axes, max_iter, linesearch_steps, patience):
    run = partial(_lbfgs_one, objective, max_iter=max_iter, linesearch_steps=linesearch_steps, ftol=ftol,
                  patience=patience)
    x, value, k = jax.vmap(run, in_axes=(0, data_axes))(x0s, data)
    return x, value, jnp.max(k)


def minimize_multistart(objective: Callable, x0s: Array, data: tuple, *, data_axes: tuple | None = None,
                        max_iter: int = 200, linesearch_steps: int = 3, x64: bool = False, ftol: float = 0.0,
                        patience: int = 10) -> MultiStartResult:
    """Minimise `objective(x, data)` from every row of `x0s` (S, P) at once: a jitted L-BFGS loop under jax.vmap.

    `data` is a tuple of arrays shared by all starts, or per start where `data_axes` says 0 (vmap in_axes). Runs in
    float32, or float64 with `x64` (scoped, not global). A start stops after `patience` iterations in a row without
    progress (improvement <= ftol * |f|) or at `max_iter`; the loop ends when all have. The zoom line search takes at
    most `linesearch_steps` steps: under vmap every start pays for the slowest, so a short search is much cheaper."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        data = tuple(jnp.asarray(d, dtype) for d in data)
        axes = None if data_axes is None else tuple(data_axes)
        x, values, k = _lbfgs_many(jnp.asarray(x0s, dtype), data, ftol, objective=objective, data_axes=axes,
                                   max_iter=max_iter, linesearch_steps=linesearch_steps, patience=patience)
        return MultiStartResult(np.asarray(x, np.float64), np.asarray(values, np.float64), int(k))


def _screen_then_refine(objective, x0s, data, *, screen_iter, keep, max_iter) -> tuple[MultiStartResult, int]:
    """All starts for `screen_iter` float32 iterations; the `keep` lowest then run to convergence in float64.

    Returns the refined result (over the kept starts) and the number of starts screened."""
    n = len(x0s)
    if screen_iter > 0 and keep < n:
        screened = minimize_multistart(objective, x0s, data, max_iter=screen_iter)
        order = np.argsort(np.where(np.isfinite(screened.values), screened.values, np.inf), kind="stable")
        x0s = screened.params[order[:keep]]
    return minimize_multistart(objective, x0s, data, max_iter=max_iter, x64=True), n


def _n_converged(values: np.ndarray, rtol: float = 1e-6) -> int:
    best = np.nanmin(values)
    return int(np.sum(values <= best + rtol * abs(best)))


# ---------------------------------------------------------------------------------------------------------------
# Objectives. data = (ln N, ln D, ln L, weights, delta); weights are bootstrap multiplicities (ones for a plain fit).


def _huber_value_and_slope(r, delta):
    abs_r = jnp.abs(r)
    return jnp.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)), jnp.clip(r, -delta, delta)


def _chinchilla_value_and_grad(x, data):
    """Objective and gradient in one pass, reusing the softmax weights s_j / total (~2x faster than autodiff)."""
    ln_n, ln_d, ln_l, w, delta = data
    a, b, e, alpha, beta = x[0], x[1], x[2], x[3], x[4]
    t1, t2 = a - alpha * ln_n, b - beta * ln_d
    m = jnp.maximum(jnp.maximum(t1, t2), e)
    s1, s2, s3 = jnp.exp(t1 - m), jnp.exp(t2 - m), jnp.exp(e - m)
    total = s1 + s2 + s3
    h, slope = _huber_value_and_slope(m + jnp.log(total) - ln_l, delta)
    c = w * slope / total  # d objective / d term_j = c * s_j
    g1 = (c * s1) @ jnp.stack([jnp.ones_like(ln_n), -ln_n], axis=1)
    g2 = (c * s2) @ jnp.stack([jnp.ones_like(ln_d), -ln_d], axis=1)
    return h @ w, jnp.stack([g1[0], g2[0], c @ s3, g1[1], g2[1]])


@jax.custom_jvp
def chinchilla_objective(x, data):
    """sum_i w_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i), x = (a, b, e, alpha, beta)."""
    return _chinchilla_value_and_grad(x, data)[0]


@chinchilla_objective.defjvp
def _chinchilla_objective_jvp(primals, tangents):
    value, grad = _chinchilla_value_and_grad(*primals)
    return value, grad @ tangents[0]  # differentiable in x only: data are constants


def kaplan_objective(x, data):
    """Huber objective of the Kaplan form in log space, x = (ln N_c, ln D_c, alpha_N / alpha_D, alpha_D)."""
    ln_n, ln_d, ln_l, w, delta = data
    ln_nc, ln_dc, ratio, alpha_d = x[0], x[1], x[2], x[3]
    pred = alpha_d * jnp.logaddexp(ratio * (ln_nc - ln_n), ln_dc - ln_d)
    return _huber_value_and_slope(pred - ln_l, delta)[0] @ w


def hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s 4,500 initial points as rows (a, b, e, alpha, beta)."""
    exponents, es, scales = np.arange(0, 2.5, 0.5), np.arange(-1, 1.5, 0.5), np.arange(0, 30, 5)
    starts = itertools.product(exponents, exponents, es, scales, scales)
    return np.array([(a, b, e, alpha, beta) for alpha, beta, e, a, b in starts], float)


def kaplan_grid() -> np.ndarray:
    """225 initial points (ln N_c, ln D_c, alpha_N / alpha_D, alpha_D) around Kaplan et al.'s estimates."""
    lns = np.arange(20.0, 45.0, 5.0)
    return np.array(list(itertools.product(lns, lns, (0.5, 1.0, 1.5), (0.05, 0.1, 0.2))), float)


# ---------------------------------------------------------------------------------------------------------------
# Fits.


def _validated_logs(**columns) -> list[np.ndarray]:
    """Natural logs of equal-length, positive, finite 1-D columns; ValueError naming the first problem."""
    arrays = {name: np.asarray(v, dtype=float) for name, v in columns.items()}
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    for name, a in arrays.items():
        if np.isnan(a).any():
            raise ValueError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(a))[0])}")
        bad = np.flatnonzero(~np.isfinite(a) | (a <= 0))
        if bad.size:
            raise ValueError(f"{name} must be positive and finite, got {a[bad[0]]} at index {int(bad[0])}")
    n = next(iter(lengths.values()))
    if n < 5:
        raise ValueError(f"need at least 5 points to fit, got {n}")
    return [np.log(a) for a in arrays.values()]


def _padded(*columns: np.ndarray, bucket: int = 256) -> tuple[np.ndarray, ...]:
    """Columns padded (with copies of their first entry) to a multiple of `bucket`, plus 0/1 weights marking the real
    points: fits of different sizes then share one compiled program (zero weight adds nothing to the objective)."""
    n = len(columns[0])
    pad = -n % bucket
    weights = np.concatenate([np.ones(n), np.zeros(pad)])
    return (*(np.concatenate([c, np.full(pad, c[0])]) for c in columns), weights)


def chinchilla_points(path: str | Path, drop: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) of the digitised Chinchilla Figure-4 points (Besiroglu et al. 2024's CSV: "Model Size",
    "Training FLOP", "loss"; D = C / 6N), sorted by loss, without the `drop` highest losses (the published protocol
    drops 5 of 245)."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss, kind="stable")[: len(loss) - drop]
    return n[keep], c[keep] / (6 * n[keep]), loss[keep]


def fit_loss_law(n_params: Array, n_tokens: Array, losses: Array, *, delta: float = 1e-3,
                 grid: np.ndarray | None = None, max_iter: int = 300, screen_iter: int = 30,
                 keep: int = 256) -> LossFit:
    """Hoffmann et al.'s Approach 3: Huber fit of ln L from every start of `grid` (default `hoffmann_grid()`).

    All starts run `screen_iter` float32 L-BFGS iterations together; the `keep` lowest continue in float64 to
    convergence (`max_iter`). A start that is poor after 30 iterations could in principle overtake later, so
    `keep=len(grid)` runs every start to the end (the exact protocol). On the Chinchilla points both give the same law
    to 1e-9, the screened fit ~9x faster (`scripts/bench_laws.py`: ~2.5-4.6 s vs ~40 s after compiling, 2 CPU cores)."""
    ln_n, ln_d, ln_l = _validated_logs(n_params=n_params, n_tokens=n_tokens, losses=losses)
    grid = hoffmann_grid() if grid is None else np.asarray(grid, float)
    data = (*_padded(ln_n, ln_d, ln_l), delta)
    res, n = _screen_then_refine(chinchilla_objective, grid, data, screen_iter=screen_iter, keep=keep,
                                 max_iter=max_iter)
    a, b, e, alpha, beta = res.params[res.best]
    law = LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
    return LossFit(law, float(res.values[res.best]), n, _n_converged(res.values))


def fit_kaplan_law(n_params: Array, n_tokens: Array, losses: Array, *, delta: float = 1e-3,
                   grid: np.ndarray | None = None, max_iter: int = 300) -> LossFit:
    """Fit the Kaplan et al. 2020 form by the same Huber-in-log-space objective and multi-start L-BFGS."""
    ln_n, ln_d, ln_l = _validated_logs(n_params=n_params, n_tokens=n_tokens, losses=losses)
    grid = kaplan_grid() if grid is None else np.asarray(grid, float)
    data = (*_padded(ln_n, ln_d, ln_l), delta)
    res = minimize_multistart(kaplan_objective, grid, data, max_iter=max_iter, x64=True)
    ln_nc, ln_dc, ratio, alpha_d = res.params[res.best]
    law = KaplanLaw(N_c=math.exp(ln_nc), D_c=math.exp(ln_dc), alpha_N=float(ratio * alpha_d), alpha_D=float(alpha_d))
    return LossFit(law, float(res.values[res.best]), len(grid), _n_converged(res.values))


@dataclass(frozen=True)
class BootstrapFit:
    """The full-data fit, the refit on each resample (rows E, A, B, alpha, beta) and percentile intervals."""

    fit: LossFit
    samples: np.ndarray
    level: float
    intervals: dict[str, tuple[float, float]]


BOOTSTRAP_PERTURBATION = np.array([0.5, 0.5, 0.05, 0.05, 0.05])  # std of start jitter on (a, b, e, alpha, beta)


def bootstrap_loss_law(n_params: Array, n_tokens: Array, losses: Array, *, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.8, delta: float = 1e-3, starts_per_sample: int = 4, max_iter: int = 300,
                       x64: bool = False, fit: LossFit | None = None) -> BootstrapFit:
    """Percentile bootstrap: resample the points with replacement `n_boot` times and refit each resample.

    A resample is a weight vector (each point's multiplicity), so all n_boot x starts_per_sample fits run as one
    vmapped L-BFGS, in float32 unless `x64` (intervals agree with float64's to ~3 digits, at twice the speed; 1,000
    resamples of the Chinchilla points take ~15 s on 2 CPU cores). Each resample starts from the full-data optimum and
    from starts_per_sample - 1 Gaussian jitters of it (std BOOTSTRAP_PERTURBATION on a, b, e, alpha, beta), not from
    the 4,500-point grid: near the optimum one basin dominates, and the jitter guards against a resample moving it.
    `fit` reuses a full-data fit. Samples are rows (E, A, B, alpha, beta); intervals are percentile intervals."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 2 or starts_per_sample < 1:
        raise ValueError(f"need n_boot >= 2 and starts_per_sample >= 1, got {n_boot}, {starts_per_sample}")
    ln_n, ln_d, ln_l = _validated_logs(n_params=n_params, n_tokens=n_tokens, losses=losses)
    fit = fit or fit_loss_law(n_params, n_tokens, losses, delta=delta)
    law = fit.law
    center = np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])
    rng = np.random.default_rng(seed)
    n = len(ln_n)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(float)
    jitter = rng.normal(size=(n_boot, starts_per_sample, 5)) * BOOTSTRAP_PERTURBATION
    jitter[:, 0] = 0.0
    x0s = (center + jitter).reshape(-1, 5)
    ln_n, ln_d, ln_l, mask = _padded(ln_n, ln_d, ln_l)
    weights = np.pad(weights, ((0, 0), (0, len(mask) - n)))
    data = (ln_n, ln_d, ln_l, np.repeat(weights, starts_per_sample, axis=0), delta)
    res = minimize_multistart(chinchilla_objective, x0s, data, data_axes=(None, None, None, 0, None),
                              max_iter=max_iter, x64=x64)
    values = np.where(np.isfinite(res.values), res.values, np.inf).reshape(n_boot, starts_per_sample)
    best = res.params.reshape(n_boot, starts_per_sample, 5)[np.arange(n_boot), values.argmin(axis=1)]
    samples = np.column_stack([np.exp(best[:, 2]), np.exp(best[:, 0]), np.exp(best[:, 1]), best[:, 3], best[:, 4]])
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    intervals = {name: tuple(float(v) for v in np.percentile(samples[:, i], q))
                 for i, name in enumerate(("E", "A", "B", "alpha", "beta"))}
    return BootstrapFit(fit, samples, level, intervals)


# ---------------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles.


@dataclass(frozen=True)
class IsoFlopFit:
    """Per-budget optima (parabola vertex of L against ln N) and the power laws N_opt = k_n C^a, D_opt = k_d C^b."""

    budgets: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    a: float
    k_n: float

    @property
    def b(self) -> float:
        return 1.0 - self.a

    @property
    def k_d(self) -> float:
        return 1.0 / (6.0 * self.k_n)

    def compute_optimal(self, C):
        """(N_opt, D_opt) at compute C from the fitted power laws."""
        n_opt = self.k_n * np.asarray(C, float) ** self.a
        return n_opt, np.asarray(C, float) / (6.0 * n_opt)


def _group_budgets(log_c: np.ndarray, budgets: Sequence[float] | None, tol_decades: float) -> list[np.ndarray]:
    """Indices of the points of each budget: nearest given budget, or runs of log10 C split at gaps > tol."""
    if budgets is not None:
        centers = np.log10(np.asarray(budgets, float))
        nearest = np.abs(log_c[:, None] - centers[None, :]).argmin(axis=1)
        close = np.abs(log_c - centers[nearest]) <= tol_decades
        return [np.flatnonzero(close & (nearest == j)) for j in range(len(centers))]
    order = np.argsort(log_c, kind="stable")
    splits = np.flatnonzero(np.diff(log_c[order]) > tol_decades) + 1
    return np.split(order, splits)


def isoflop_fit(n_params: Array, flops: Array, losses: Array, budgets: Sequence[float] | None = None, *,
                tol_decades: float = 0.05, min_points: int = 3) -> IsoFlopFit:
    """Hoffmann et al.'s Approach 2: per compute budget, fit L = p0 (ln N)^2 + p1 ln N + p2 and take its vertex as
    N_opt(C); then fit ln N_opt = ln k + a ln C by least squares. D_opt = C / (6 N_opt), so b = 1 - a.

    Points are grouped by `budgets` (each point to the nearest, within `tol_decades` of log10 C) or, without them, by
    runs of near-equal log10 C. Budgets with fewer than `min_points` points or a non-convex parabola are skipped."""
    ln_n, ln_c, _ = _validated_logs(n_params=n_params, flops=flops, losses=losses)
    loss = np.asarray(losses, float)
    if budgets is not None and (len(budgets) == 0 or not np.all(np.isfinite(budgets)) or np.min(budgets) <= 0):
        raise ValueError(f"budgets must be positive and finite, got {budgets}")
    log10_c = ln_c / math.log(10)
    rows = []
    for j, idx in enumerate(_group_budgets(log10_c, budgets, tol_decades)):
        if len(idx) < min_points or len(np.unique(ln_n[idx])) < 3:
            continue
        p2, p1, p0 = np.polyfit(ln_n[idx], loss[idx], 2)
        if p2 <= 0:
            continue
        c = float(budgets[j]) if budgets is not None else float(np.exp(ln_c[idx].mean()))
        ln_n_opt = -p1 / (2 * p2)
        rows.append((c, math.exp(ln_n_opt), p0 - p1 * p1 / (4 * p2)))
    if len(rows) < 2:
        raise ValueError(f"need at least 2 budgets with >= {min_points} points and a convex profile, got {len(rows)}")
    c, n_opt, loss_opt = (np.array(col) for col in zip(*sorted(rows), strict=True))
    a, ln_k = np.polyfit(np.log(c), np.log(n_opt), 1)
    return IsoFlopFit(c, n_opt, c / (6 * n_opt), loss_opt, float(a), float(math.exp(ln_k)))
