"""Shared by the mesh tests: a model's objective and gradients on one device, the same on a device mesh, and the
two compared."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from model import axes
from model.config import ModelConfig
from model.transformer import create_model
from parallel.mesh import MeshConfig, make_mesh, parse_mesh
from parallel.rules import logical_to_spec, rules_for
from parallel.sharding import MeshFunction, create_sharded_params
from train.step import objective_fn


def one_device(cfg: ModelConfig, tokens_BxL1: jax.Array, seed: int = 1, micro_batches: int = 1) -> tuple:
    """(objective, its terms, gradients) of a freshly initialised model on one device; with `micro_batches`=m,
    averaged over the micro-batches of rows j, j + m, j + 2m, ... (as a pipeline cuts a batch)."""
    graphdef, params = nnx.split(create_model(cfg, seed=seed))
    fn = jax.jit(jax.value_and_grad(lambda p, t: objective_fn(p, graphdef, t), has_aux=True))
    outs = [fn(nnx.to_pure_dict(params), tokens_BxL1[j::micro_batches]) for j in range(micro_batches)]
    (objective, terms), grads = jax.tree.map(lambda *xs: sum(xs) / micro_batches, *outs)
    return objective, terms, grads


def on_mesh(cfg: ModelConfig, tokens_BxL1: jax.Array, mesh_cfg: MeshConfig, seed: int = 1,
            *, with_hlo: bool = False) -> tuple:
    """(objective, its terms, gradients[, compiled HLO text]) of the same model with its params and the token
    rows sharded over `mesh_cfg` (validated first, as a training run does)."""
    mesh_cfg = mesh_cfg.resolve(len(jax.devices()))
    mesh_cfg.validate_for(cfg, micro_batch=tokens_BxL1.shape[0], seq_len=tokens_BxL1.shape[1] - 1)
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg)
    graphdef, params, shardings = create_sharded_params(cfg, mesh, rules, seed=seed)
    rows = NamedSharding(mesh, logical_to_spec((axes.BATCH, None), rules))
    jitted = jax.jit(jax.value_and_grad(lambda p, t: objective_fn(p, graphdef, t), has_aux=True),
                     in_shardings=(shardings, rows), out_shardings=((None, None), shardings))
    tokens_BxL1 = jax.device_put(tokens_BxL1, rows)
    fn = MeshFunction(jitted, mesh, rules)
    (objective, terms), grads = fn(params, tokens_BxL1)
    if not with_hlo:
        return objective, terms, grads
    return objective, terms, grads, fn.lower(params, tokens_BxL1).compile().as_text()


class Compared(NamedTuple):
    terms: dict  # the objective's terms on the mesh
    terms_ref: dict  # and on one device
    hlo: str | None  # the mesh step's compiled HLO text, with `with_hlo`


def assert_mesh_matches_one_device(cfg: ModelConfig, tokens_BxL1: jax.Array, mesh_text: str, *, terms=(),
                                   micro_batches: int = 1, grads: bool = True, grads_atol: float = 1e-7,
                                   with_hlo: bool = False) -> Compared:
    """`on_mesh` over `mesh_text` against `one_device` (averaged over `micro_batches`, as a pipeline cuts the batch):
    the objective and each term named in `terms` to 1e-5 relative, and (with `grads`) every gradient to 1e-4
    relative and `grads_atol`. float32 models: the mesh's reductions only run in other orders. Returns both sides'
    terms (and the HLO) for a test's own checks."""
    objective_ref, terms_ref, grads_ref = one_device(cfg, tokens_BxL1, micro_batches=micro_batches)
    objective, terms_got, grads_got, *hlo = on_mesh(cfg, tokens_BxL1, parse_mesh(mesh_text), with_hlo=with_hlo)
    np.testing.assert_allclose(objective, objective_ref, rtol=1e-5)
    for name in terms:
        np.testing.assert_allclose(terms_got[name], terms_ref[name], rtol=1e-5, err_msg=name)
    if grads:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=grads_atol), grads_got, grads_ref)
    return Compared(terms_got, terms_ref, hlo[0] if hlo else None)
