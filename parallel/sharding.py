"""A model's plan on a device mesh: the model built for the mesh, its parameters' shardings, the shardings of a
state built from them and of batches, and functions traced on the mesh.

One plan per run, computed once and passed on: `plan_params(model_cfg, mesh, rules)` builds the abstract model
once (`nnx.eval_shape`), with the attention and layer stack chosen for the mesh (parallel/attention.py,
parallel/pipeline.py), and reads each parameter's sharding from its logical axis names (parallel/rules.py);
`ParamsPlan.init(seed)` creates the parameters straight into those shardings (`jax.jit(init, out_shardings=...)`),
so no device ever holds a full copy. `state_shardings` extends the parameters' shardings to a state built from
them (an optimizer's moments) by tree structure. `MeshFunction` traces a jitted function with the mesh set and
the activation rules active, so the model's `axes.constrain` calls pin activations and GSPMD inserts the
collectives.
"""

from __future__ import annotations

import dataclasses
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
from model.transformer import Transformer, create_model
from parallel.attention import attention_on_mesh
from parallel.expert_dropless import experts_on_mesh
from parallel.pipeline import pipeline_on_mesh
from parallel.rules import Rules, activation_rules, logical_to_spec


def model_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int = 0) -> Transformer:
    """`create_model(model_cfg, seed)` with the attention, the layer stack and the routed experts that `mesh` and
    `rules` call for (a per-shard or sequence-parallel kernel, a pipeline over stages, expert-parallel dropless
    dispatch; the model's own where nothing is needed)."""
    return create_model(model_cfg, seed, attend=attention_on_mesh(model_cfg.attention_impl, mesh, rules),
                        layer_stack=pipeline_on_mesh(model_cfg, mesh, rules),
                        routed_experts=experts_on_mesh(model_cfg, mesh, rules))


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with any dimension that its mesh axes do not divide evenly replicated instead (a fallback: e.g. a
    259-token vocabulary over tensor=2)."""
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        entries.append(entry if dim % ways == 0 else None)
    return PartitionSpec(*entries)


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


@dataclasses.dataclass(frozen=True)
class ParamsPlan:
    """A model's parameters on a mesh, decided before anything is compiled: the graphdef (with the mesh's
    attention and layer stack), the abstract parameters (a pure dict of ShapeDtypeStructs) and their shardings
    (a pure dict of NamedShardings of the same shape)."""

    model_cfg: ModelConfig
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    abstract: dict
    shardings: dict

    def init(self, seed: int = 0) -> dict:
        """The parameters of `create_model(model_cfg, seed)`, initialised straight into their shardings."""
        def init() -> dict:
            return nnx.to_pure_dict(nnx.split(model_on_mesh(self.model_cfg, self.mesh, self.rules, seed))[1])

        return jax.jit(init, out_shardings=self.shardings)()


def plan_params(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> ParamsPlan:
    """The model on `mesh` traced once for its shapes, and every parameter's sharding."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_on_mesh(model_cfg, mesh, rules)))
    return ParamsPlan(model_cfg, mesh, rules, graphdef, nnx.to_pure_dict(abstract),
                      param_shardings(abstract, mesh, rules))


def create_sharded_params(model_cfg: ModelConfig, mesh: Mesh, rules: Rules,
                          seed: int = 0) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, shardings): `plan_params` and `ParamsPlan.init` in one call, params as a pure dict."""
    plan = plan_params(model_cfg, mesh, rules)
    return plan.graphdef, plan.init(seed), plan.shardings


def state_shardings(params_shardings: dict, abstract_params: Any, abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a state pytree built from params (e.g. a train state with an optimizer's moments): every
    subtree with the params' tree structure and leaf shapes (the params themselves, Adam's mu and nu) is sharded
    like the params; every other leaf (counts, the step) is replicated. `abstract_*`: pytrees of arrays or
    ShapeDtypeStructs."""
    params_def = jax.tree.structure(abstract_params)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(abstract_params)]
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_params(node: Any) -> bool:
        return (jax.tree.structure(node) == params_def
                and [tuple(x.shape) for x in jax.tree.leaves(node)] == shapes)

    return jax.tree.map(lambda node: params_shardings if like_params(node) else replicated, abstract_state,
                        is_leaf=like_params)


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
