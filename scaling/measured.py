"""Measured against predicted: a compiled step's `parallel.explain.StepReport` next to `scaling.accounting`'s
`comm_bytes` (bytes each device sends per step, per parallel dimension) and `train_memory` (bytes per device).

Attribution of measured collectives to the accounting's dimensions. The mesh axes (`parallel.mesh.MESH_AXES`) carry
the names of `Layout`'s dimensions, so a collective over one axis counts for that dimension. A collective over
several axes is split as the hierarchical ring it equals: the innermost axis first, moving the full buffer M, then
each further axis moving M divided by the sizes of the axes already done. With c = 2 for an all-reduce and 1
otherwise, axis j of size n_j gets c * (n_j - 1)/n_j * M / (n_1 * ... * n_{j-1}), and the shares telescope to the
flat ring's c * (N - 1)/N * M exactly. So a gradient all-reduce over ("data", "fsdp") gives fsdp 2*(f-1)/f * M (its
reduce-scatter plus all-gather) and data 2*(r-1)/r * M/f: the all-reduce of the 1/fsdp shard among replicas, which
is what comm_bytes' "data" entry counts. A collective-permute (M bytes whatever the group) is shared equally among
its axes, and so is a collective whose group does not cover its axes whole.

Known differences the ratios show (see tests/parallel/test_explain.py for measured values): the CPU backend lowers
a reduce-scatter as an all-reduce (twice the bytes), GSPMD all-reduces gradients inside the accumulation scan (once
per micro-batch, where comm_bytes counts once per step), and comm_bytes counts neither activation resharding nor
scalar reductions. For a dense model, gradient reductions over the sequence or expert axes land on those rows,
where comm_bytes counts them under data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

from model.config import ModelConfig
from parallel.explain import Collective, StepReport
from scaling.accounting import LAYOUT_AXES, Layout, comm_bytes, train_memory


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a comparison: bytes predicted by the accounting and measured in the compiled step."""

    dimension: str
    predicted: float
    measured: float

    @property
    def ratio(self) -> float | None:
        """measured / predicted; None when nothing was predicted."""
        return self.measured / self.predicted if self.predicted else None


def layout_of(mesh_shape: Mapping[str, int] | Iterable[tuple[str, int]]) -> Layout:
    """The accounting `Layout` with the sizes of the mesh axes of the same names (other axes ignored)."""
    sizes = dict(mesh_shape)
    return Layout(**{name: sizes[name] for name in LAYOUT_AXES if name in sizes})


def attribute(collective: Collective, mesh_shape: Mapping[str, int]) -> dict[str, float]:
    """The collective's bytes sent per device per step, split over its mesh axes (see the module docstring)."""
    total = collective.sent_bytes_per_step
    axes = collective.axes
    if not axes or total == 0:
        return {}
    if len(axes) == 1:
        return {axes[0]: total}
    sizes = [mesh_shape[a] for a in reversed(axes)]  # innermost first
    if collective.kind == "collective-permute" or math.prod(sizes) != collective.group_size:
        return {a: total / len(axes) for a in axes}
    weights, done = {}, 1
    for axis, n in zip(reversed(axes), sizes, strict=True):
        weights[axis] = (n - 1) / n / done
        done *= n
    flat = 1 - 1 / done
    return {axis: total * w / flat for axis, w in weights.items()}


def measured_comm(report: StepReport) -> dict[str, float]:
    """Bytes each device sends per step, per mesh axis, every collective attributed by `attribute`."""
    mesh_shape = dict(report.mesh_shape)
    out: dict[str, float] = {}
    for c in report.collectives:
        for axis, sent in attribute(c, mesh_shape).items():
            out[axis] = out.get(axis, 0.0) + sent
    return out


def compare(report: StepReport, cfg: ModelConfig, *, micro_batch: int, seq_len: int, n_microbatches: int = 1,
            optimizer: str = "adamw", remat: str | None = None, param_bytes: int = 4, compute_bytes: int = 2,
            sequence_impl: str = "ulysses", tp_sequence_parallel: bool = True) -> tuple[Row, ...]:
    """Rows (dimension, predicted, measured) for the bytes sent per device per step -- one per parallel dimension
    that either side has, then "total" -- and for memory per device:

      memory: params+optimizer    vs the compiled step's argument bytes (the train state, and the batch)
      memory: grads+activations   vs its temporary bytes (gradients, activations, gathered params, workspace)
      memory: total               vs argument + temporary bytes

    `micro_batch`: sequences per device per micro-step; `n_microbatches`: gradient-accumulation steps;
    `remat` defaults to `cfg.remat` ("dots" counts as selective). The other keywords are those of
    `comm_bytes` and `train_memory`."""
    layout = layout_of(report.mesh_shape)
    # A pipeline cuts each micro-step's batch into pipeline micro-batches and flushes once per micro-step.
    pipe = (cfg.pipeline_microbatches or layout.stage) if layout.stage > 1 else 1
    predicted = comm_bytes(cfg, layout, micro_batch // pipe, seq_len, n_microbatches=n_microbatches * pipe,
                           sequence_impl=sequence_impl, param_bytes=param_bytes, compute_bytes=compute_bytes,
                           tp_sequence_parallel=tp_sequence_parallel, pipeline_flushes=n_microbatches)
    measured = measured_comm(report)
    rows = [Row(name, float(predicted[name]), measured.get(name, 0.0)) for name in LAYOUT_AXES
            if predicted[name] or measured.get(name)]
    rows += [Row(name, 0.0, sent) for name, sent in measured.items() if name not in LAYOUT_AXES]
    rows.append(Row("total", float(predicted["total"]), sum(measured.values())))

    memory = train_memory(cfg, layout, micro_batch // pipe, seq_len, optimizer=optimizer,
                          remat=cfg.remat if remat is None else remat, param_bytes=param_bytes,
                          compute_bytes=compute_bytes, tp_sequence_parallel=tp_sequence_parallel,
                          pipeline_microbatches=pipe)
    m = report.memory
    if m.argument_bytes is not None and m.temp_bytes is not None:
        rows += [Row("memory: params+optimizer", memory["params"] + memory["optimizer"], m.argument_bytes),
                 Row("memory: grads+activations", memory["grads"] + memory["activations"], m.temp_bytes),
                 Row("memory: total", memory["total"], m.argument_bytes + m.temp_bytes)]
    return tuple(rows)


def format_comparison(rows: Sequence[Row]) -> str:
    """The rows as a table of bytes per device (KiB) and measured/predicted ratios."""
    lines = [f"{'per device per step':<28}{'predicted':>14}{'measured':>14}{'ratio':>8}"]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(f"{row.dimension:<28}{row.predicted / 1024:>10.1f} KiB{row.measured / 1024:>10.1f} KiB"
                     f"{ratio:>8}")
    return "\n".join(lines)
