"""The model's attention on a device mesh, chosen here from the mesh and its rules and handed to the model
(`Transformer(attend=...)`, see `parallel/sharding.py`): model/ never looks at a mesh.

jnp and XLA attention need nothing: GSPMD partitions them like any other op, so the model's own implementation
stands (`attention_on_mesh` returns None). A Pallas kernel is different: XLA cannot partition a Pallas call and
would gather every input onto every device, so `flash` runs per device inside `shard_map` over the batch and
head shards, a sequence-sharded length gathered first (per-shard causal attention would be wrong). `ring` and
`ulysses` run per device with the sequence sharded (`parallel/ring_attention.py`, `parallel/ulysses.py`);
without a sequence axis of more than one device they are `flash`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import Mesh, PartitionSpec

from model import axes
from model.attention import kernel_interpret
from model.kernels import flash_attention as kernels
from model.transformer import Attend
from parallel.ring_attention import ring_attention
from parallel.rules import Rules, logical_to_spec
from parallel.ulysses import ulysses_attention

SEQUENCE_PARALLEL = {"ring": ring_attention, "ulysses": ulysses_attention}
PER_SHARD = ("flash", *SEQUENCE_PARALLEL)  # the implementations that are Pallas kernels


@dataclasses.dataclass(frozen=True)
class MeshAttention:
    """Causal self-attention `(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh) -> out_BxTxHxDh` with our flash kernel run per
    device over `mesh`: sequence-parallel (`impl` "ring" or "ulysses") where the `length` rule spreads the
    sequence over more than one device, per batch and head shard otherwise. A frozen dataclass: it lives in the
    model's graphdef, so it compares by value."""

    impl: str
    mesh: Mesh
    rules: Rules

    def _spec(self, *names: str | None) -> PartitionSpec:
        return logical_to_spec(names, self.rules)

    def __call__(self, q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array) -> jax.Array:
        interpret = kernel_interpret(self.impl)
        seq_axes = self._spec(axes.BATCH, axes.LENGTH)[1]
        seq_axes = () if seq_axes is None else (seq_axes,) if isinstance(seq_axes, str) else tuple(seq_axes)
        n = math.prod(self.mesh.shape[a] for a in seq_axes)
        if self.impl in SEQUENCE_PARALLEL and n > 1:
            if q_BxTxHxDh.shape[1] != k_BxTxKxDh.shape[1]:
                raise ValueError(f"attention_impl {self.impl!r} is self-attention over one sharded sequence: queries "
                                 f"and keys must have the same length, got {q_BxTxHxDh.shape[1]} and "
                                 f"{k_BxTxKxDh.shape[1]}")
            local = functools.partial(SEQUENCE_PARALLEL[self.impl], causal=True, axis_name=seq_axes, axis_size=n,
                                      interpret=interpret)
            length = axes.LENGTH
        else:
            def local(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array) -> jax.Array:
                return kernels.flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, causal=True,
                                               interpret=interpret)[0]
            length = None
        q_spec = self._spec(axes.BATCH, length, axes.HEADS, None)
        kv_spec = self._spec(axes.BATCH, length, axes.KV_HEADS, None)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh)


def attention_on_mesh(impl: str, mesh: Mesh, rules: Rules) -> Attend | None:
    """The attention the model should use for `impl` (`ModelConfig.attention_impl`) on `mesh` under `rules`
    (parallel/rules.py's table), or None where its own one-device implementation is right."""
    if impl not in PER_SHARD or mesh.size == 1:
        return None
    return MeshAttention(impl, mesh, rules)
