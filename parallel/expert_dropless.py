"""Dropless MoE dispatch with expert parallelism: the model's routed experts (`MoE(routed_experts=...)`, a
`RoutedExperts` from model/moe.py) run per device inside `jax.shard_map`, each device holding its share of them.

Layout. The expert weights [E, D, F] are split over the `expert` axis (the `expert` rule; each device holds E / ep
experts); `tensor` splits their hidden width F where the `mlp` rule puts it there; an FSDP-sharded D is gathered
at the boundary (the shard_map asks for it whole; GSPMD all-gathers it before and reduce-scatters its gradient
after, as FSDP does for any weight). Tokens [B, T, D] and their routing are split over the batch axes, which
include `expert` for activations (parallel/rules.py: `expert` joins `batch`), and over `sequence` along T.

The exact scheme, one step: each device all-gathers the tokens and their routing over `expert` (the token rows of
its expert group), runs its own experts on the rows routed to them (model/moe.py's `dropless_experts` with the
device's first expert: the rows for other devices' experts sort last and add nothing), weights them by the
routing weights, and `psum_scatter`s the partial outputs back over `expert` to the tokens' owners (plus a psum
over `tensor` for the hidden-width shards' partial sums). Every token's output is the sum over its top_k
experts, as on one device; only the order of that sum differs (float32: equal to ~1e-6).

The cost: every device sees all ep x its tokens and moves B*T*D partials back. The efficient version sends
only the routed rows to their experts' devices and back, an all-to-all of uneven sizes (MaxText's
`ragged_all_to_all` dispatch): that is the next step.

Not supported: pipeline stages (`mesh.stage > 1`, refused in parallel/mesh.py's `validate_for`: the pipeline
vmaps the layers over stages, and this shard_map does not run under it yet).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh, PartitionSpec

from model import axes
from model.config import ModelConfig
from model.moe import RoutedExperts, Routing, dropless_experts
from parallel.rules import Rules, logical_to_spec

MeshAxes = tuple[str, ...]


def _axes_of(entry: str | tuple[str, ...] | None) -> MeshAxes:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class ExpertParallelDropless:
    """`RoutedExperts` over `mesh`'s expert axes `expert` (see the module docstring). A frozen dataclass: it lives
    in the model's graphdef, so it compares by value."""

    mesh: Mesh
    rules: Rules
    expert: MeshAxes

    def _ways(self, mesh_axes: MeshAxes) -> int:
        return math.prod(self.mesh.shape[a] for a in mesh_axes)

    def __call__(self, x_BxTxD: jax.Array, routing: Routing, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                 w_down_ExFxD: jax.Array) -> jax.Array:
        (B, T, _), (E, _, F) = x_BxTxD.shape, w_gate_ExDxF.shape
        token_spec = logical_to_spec((axes.BATCH, axes.LENGTH), self.rules)
        batch, length = _axes_of(token_spec[0]), _axes_of(token_spec[1])
        if B % self._ways(batch):
            raise ValueError(f"expert-parallel dropless dispatch splits the batch ({B} sequences) over the mesh axes "
                             f"{', '.join(batch)} ({self._ways(batch)} devices); use a batch divisible by that")
        if T % self._ways(length):
            length = ()  # e.g. an MTP depth's T - k positions: gathered along T for the experts
        mlp = _axes_of(logical_to_spec((axes.EXPERT, None, axes.MLP), self.rules)[2])
        if F % self._ways(mlp):
            mlp = ()
        ep, e_local = self.expert, E // self._ways(self.expert)

        def local(x_BxTxD: jax.Array, weights_BxTxJ: jax.Array, experts_BxTxJ: jax.Array, w_gate_ExDxF: jax.Array,
                  w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array) -> jax.Array:
            # This expert group's tokens: the expert axes are the fastest-varying batch axes, so the group's
            # devices hold consecutive blocks of rows, gathered in order and scattered back the same way.
            x_BxTxD, weights_BxTxJ, experts_BxTxJ = (jax.lax.all_gather(a, ep, axis=0, tiled=True)
                                                     for a in (x_BxTxD, weights_BxTxJ, experts_BxTxJ))
            first_expert = jax.lax.axis_index(ep) * e_local
            y_BxTxD = dropless_experts(x_BxTxD, Routing(weights_BxTxJ, experts_BxTxJ, None, None), w_gate_ExDxF,
                                       w_up_ExDxF, w_down_ExFxD, first_expert=first_expert)
            y_BxTxD = jax.lax.psum_scatter(y_BxTxD, ep, scatter_dimension=0, tiled=True)
            return jax.lax.psum(y_BxTxD, mlp) if mlp else y_BxTxD

        tokens = PartitionSpec(_entry(batch), _entry(length), None)
        up, down = PartitionSpec(_entry(ep), None, _entry(mlp)), PartitionSpec(_entry(ep), _entry(mlp), None)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(tokens, tokens, tokens, up, up, down),
                             out_specs=tokens)(x_BxTxD, routing.weights_BxTxJ, routing.experts_BxTxJ,
                                               w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def _entry(mesh_axes: MeshAxes) -> str | MeshAxes | None:
    return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def experts_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> RoutedExperts | None:
    """The routed experts the model should use on `mesh` under `rules`: expert-parallel dropless dispatch for a
    dropless MoE model whose `expert` rule spreads the experts over more than one device; None (the model's own,
    all experts on each device) otherwise. Capacity dispatch needs none: GSPMD makes its all-to-alls."""
    moe = model_cfg.moe
    if not moe.enabled or moe.dispatch != "dropless":
        return None
    expert = _axes_of(logical_to_spec((axes.EXPERT,), rules)[0])
    if math.prod(mesh.shape[a] for a in expert) == 1:
        return None
    batch = _axes_of(logical_to_spec((axes.BATCH,), rules)[0])
    if batch[len(batch) - len(expert):] != expert:
        raise ValueError(f"expert-parallel dropless dispatch needs the expert mesh axes ({', '.join(expert)}) to be "
                         f"the last of the batch axes ({', '.join(batch)}) so an expert group's tokens are "
                         f"consecutive rows")
    return ExpertParallelDropless(mesh, rules, expert)
