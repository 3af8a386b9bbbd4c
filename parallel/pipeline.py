"""Pipeline parallelism (GPipe, Huang et al., 2019) as a vmap over stages and a shift between them, in GSPMD.

The layer stack's weights [L, ...] are sharded over the mesh's `stage` axis, so stage s holds layers
s*L/p .. (s+1)*L/p - 1. The batch is cut into m micro-batches. A state buffer [p, b, T, D] (sharded over stage)
holds the input of every stage; each of m + p - 1 iterations runs all stages at once (`jax.vmap` of the stage
function with `spmd_axis_name`, so each device computes only its own stage), then shifts the outputs one stage
on (a collective-permute) while stage 0 takes the next micro-batch. The last stage's output at iteration t is
micro-batch t - (p - 1). The backward is JAX's transpose of the same loop: all forwards, then all backwards
(GPipe's schedule, so a stage keeps the activations of every micro-batch it ran), with gradients flowing back
through the reversed shifts.

Bubbles: at iteration t stage s works on micro-batch t - s, which exists only for 0 <= t - s < m. Other slots
are zeroed before the stage runs, so whatever a bubble holds (the buffer's initial fill, a finished
micro-batch's leftovers) never reaches a valid output, a loss, or a gradient; `bubble` sets the initial fill so
tests can poison it with NaN. The idle fraction of the schedule is (p - 1) / (m + p - 1).

A model runs its layers this way when it is built with `layer_stack=GPipe(...)`: parallel/sharding.py does so
where the rules put the `layers` axis on a mesh axis of more than one device (`pipeline_on_mesh`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from model import axes
from model.config import ModelConfig
from parallel.rules import Rules, logical_to_spec

StageFn = Callable[[object, jax.Array, jax.Array], tuple[jax.Array, Any]]
# (this stage's layer params [L/p, ...], x [b, T, D], positions [b, T]) -> (x [b, T, D], aux): a pytree whose
# scalar leaves are sums over the stage's layers (an aux loss) and whose other leaves lead with the stage's
# layers [L/p, ...] (per-layer statistics, e.g. MoE expert load)


@dataclasses.dataclass(frozen=True)
class GPipe:
    """The model's `LayerStack` (`Transformer(layer_stack=...)`) as a GPipe pipeline of `n_stages` stages over
    the mesh axes `axis`, each micro-step's batch cut into `n_microbatches`. A frozen dataclass: it lives in the
    model's graphdef, so it compares by value."""

    axis: str | tuple[str, ...]
    n_stages: int
    n_microbatches: int

    def __call__(self, stage_fn: StageFn, stacked_params: object, x_BxTxD: jax.Array, positions_BxT: jax.Array
                 ) -> tuple[jax.Array, Any]:
        return gpipe(stage_fn, stacked_params, x_BxTxD, positions_BxT, n_stages=self.n_stages,
                     n_microbatches=self.n_microbatches, axis=self.axis)


