"""Logical axis names carried by parameters and activations.

Model code names *what* an axis is; `parallel/rules.py` decides which mesh axis (if any) it is spread over.
`constrain` is a no-op unless logical-axis rules are active (flax's `logical_axis_rules` context), so the
single-device model runs unchanged.
"""

from __future__ import annotations

import jax
from flax.core import spmd

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
EXPERT = "expert"
EXPERT_BATCH = "expert_batch"  # the batch dimension of activations dispatched to experts (model/moe.py)
LAYERS = "layers"

AxisNames = tuple[str | None, ...]


def constrain(x: jax.Array, names: AxisNames) -> jax.Array:
    """Constrain activation `x` to the sharding its logical axis `names` map to under the active rules."""
    rules = spmd.get_logical_axis_rules()
    if not rules:
        return x
    spec = jax.sharding.PartitionSpec(*spmd.from_sharding_rules(names, rules))
    return jax.lax.with_sharding_constraint(x, spec)
