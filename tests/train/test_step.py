"""The loss and the jitted train step: cross-entropy against numpy log-softmax, the model's loss against numpy
on its own logits, and gradient accumulation against a single full-batch gradient step.

The accumulation test uses plain SGD, so new params = params - lr * mean gradient is linear in the gradient:
Adam's first step (~ lr * sign(g)) would hide a missing 1/n or a dropped micro-batch.

Tolerances: float32 with different summation orders (micro-batch means vs one mean; XLA fusion): ~1e-6
relative to the gradient/parameter scale; cross-entropy vs float64 numpy: 1e-6 relative (logsumexp of 11-259
terms, eps 1.2e-7).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model.loss import cross_entropy
from model.presets import get_preset
from model.transformer import create_model
from train.config import TrainConfig
from train.optimizer import lr_schedule
from train.step import init_train_state, loss_fn, make_eval_step, make_train_step

CFG = get_preset("tiny").replace(dtype="float32")


def np_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(5 * rng.standard_normal((2, 5, 11)), dtype)
    targets = rng.integers(0, 11, size=(2, 5))
    loss = cross_entropy(logits, jnp.asarray(targets))
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), np_cross_entropy(np.asarray(logits.astype(jnp.float32)), targets),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def model():
    """graphdef, random params (N(0, 0.1) matrices, 1 + N(0, 0.1) norm scales) of the tiny float32 model, and
    its eval step (compiled once for the module)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(CFG)))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape) + (path[-1].key == "scale"), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
    return graphdef, params, make_eval_step(graphdef)


TOKENS = np.random.default_rng(2).integers(0, 256, size=(8, 17)).astype(np.int32)


def test_loss_fn_and_eval_step_match_numpy_on_the_models_logits(model):
    graphdef, params, eval_step = model
    tokens = jnp.asarray(TOKENS)
    logits, loss = jax.jit(lambda p, t: (nnx.merge(graphdef, p)(t[:, :-1]), loss_fn(p, graphdef, t)))(params, tokens)
    expected = np_cross_entropy(np.asarray(logits), TOKENS[:, 1:])  # predict token i+1 from tokens <= i
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(eval_step(params, tokens)), expected, rtol=1e-6)


def copy_tree(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def closed_form_lr(s: int, lr: float, warmup: int, steps: int, ratio: float) -> float:
    if s < warmup:
        return lr * s / warmup
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))


def global_norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)))


def test_grad_accumulation_matches_one_full_batch_step(model):
    graphdef, params, eval_step = model
    sgd_lr = 0.5
    tcfg = TrainConfig(steps=10, warmup_steps=2, lr=0.1, min_lr_ratio=0.1, batch_size=8, seq_len=16)
    optimizer = optax.sgd(sgd_lr)
    train_step = make_train_step(graphdef, optimizer, lr_schedule(tcfg))
    tokens = jnp.asarray(TOKENS)
    p0 = jax.tree.map(np.asarray, params)
    full_loss = float(eval_step(params, tokens))

    states, metrics = {}, {}
    for accum in (1, 2):
        state = init_train_state(copy_tree(params), optimizer)  # the step donates its input
        states[accum], metrics[accum] = train_step(state, tokens.reshape(accum, 8 // accum, 17))
        assert int(states[accum]["step"]) == 1
        np.testing.assert_allclose(float(metrics[accum]["loss"]), full_loss, rtol=1e-6)
        assert float(metrics[accum]["lr"]) == 0.0  # schedule at the pre-update step 0: warmup starts from 0

    # the gradient the one-micro-batch step applied, recovered from the SGD update
    grads = jax.tree.map(lambda p, new: (p - np.asarray(new, np.float64)) / sgd_lr, p0, states[1]["params"])
    g_norm = global_norm(grads)
    assert g_norm > 0
    # |p0 - p1| carries ~1e-8 absolute rounding per element against updates ~1e-3: 1e-4 on the norm is ample
    np.testing.assert_allclose(float(metrics[1]["grad_norm"]), g_norm, rtol=1e-4)
    np.testing.assert_allclose(float(metrics[2]["grad_norm"]), g_norm, rtol=1e-4)
    # two micro-batches of 4 give the one-batch-of-8 update (mean, not sum, of the micro-batch gradients)
    for a, b, g in zip(jax.tree.leaves(states[2]["params"]), jax.tree.leaves(states[1]["params"]),
                       jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-5 * sgd_lr * np.abs(g).max())

    # that gradient is the loss's: central finite difference along it equals its norm (directional derivative
    # <g, g/|g|>). h = 1e-2 moves the loss by ~1e-2 * |g|; fp32 loss noise ~1e-6 and O(h^2) curvature: 1e-2.
    h = 1e-2
    direction = jax.tree.map(lambda g: g / g_norm, grads)
    shifted = [jax.tree.map(lambda p, d, s=sign: jnp.asarray(p + s * h * d, jnp.float32), p0, direction)
               for sign in (1, -1)]
    fd = (float(eval_step(shifted[0], tokens)) - float(eval_step(shifted[1], tokens))) / (2 * h)
    np.testing.assert_allclose(fd, g_norm, rtol=1e-2)

    # a second step: the step counter advances, lr is the schedule at step 1
    state, second = train_step(states[1], tokens.reshape(1, 8, 17))
    assert int(state["step"]) == 2
    np.testing.assert_allclose(float(second["lr"]), closed_form_lr(1, 0.1, 2, 10, 0.1), rtol=1e-6)
    assert float(second["loss"]) < full_loss  # one SGD step on the same batch lowered its loss
