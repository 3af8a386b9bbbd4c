"""The loss and the jitted training step: micro-batches scanned for gradient accumulation, one optax update.

A batch is token ids [A, B, T + 1], or for supervised fine-tuning a pair (tokens, weights) of that shape: then
the loss is the weighted mean of the per-token losses over the whole batch (weight t applies to predicting
token t; 1 on assistant tokens, 0 elsewhere), with the logits materialised (`loss_chunks` is not used).

An MoE model's metrics carry each layer's expert load [L, E] (`expert_load`) and its worst max/mean
(`load_max_over_mean`); a sigmoid router's selection bias is set by the step after the optimizer's update
(aux-loss-free balancing, `with_expert_bias`), so the optimizer never moves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.router import load_max_over_mean, update_expert_bias

TrainState = dict[str, Any]  # {"params": pure dict, "opt_state": optax state, "step": int32 scalar}
Batch = jax.Array | tuple[jax.Array, jax.Array]  # tokens [..., T + 1], or (tokens, weights) of that shape


def loss_fn(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array) -> jax.Array:
    """Loss of the model (`graphdef` + `params`) predicting tokens[:, 1:] from tokens[:, :-1]."""
    return nnx.merge(graphdef, params).loss(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])


def objective_fn(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array) -> tuple[jax.Array, dict]:
    """What training minimises: `loss_fn` plus, for an MoE model, its router loss; with the terms reported
    ({"loss"} or {"loss", "router_loss", "expert_load"}, the last each layer's expert load [L, E])."""
    model = nnx.merge(graphdef, params)
    tokens_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    x_BxTxD, router_loss, load_LxE = model.hidden_and_router_stats(tokens_BxT)
    loss = model.loss_of_hidden(x_BxTxD, targets_BxT)
    terms = _terms(model.cfg.moe.enabled, loss, router_loss, load_LxE)
    return _with_mtp(model, x_BxTxD, tokens_BxT, targets_BxT, None, loss + router_loss, terms)


def _terms(moe: bool, loss: jax.Array, router_loss: jax.Array, load_LxE: jax.Array) -> dict:
    """The reported terms of a micro-batch's objective (an MoE model's router loss and expert load too)."""
    return {"loss": loss, "router_loss": router_loss, "expert_load": load_LxE} if moe else {"loss": loss}


def _with_mtp(model: nnx.Module, x_BxTxD: jax.Array, tokens_BxT: jax.Array, targets_BxT: jax.Array,
              weights_BxT: jax.Array | None, objective: jax.Array, terms: dict) -> tuple[jax.Array, dict]:
    """The objective and terms with the multi-token prediction loss (x `mtp_loss_weight`) and its modules' router
    loss added, and `mtp_loss` reported, when the model has MTP modules."""
    if not model.cfg.mtp_depth:
        return objective, terms
    mtp_loss, mtp_router_loss = model.mtp_loss(x_BxTxD, tokens_BxT, targets_BxT, weights_BxT)
    return objective + model.cfg.mtp_loss_weight * mtp_loss + mtp_router_loss, {**terms, "mtp_loss": mtp_loss}


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Each position's next-token cross-entropy [B, T] in nats (float32)."""
    logits = logits_BxTxV.astype(jnp.float32)
    target_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_BxT


def weighted_loss_terms(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array, weights_BxT1: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(sum of weight x loss over the targets tokens[:, 1:], sum of their weights, the MoE router loss, each
    layer's expert load [L, E])."""
    return _weighted_parts(nnx.merge(graphdef, params), tokens_BxT1, weights_BxT1)[1:]


def _weighted_parts(model: nnx.Module, tokens_BxT1: jax.Array, weights_BxT1: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(the last block's output, then `weighted_loss_terms`)."""
    x_BxTxD, router_loss, load_LxE = model.hidden_and_router_stats(tokens_BxT1[:, :-1])
    w_BxT = weights_BxT1[:, 1:].astype(jnp.float32)
    nll_BxT = token_nll(model.logits(x_BxTxD), tokens_BxT1[:, 1:])
    return x_BxTxD, jnp.sum(nll_BxT * w_BxT), jnp.sum(w_BxT), router_loss, load_LxE


def weighted_eval(params: dict, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array,
                  weights_BxT1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weight x loss, sum of weights) of one batch: evaluation sums these over batches."""
    return weighted_loss_terms(params, graphdef, tokens_BxT1, weights_BxT1)[:2]


def _batch_objective(params: dict, graphdef: nnx.GraphDef, batch: Batch, scale: jax.Array
                     ) -> tuple[jax.Array, dict]:
    """`objective_fn` of a micro-batch; for (tokens, weights), the weighted loss sum times `scale` (the number of
    micro-batches over the whole batch's weight, so that the step's mean over micro-batches is the weighted mean
    of the whole batch)."""
    if not isinstance(batch, tuple):
        return objective_fn(params, graphdef, batch)
    tokens_BxT1, weights_BxT1 = batch
    model = nnx.merge(graphdef, params)
    x_BxTxD, loss_sum, _, router_loss, load_LxE = _weighted_parts(model, tokens_BxT1, weights_BxT1)
    loss = loss_sum * scale
    terms = _terms(model.cfg.moe.enabled, loss, router_loss, load_LxE)
    return _with_mtp(model, x_BxTxD, tokens_BxT1[:, :-1], tokens_BxT1[:, 1:], weights_BxT1[:, 1:],
                     loss + router_loss, terms)


def with_expert_bias(new_params: dict, params: dict, load_LxE: jax.Array, rate: float) -> dict:
    """`new_params` (the optimizer's update of `params`) with every `expert_bias` leaf [L, E] set outside the
    optimizer: the old bias moved by aux-loss-free balancing, rate * sign(mean load - load) (model/router.py),
    whatever the optimizer (its weight decay) did to it."""
    def one(path: tuple, new: jax.Array, old: jax.Array) -> jax.Array:
        if str(getattr(path[-1], "key", path[-1])) != "expert_bias":
            return new
        if any(str(getattr(p, "key", p)) == "mtp" for p in path):  # MTP blocks' loads are not measured: kept
            return old
        return update_expert_bias(old, load_LxE, rate) if rate else old

    return jax.tree_util.tree_map_with_path(one, new_params, params)


def all_finite(tree: Any) -> jax.Array:
    """A boolean scalar: whether every floating-point value in `tree` is finite (one fused reduction per leaf)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The (un-jitted) `step(state, tokens_AxBxT1) -> (state, metrics)` over A accumulated micro-batches of B rows
    (or `step(state, (tokens, weights))`, see the module docstring); gradients are averaged over micro-batches in
    float32. The metrics' `state_finite` says whether the *updated*
    params and optimizer state are all finite (the loss and gradient norm describe the state before the update).
    `make_train_step` and `train/sharded.py` jit it."""
    grad_fn = jax.value_and_grad(_batch_objective, has_aux=True)

    def step(state: TrainState, batch_AxBxT1: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        tokens_AxBxT1 = batch_AxBxT1[0] if isinstance(batch_AxBxT1, tuple) else batch_AxBxT1
        n = tokens_AxBxT1.shape[0]
        scale = jnp.ones((), jnp.float32)
        if isinstance(batch_AxBxT1, tuple):
            scale = n / jnp.maximum(jnp.sum(batch_AxBxT1[1][..., 1:].astype(jnp.float32)), 1.0)

        def micro(acc: tuple, micro_batch: Batch) -> tuple[tuple, None]:
            terms_sum, grad_sum = acc
            (_, terms), grads = grad_fn(params, graphdef, micro_batch, scale)
            return (jax.tree.map(jnp.add, terms_sum, terms), jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree.map(lambda a: a[0], batch_AxBxT1)
        no_terms = jax.tree.map(jnp.zeros_like, jax.eval_shape(_batch_objective, params, graphdef, first, scale)[1])
        (terms_sum, grad_sum), _ = jax.lax.scan(micro, (no_terms, zeros), batch_AxBxT1)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grad_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        terms = {name: total / n for name, total in terms_sum.items()}
        if "expert_load" in terms:  # MoE: the selection bias is set here, never by the optimizer
            moe = nnx.merge(graphdef, params).cfg.moe
            new_params = with_expert_bias(new_params, params, terms["expert_load"], moe.bias_update_rate)
            terms["load_max_over_mean"] = load_max_over_mean(terms["expert_load"])
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {**terms, "grad_norm": optax.tree.norm(grads),
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
