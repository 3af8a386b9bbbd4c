"""The train state, step, eval step and batches on a device mesh: `parallel/` decides the model's shardings, this
file applies them to train/step.py's state and step (the same math as the single-device step). `plan_mesh` makes
a run's `MeshPlan` once, before anything compiles; the loop and the checkpoints use it from then on."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import axes
from model.config import ModelConfig
from parallel.mesh import MeshConfig, make_mesh
from parallel.rules import Rules, logical_to_spec, rules_for
from parallel.sharding import MeshFunction, ParamsPlan, batch_sharding, plan_params, state_shardings
from train.config import TrainConfig
from train.data import windows_at
from train.optimizer import lr_schedule, make_optimizer
from train.step import TrainState, init_train_state, loss_fn, train_step_fn, weighted_eval


def abstract_train_state(params_shardings: dict, abstract_params: dict, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
    """`init_train_state(params, optimizer)` as ShapeDtypeStructs carrying their shardings (traced, not run):
    Adam's moments sharded like their params, the rest replicated. What a checkpoint restores into."""
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params)
    shardings = state_shardings(params_shardings, abstract_params, shapes, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def train_state_shardings(params_shardings: dict, abstract_params: dict, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
    """Shardings for `init_train_state(params, optimizer)`: Adam's moments like their params, the rest replicated."""
    return jax.tree.map(lambda a: a.sharding,
                        abstract_train_state(params_shardings, abstract_params, optimizer, mesh))


def init_sharded_train_state(params: dict, optimizer: optax.GradientTransformation,
                             shardings: TrainState) -> TrainState:
    """`init_train_state` with its output placed in `shardings` (the optimizer moments never gathered)."""
    return jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings)(params)


def sharded_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                       mesh: Mesh, rules: Rules, shardings: TrainState, weighted: bool = False) -> MeshFunction:
    """train/step.py's `step(state, tokens_AxBxT1) -> (state, metrics)` jitted over `mesh`: state in and out in
    `shardings` (donated), tokens in `batch_sharding`, metrics replicated. `weighted`: the batch is a pair
    (tokens, loss weights), both in `batch_sharding` (supervised fine-tuning)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batches = batch_sharding(mesh, rules)
    jitted = jax.jit(train_step_fn(graphdef, optimizer, schedule),
                     in_shardings=(shardings, (batches, batches) if weighted else batches),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    return MeshFunction(jitted, mesh, rules)


def sharded_training(graphdef: nnx.GraphDef, params: dict, params_shardings: dict, train_cfg: TrainConfig,
                     mesh: Mesh, rules: Rules) -> tuple[TrainState, MeshFunction]:
    """A fresh train state of `params` (already in `params_shardings`) and the jitted step over `mesh`, both with
    `train_cfg`'s optimizer and learning-rate schedule: what `plan_mesh` + `init_state` + `sharded_train_step`
    give, for params created outside a plan."""
    optimizer = make_optimizer(train_cfg)
    shardings = train_state_shardings(params_shardings, params, optimizer, mesh)
    state = init_sharded_train_state(params, optimizer, shardings)
    return state, sharded_train_step(graphdef, optimizer, lr_schedule(train_cfg), mesh, rules, shardings)


def rows_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Token rows [batch, length + 1] (an eval batch): rows split over the batch axes."""
    return NamedSharding(mesh, logical_to_spec((axes.BATCH, None), rules))


def sharded_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules, params_shardings: dict) -> MeshFunction:
    """`eval(params, tokens_BxT1) -> mean loss in nats` jitted over `mesh`, the loss replicated."""
    jitted = jax.jit(lambda params, tokens_BxT1: loss_fn(params, graphdef, tokens_BxT1),
                     in_shardings=(params_shardings, rows_sharding(mesh, rules)),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    return MeshFunction(jitted, mesh, rules)


def sharded_weighted_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules,
                               params_shardings: dict) -> MeshFunction:
    """`eval(params, tokens_BxT1, weights_BxT1) -> (sum of weight x loss, sum of weights)` jitted over `mesh`."""
    rows = rows_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(lambda params, tokens, weights: weighted_eval(params, graphdef, tokens, weights),
                     in_shardings=(params_shardings, rows, rows), out_shardings=(replicated, replicated))
    return MeshFunction(jitted, mesh, rules)


def global_batch(tokens: np.ndarray, sharding: NamedSharding, shape: tuple[int, ...], *, seed: int,
                 step: int) -> jax.Array:
    """Batch `step` of stream `seed` (train/data.py's `batch_at`) as one global array of `shape`
    (..., seq_len + 1) in `sharding`, the leading dimensions being the batch's rows in order. Each process
    reads only the rows its own devices hold."""
    *lead, width = shape
    row_ids = np.arange(math.prod(lead)).reshape(lead)
    cache: dict[tuple, np.ndarray] = {}  # devices that replicate a shard (e.g. over tensor) share one read

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            rows = row_ids[index[:-1]]
            windows = windows_at(tokens, seed=seed, step=step, batch_size=row_ids.size, seq_len=width - 1,
                                 rows=rows.ravel())
            cache[key] = windows.reshape(*rows.shape, width)[..., index[-1]]
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, shard)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """A run's mesh and shardings, decided once before anything is compiled and passed on: the resolved mesh
    config, the mesh and its rules, the model's parameters on it (`params`: graphdef, abstract params, their
    shardings) and the train state as ShapeDtypeStructs carrying their shardings (what a checkpoint restores
    into)."""

    mesh_cfg: MeshConfig
    mesh: Mesh
    rules: Rules
    params: ParamsPlan
    train_state: TrainState

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.params.graphdef

    @property
    def abstract_params(self) -> dict:
        return self.params.abstract

    @property
    def params_shardings(self) -> dict:
        return self.params.shardings

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda a: a.sharding, self.train_state)

    def abstract_state(self, optimizer: optax.GradientTransformation | None = None) -> TrainState:
        """The train state as ShapeDtypeStructs carrying their shardings: what a checkpoint restores into. (The
        plan's optimizer decided it; `optimizer` is accepted for older callers and must be that one.)"""
        return self.train_state

    def init_state(self, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
        """A fresh train state: the params of `create_model(model_cfg, seed)` and the optimizer's initial state,
        created straight into their shardings."""
        return init_sharded_train_state(self.params.init(seed), optimizer, self.state_shardings)


def plan_mesh(model_cfg: ModelConfig, mesh_cfg: MeshConfig, optimizer: optax.GradientTransformation, *,
              micro_batch: int, seq_len: int, seed: int = 0,
              devices: Sequence[jax.Device] | None = None) -> MeshPlan:
    """Resolve and validate `mesh_cfg` against `devices` (default: all, every process's) and the model, build the
    mesh, and derive every sharding from the abstract model and train state (each traced once). Raises
    ValueError naming the numbers on a bad layout, before anything is compiled. (`seed` does not change the
    plan; it is accepted for older callers: pass it to `init_state`.)"""
    del seed
    devices = list(jax.devices() if devices is None else devices)
    resolved = mesh_cfg.resolve(len(devices))
    resolved.validate_for(model_cfg, micro_batch, seq_len)
    mesh, rules = make_mesh(resolved, devices), rules_for(resolved)
    params = plan_params(model_cfg, mesh, rules)
    train_state = abstract_train_state(params.shardings, params.abstract, optimizer, mesh)
    return MeshPlan(resolved, mesh, rules, params, train_state)
