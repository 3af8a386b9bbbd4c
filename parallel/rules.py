"""Logical axis names -> mesh axes: one rule table with fallbacks (MaxText's `logical_axis_rules` idea).

`TABLE` lists, for each logical name, candidate mesh-axis groups in order of preference; a name may appear on
several rows (the later rows are its fallbacks), and `()` means "replicated". Resolving one array's names
(`logical_to_spec`) walks its dimensions left to right and gives each the first candidate whose mesh axes are
all still unused in that array, so a mesh axis is never used twice in one PartitionSpec. That single rule is what
separates parameter `embed` from activation `embed`: a weight [embed, mlp] shards embed over fsdp (FSDP/ZeRO-3),
while an activation [batch, length, embed] gives fsdp to batch first, and embed falls back to replicated -- no
separate `activation_embed` name is needed.

`rules_for(mesh_cfg)` drops mesh axes of size 1 so specs stay short (an fsdp=1 run has no `fsdp` in any spec).

flax's `logical_axis_rules` context (which `model.axes.constrain` reads) is a plain name -> axes lookup with no
per-array resolution, so `activation_rules` flattens the table for activations: every activation the model
constrains leads with `batch`, so each other name gets its first candidate that does not overlap batch's axes --
except the activations dispatched to MoE experts, which lead with `expert` and `expert_batch` instead of `batch`
([expert, expert_batch, capacity, embed | mlp]): `expert` keeps its own axis, and names after it avoid it.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import PartitionSpec

from model import axes
from parallel.mesh import MeshConfig

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]  # (logical name, mesh axes); () = replicated; order = preference

TABLE: Rules = (
    (axes.BATCH, ("data", "fsdp", "expert")),  # expert joins batch until MoE gives it experts to hold
    (axes.LENGTH, ("sequence",)),
    (axes.EMBED, ("fsdp",)),                    # params: ZeRO-3 over fsdp; activations: taken by batch first
    (axes.HEADS, ("tensor",)),
    (axes.KV_HEADS, ("tensor",)),
    (axes.MLP, ("tensor",)),
    (axes.VOCAB, ("tensor",)),                  # only with vocab_parallel=True (see rules_for)
    (axes.EXPERT, ("expert",)),
    (axes.EXPERT_BATCH, ("data", "fsdp")),     # batch's axes but expert, which the experts hold there
    (axes.HEAD_DIM, ()),
    (axes.LAYERS, ("stage",)),                 # pipeline stages hold contiguous blocks of layers
)
LOGICAL_NAMES = tuple(dict.fromkeys(name for name, _ in TABLE))


def rules_for(mesh_cfg: MeshConfig, *, vocab_parallel: bool | None = None) -> Rules:
    """TABLE restricted to the mesh axes of size > 1 in `mesh_cfg` (resolved: no -1). Every logical name keeps
    a final replicated fallback. `vocab_parallel` (default: `mesh_cfg.vocab_parallel`) shards the
    embedding/LM-head vocabulary over tensor."""
    if vocab_parallel is None:
        vocab_parallel = mesh_cfg.vocab_parallel
    sizes = mesh_cfg.sizes()
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"resolve the mesh (replace -1) before rules_for, got {mesh_cfg}")
    rules: list[tuple[str, MeshAxes]] = []
    for name, mesh_axes in TABLE:
        if name == axes.VOCAB and not vocab_parallel:
            mesh_axes = ()
        kept = tuple(a for a in mesh_axes if sizes[a] > 1)
        if kept and (name, kept) not in rules:
            rules.append((name, kept))
    rules.extend((name, ()) for name in LOGICAL_NAMES)
    return tuple(rules)


def _entry(mesh_axes: MeshAxes) -> str | tuple[str, ...] | None:
    if not mesh_axes:
        return None
    return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry logical `names` (None = unnamed, replicated).

    Each dimension takes the first rule for its name whose mesh axes are all unused so far in this spec."""
    used: set[str] = set()
    entries = []
    for name in names:
        chosen: MeshAxes = ()
        if name is not None:
            candidates = [m for n, m in rules if n == name]
            if not candidates:
                raise ValueError(f"no sharding rule for logical axis {name!r}; known: {', '.join(LOGICAL_NAMES)}")
            chosen = next(m for m in candidates if not used.intersection(m))
        used.update(chosen)
        entries.append(_entry(chosen))
    return PartitionSpec(*entries)


def activation_rules(rules: Rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`rules` flattened to one entry per name for flax's `logical_axis_rules` context (activations)."""
    leading = {axes.BATCH: next(m for n, m in rules if n == axes.BATCH),
               axes.EXPERT: next(m for n, m in rules if n == axes.EXPERT)}
    flat = []
    for name in LOGICAL_NAMES:
        candidates = [m for n, m in rules if n == name]
        avoid = set(leading[axes.EXPERT if name == axes.EXPERT_BATCH else axes.BATCH])
        chosen = leading[name] if name in leading else next(m for m in candidates if not avoid.intersection(m))
        flat.append((name, _entry(chosen)))
    return tuple(flat)