def pipeline_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> GPipe | None:
    """The pipeline for the model's stacked layers where `rules` spread the `layers` axis over more than one
    device of `mesh` (the `stage` axis); None otherwise (the layers run in turn)."""
    axis = logical_to_spec((axes.LAYERS,), rules)[0]
    if axis is None:
        return None
    n = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    if n == 1:
        return None
    return GPipe(axis, n, model_cfg.pipeline_microbatches or n)


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """The share of stage-iterations that are idle under GPipe: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


def _to_microbatches(x_Bx: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...], micro-batch j taking rows j, j + m, j + 2m, ...: the rows a device holds (the
    batch is sharded in contiguous blocks) stay on it, split evenly over the micro-batches."""
    B = x_Bx.shape[0]
    return jnp.swapaxes(x_Bx.reshape(B // m, m, *x_Bx.shape[1:]), 0, 1)


def _from_microbatches(x_Mxbx: jax.Array) -> jax.Array:
    """The inverse of `_to_microbatches`."""
    m, b = x_Mxbx.shape[:2]
    return jnp.swapaxes(x_Mxbx, 0, 1).reshape(m * b, *x_Mxbx.shape[2:])


def _constrain_stage(x: jax.Array, axis: str | tuple[str, ...] | None) -> jax.Array:
    """Pin x's leading (stage) dimension to the mesh's stage axis, leaving the others to GSPMD."""
    if axis is None:
        return x
    spec = PartitionSpec(axis, *([PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def _per_stage(fn: Callable[[jax.Array], jax.Array], x: jax.Array, axis: str | tuple[str, ...],
               in_spec: PartitionSpec, out_spec: PartitionSpec) -> jax.Array:
    """fn run per stage, manual over the stage axis only (GSPMD keeps the other mesh axes), so the collectives
    between stages are exactly the ones fn writes."""
    names = {axis} if isinstance(axis, str) else set(axis)
    return jax.shard_map(fn, in_specs=in_spec, out_specs=out_spec, axis_names=names)(x)


def _shift(x_Px: jax.Array, axis: str | tuple[str, ...] | None, p: int) -> jax.Array:
    """Stage s's slice moves to stage s + 1 (a collective-permute; nothing wraps around); stage 0 gets zeros."""
    if axis is None:
        return jnp.concatenate([jnp.zeros_like(x_Px[:1]), x_Px[:-1]], axis=0)
    return _per_stage(lambda x: jax.lax.ppermute(x, axis, [(s, s + 1) for s in range(p - 1)]), x_Px, axis,
                      PartitionSpec(axis), PartitionSpec(axis))


def _to_first_stage(x: jax.Array, axis: str | tuple[str, ...] | None, p: int) -> jax.Array:
    """[p, *x.shape]: x on stage 0, zeros on the others. Nothing moves forward; backward, x's gradient is one
    all-reduce over stages (rather than one per micro-batch inside the loop)."""
    if axis is None:
        return jnp.zeros((p, *x.shape), x.dtype).at[0].set(x)

    def first(x: jax.Array) -> jax.Array:
        return jnp.where(jax.lax.axis_index(axis) == 0, x, jnp.zeros_like(x))[None]

    return _per_stage(first, x, axis, PartitionSpec(), PartitionSpec(axis))


def _from_last_stage(x_Px: jax.Array, axis: str | tuple[str, ...] | None, p: int) -> jax.Array:
    """x[p - 1] on every stage's devices (an all-reduce over stages of the last stage's slice and zeros)."""
    if axis is None:
        return x_Px[p - 1]

    def last(x_1x: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.where(jax.lax.axis_index(axis) == p - 1, x_1x, jnp.zeros_like(x_1x)), axis)[0]

    return _per_stage(last, x_Px, axis, PartitionSpec(axis), PartitionSpec())


def gpipe(stage_fn: StageFn, stacked_params: object, x_BxTxD: jax.Array, positions_BxT: jax.Array, *,
          n_stages: int, n_microbatches: int, axis: str | tuple[str, ...] | None,
          bubble: float = 0.0) -> tuple[jax.Array, Any]:
    """Run the layer stack `stacked_params` (every leaf [L, ...]) over x as a p-stage, m-micro-batch pipeline.

    `stage_fn` runs one stage's L/p layers on one micro-batch. `axis`: the mesh axis (or axes) the stage
    dimension is sharded over (None: no mesh, a plain single-device run of the same schedule). Returns the last
    layer's output [B, T, D] (rows in x's order) and the aux averaged over micro-batches: its scalar leaves
    summed over all layers, its per-layer leaves [L, ...] in layer order."""
    p, m = n_stages, n_microbatches
    B = x_BxTxD.shape[0]
    n_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    if n_layers % p:
        raise ValueError(f"pipeline: {n_layers} layers do not split into {p} equal stages")
    if B % m:
        raise ValueError(f"pipeline: a batch of {B} sequences does not split into {m} equal micro-batches")
    params_Px = jax.tree.map(lambda a: _constrain_stage(a.reshape(p, n_layers // p, *a.shape[1:]), axis),
                             stacked_params)
    inputs_PxMxbxTxD = _to_first_stage(_to_microbatches(x_BxTxD, m), axis, p)
    positions_MxbxT = _to_microbatches(positions_BxT, m)
    run_stages = jax.vmap(stage_fn, spmd_axis_name=axis) if axis is not None else jax.vmap(stage_fn)
    stage_ids = jnp.arange(p)

    def iteration(carry: tuple[jax.Array, Any], t: jax.Array) -> tuple[tuple[jax.Array, Any], jax.Array]:
        state_PxbxTxD, aux_sum = carry
        micro = t - stage_ids
        valid_P = (micro >= 0) & (micro < m)
        state_PxbxTxD = jnp.where(valid_P[:, None, None, None], state_PxbxTxD, 0)
        positions_PxbxT = positions_MxbxT[jnp.clip(micro, 0, m - 1)]
        out_PxbxTxD, aux_P = run_stages(params_Px, _constrain_stage(state_PxbxTxD, axis), positions_PxbxT)
        out_PxbxTxD = _constrain_stage(out_PxbxTxD, axis)
        aux_sum = jax.tree.map(lambda s, a: s + jnp.where(valid_P.reshape(p, *[1] * (a.ndim - 1)), a, 0),
                               aux_sum, aux_P)
        # Stage s + 1 takes stage s's output, stage 0 the next micro-batch (which only it holds).
        shifted = _shift(out_PxbxTxD, axis, p) + inputs_PxMxbxTxD[:, jnp.minimum(t + 1, m - 1)]
        return (_constrain_stage(shifted, axis), aux_sum), out_PxbxTxD

    first = inputs_PxMxbxTxD[:, 0]
    state = jnp.where((stage_ids == 0)[:, None, None, None], first, jnp.full_like(first, bubble))
    aux_shapes = jax.eval_shape(run_stages, params_Px, state, positions_MxbxT[jnp.zeros(p, jnp.int32)])[1]
    no_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
    (_, aux_sum), outs_IxPxbxTxD = jax.lax.scan(iteration, (_constrain_stage(state, axis), no_aux),
                                                jnp.arange(m + p - 1))
    # The last stage's outputs stay on its devices through the loop; one all-reduce hands all m to the LM head.
    last_MxbxTxD = _from_last_stage(jnp.swapaxes(outs_IxPxbxTxD[p - 1:], 0, 1), axis, p)
    def over_stages(a_Px: jax.Array) -> jax.Array:  # sum a loss over stages; a per-layer leaf's stages in order
        return jnp.sum(a_Px, axis=0) if a_Px.ndim == 1 else a_Px.reshape(p * a_Px.shape[1], *a_Px.shape[2:])

    aux = jax.tree.map(lambda a_Px: over_stages(a_Px) / m, aux_sum)
    return _from_microbatches(last_MxbxTxD), aux
