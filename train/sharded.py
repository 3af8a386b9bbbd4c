"""The train state and step on a device mesh: `parallel/` decides the shardings, this file applies them to
train/step.py's state and step (the same math as the single-device step)."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.rules import Rules
from parallel.sharding import MeshFunction, batch_sharding, state_shardings
from train.step import TrainState, init_train_state, train_step_fn


def train_state_shardings(params_shardings: dict, abstract_params: dict, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
    """Shardings for `init_train_state(params, optimizer)`: Adam's moments like their params, the rest replicated."""
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params)
    return state_shardings(params_shardings, abstract_params, abstract_state, mesh)


def init_sharded_train_state(params: dict, optimizer: optax.GradientTransformation,
                             shardings: TrainState) -> TrainState:
    """`init_train_state` with its output placed in `shardings` (the optimizer moments never gathered)."""
    return jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings)(params)


def sharded_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                       mesh: Mesh, rules: Rules, shardings: TrainState) -> MeshFunction:
    """train/step.py's `step(state, tokens_AxBxL1) -> (state, metrics)` jitted over `mesh`: state in and out in
    `shardings` (donated), tokens in `batch_sharding`, metrics replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(train_step_fn(graphdef, optimizer, schedule),
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    return MeshFunction(jitted, mesh, rules)
