"""The loss and the jitted training step: micro-batches scanned for gradient accumulation, one optax update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

TrainState = dict[str, Any]  # {"params": pure dict, "opt_state": optax state, "step": int32 scalar}


def loss_fn(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array) -> jax.Array:
    """Loss of the model (`graphdef` + `params`) predicting tokens[:, 1:] from tokens[:, :-1]."""
    return nnx.merge(graphdef, params).loss(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])


def objective_fn(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array) -> tuple[jax.Array, dict]:
    """What training minimises: `loss_fn` plus, for an MoE model, its router loss; with the terms reported
    ({"loss"} or {"loss", "router_loss"})."""
    model = nnx.merge(graphdef, params)
    loss, router_loss = model.losses(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
    terms = {"loss": loss, "router_loss": router_loss} if model.cfg.moe.enabled else {"loss": loss}
    return loss + router_loss, terms


def all_finite(tree: Any) -> jax.Array:
    """A boolean scalar: whether every floating-point value in `tree` is finite (one fused reduction per leaf)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """The (un-jitted) `step(state, tokens_AxBxT1) -> (state, metrics)` over A accumulated micro-batches of B rows;
    gradients are averaged over micro-batches in float32. The metrics' `state_finite` says whether the *updated*
    params and optimizer state are all finite (the loss and gradient norm describe the state before the update).
    `make_train_step` and `train/sharded.py` jit it."""
    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)

    def step(state: TrainState, tokens_AxBxT1: jax.Array) -> tuple[TrainState, dict]:
        params = state["params"]

        def micro(acc: tuple, tokens_BxT1: jax.Array) -> tuple[tuple, None]:
            terms_sum, grad_sum = acc
            (_, terms), grads = grad_fn(params, graphdef, tokens_BxT1)
            return (jax.tree.map(jnp.add, terms_sum, terms), jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        no_terms = jax.tree.map(jnp.zeros_like, jax.eval_shape(objective_fn, params, graphdef, tokens_AxBxT1[0])[1])
        (terms_sum, grad_sum), _ = jax.lax.scan(micro, (no_terms, zeros), tokens_AxBxT1)
        n = tokens_AxBxT1.shape[0]
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grad_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics = {**{name: total / n for name, total in terms_sum.items()}, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), "state_finite": all_finite((new_state["params"], opt_state))}
        return new_state, metrics

    return step


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """The single-device step, jitted with the state's buffers donated."""
    return jax.jit(train_step_fn(graphdef, optimizer, schedule), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[dict, jax.Array], jax.Array]:
    """A jitted `eval(params, tokens_BxT1) -> mean loss in nats`."""
    return jax.jit(lambda params, tokens_BxT1: loss_fn(params, graphdef, tokens_BxT1))
