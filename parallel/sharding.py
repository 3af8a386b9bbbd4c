"""Shardings for parameters, optimizer state and batches, and the training step jitted over a mesh.

Parameters are created already sharded (`jax.jit(init, out_shardings=...)`): no device ever holds a full copy.
The step is train/step.py's step function, jitted with in/out shardings and traced under the mesh and the
activation rules, so `model.axes.constrain` pins activations and GSPMD inserts the collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import axes
from model.config import ModelConfig
from model.kernels.triton import triton_deprecation_ignored
from model.transformer import create_model
from parallel.rules import Rules, activation_rules, logical_to_spec


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with any dimension that its mesh axes do not divide evenly replicated instead (a fallback: e.g. a
    259-token vocabulary over tensor=2)."""
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        entries.append(entry if dim % ways == 0 else None)
    return PartitionSpec(*entries)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings, as a pure dict shaped like `nnx.to_pure_dict(abstract_params)`, from each Param's
    logical `out_sharding` metadata (`abstract_params`: the state of `nnx.split(nnx.eval_shape(...))`)."""
    def one(var: nnx.Variable) -> NamedSharding:
        shape = var.get_value().shape
        names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), shape, mesh))

    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_params):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = one(var)
    return out


def create_sharded_params(model_cfg: ModelConfig, mesh: Mesh, rules: Rules,
                          seed: int = 0) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, shardings): the model of `create_model(model_cfg, seed)` initialised straight into its
    shardings, params as a pure dict."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(model_cfg, seed)))
    shardings = param_shardings(abstract, mesh, rules)

    def init() -> dict:
        return nnx.to_pure_dict(nnx.split(create_model(model_cfg, seed))[1])

    return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def _key(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def state_shardings(params_shardings: dict, abstract_params: dict, abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a state pytree built from params (e.g. a train state with optimizer moments): a leaf whose
    path ends with a parameter's path and has its shape (Adam's mu and nu) is sharded like that parameter; every
    other leaf (counts, the step) is replicated. `abstract_*`: pytrees of arrays or ShapeDtypeStructs."""
    by_path = {}
    for (path, sharding), shaped in zip(jax.tree_util.tree_flatten_with_path(params_shardings)[0],
                                        jax.tree.leaves(abstract_params), strict=True):
        by_path[tuple(_key(k) for k in path)] = (sharding, tuple(shaped.shape))
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        keys = tuple(_key(k) for k in path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[1] == tuple(leaf.shape):
                return match[0]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Token batches [accum, batch, length + 1]: rows split over the batch axes; accum and length replicated
    (length + 1 does not split evenly; sequence parallelism shards inside the model)."""
    return NamedSharding(mesh, logical_to_spec((None, axes.BATCH, None), rules))


class MeshFunction:
    """A jitted function that is traced (called or lowered) with `mesh` set and the activation rules active, so
    the model's `axes.constrain` calls turn into sharding constraints."""

    def __init__(self, jitted: Callable, mesh: Mesh, rules: Rules):
        self.jitted, self.mesh, self.activation_rules = jitted, mesh, activation_rules(rules)

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), spmd.logical_axis_rules(self.activation_rules), triton_deprecation_ignored():
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        """Lowering is where our Pallas kernels (attention_impl="flash") meet JAX 0.11's Triton-deprecation
        warning; it is filtered here."""
        with jax.set_mesh(self.mesh), spmd.logical_axis_rules(self.activation_rules), triton_deprecation_ignored():
            return self.jitted.lower(*args)
