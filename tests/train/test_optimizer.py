"""The learning-rate schedule against its closed form, the weight-decay mask, and AdamW + clipping against a
hand-written numpy AdamW (Loshchilov & Hutter decoupled decay, as optax applies it: update += wd * param, then
scaled by the learning rate).

Tolerances: float32 optax vs float64 numpy: rtol 1e-5 (a handful of elementwise ops, eps 1.2e-7; Adam's
m / sqrt(v) is well conditioned away from zero gradients, which the random test gradients avoid).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.presets import get_preset
from model.transformer import create_model
from train.config import TrainConfig
from train.optimizer import decay_mask, lr_schedule, make_optimizer


def closed_form_lr(s: int, *, lr: float, warmup: int, steps: int, ratio: float) -> float:
    if s < warmup:
        return lr * s / warmup
    s = min(s, steps)
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))


@pytest.mark.parametrize("warmup, steps", [(10, 100), (0, 50), (1, 7)])
def test_lr_schedule_closed_form(warmup, steps):
    lr, ratio = 3e-3, 0.1
    schedule = lr_schedule(TrainConfig(steps=steps, warmup_steps=warmup, lr=lr, min_lr_ratio=ratio))
    points = sorted({0, 1, warmup // 2, warmup, warmup + 1, (warmup + steps) // 2, steps - 1, steps, steps + 5})
    for s in points:
        np.testing.assert_allclose(float(schedule(s)), closed_form_lr(s, lr=lr, warmup=warmup, steps=steps,
                                                                      ratio=ratio), rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == (0.0 if warmup else pytest.approx(lr))
    np.testing.assert_allclose(float(schedule(warmup)), lr, rtol=1e-6)  # the peak
    np.testing.assert_allclose(float(schedule(steps)), lr * ratio, rtol=1e-5)  # the floor, and it stays there
    np.testing.assert_allclose(float(schedule(steps + 1000)), lr * ratio, rtol=1e-5)


def test_decay_mask_spares_exactly_norm_scales_and_biases():
    cfg = get_preset("tiny").replace(qkv_bias=True, tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param))
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
    no_decay = {"['blocks']['attn_norm']['scale']", "['blocks']['mlp_norm']['scale']", "['final_norm']['scale']",
                "['blocks']['attn']['bq']", "['blocks']['attn']['bk']", "['blocks']['attn']['bv']"}
    decay = {"['embed']", "['lm_head']", "['blocks']['attn']['wq']", "['blocks']['attn']['wk']",
             "['blocks']['attn']['wv']", "['blocks']['attn']['wo']", "['blocks']['mlp']['w_gate']",
             "['blocks']['mlp']['w_up']", "['blocks']['mlp']['w_down']"}
    assert set(flat) == no_decay | decay
    assert {k for k, v in flat.items() if v is False} == no_decay
    assert {k for k, v in flat.items() if v is True} == decay


def test_adamw_with_clipping_matches_numpy():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=0.1, min_lr_ratio=0.1, weight_decay=0.3, beta1=0.8,
                      beta2=0.9, eps=1e-6, clip_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"layer": {"w": rng.standard_normal((3, 4)), "scale": 1 + rng.standard_normal(4),
                        "bq": rng.standard_normal((2, 2))},
              "embed": rng.standard_normal((5, 3))}
    decayed = {"layer": {"w": True, "scale": False, "bq": False}, "embed": True}
    # gradient norms: first two steps well above clip_norm (clipped), the last below (left alone)
    grads = [jax.tree.map(lambda p, s=s: s * rng.standard_normal(p.shape), params) for s in (5.0, 2.0, 0.05)]

    opt = make_optimizer(cfg)
    update = jax.jit(opt.update)  # one compilation for the three steps
    p_jax = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    state = opt.init(p_jax)
    p_np = jax.tree.map(np.array, params)
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    b1, b2 = cfg.beta1, cfg.beta2
    for t, g in enumerate(grads, start=1):
        updates, state = update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g), state, p_jax)
        p_jax = jax.tree.map(lambda p, u: p + u, p_jax, updates)

        norm = math.sqrt(sum(float(np.sum(x * x)) for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x, norm=norm: x * min(1.0, cfg.clip_norm / norm), g)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        lr = closed_form_lr(t - 1, lr=cfg.lr, warmup=cfg.warmup_steps, steps=cfg.steps, ratio=cfg.min_lr_ratio)

        def adamw(p, m_, v_, d, t=t, lr=lr):
            step = (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + cfg.eps)
            return p - lr * (step + (cfg.weight_decay * p if d else 0.0))

        p_np = jax.tree.map(adamw, p_np, m, v, decayed)
        for a, b in zip(jax.tree.leaves(p_jax), jax.tree.leaves(p_np), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    # the step at t=1 had lr = 0 (warmup from 0): parameters moved only from t=2 on, and they did move
    assert not np.allclose(np.asarray(p_jax["layer"]["w"]), params["layer"]["w"], atol=1e-3)
