"""`MeshConfig` (how many devices along each parallelism axis) and the `jax.sharding.Mesh` built from it.

Mesh axes, outermost to innermost: data, fsdp, stage, expert, sequence, tensor. The innermost axes vary fastest
over the device list, so tensor (and then sequence) groups are neighbouring devices -- on a multi-GPU host those
are the NVLink-connected ones, where the per-layer collectives of tensor parallelism belong.

Axis types are `Auto` on purpose: recent JAX's `jax.make_mesh` defaults to `Explicit` axes (sharding in types),
while our model relies on GSPMD propagation from `with_sharding_constraint` (`model.axes.constrain`) and jit
in/out shardings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax

from model.checks import check_bool, check_int, is_int, parse_axis_sizes
from model.config import ModelConfig

MESH_AXES = ("data", "fsdp", "stage", "expert", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices along each mesh axis. At most one size may be -1: "all the devices the others leave".
    `vocab_parallel` also shards the embedding table and LM head over the vocabulary (on `tensor`)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    stage: int = 1
    expert: int = 1
    vocab_parallel: bool = False

    def __post_init__(self) -> None:
        check_bool("mesh.vocab_parallel", self.vocab_parallel)
        for name in MESH_AXES:
            value = getattr(self, name)
            if not (is_int(value) and value == -1):
                check_int(f"mesh.{name}", value, note=" or -1 (the rest)")
        rest = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(rest) > 1:
            raise ValueError(f"only one mesh axis may be -1 (the rest of the devices), got {len(rest)}: "
                             f"{', '.join(rest)}")

    def sizes(self) -> dict[str, int]:
        """Axis name -> size (possibly -1), in mesh order."""
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, n_devices: int) -> MeshConfig:
        """This config with a -1 replaced by the devices left over; the product must equal `n_devices`."""
        sizes = self.sizes()
        known = math.prod(v for v in sizes.values() if v != -1)
        rest = [name for name, v in sizes.items() if v == -1]
        if rest:
            if n_devices % known:
                raise ValueError(f"mesh.{rest[0]}=-1 cannot fill the devices: the other axes multiply to {known}, "
                                 f"which does not divide the {n_devices} devices")
            return dataclasses.replace(self, **{rest[0]: n_devices // known})
        if known != n_devices:
            raise ValueError(f"mesh axes multiply to {known} ({self.describe()}) but there are {n_devices} devices")
        return self

    def describe(self) -> str:
        """The non-trivial axes as "data=2,tensor=2" (parse_mesh's format); "data=1" when all are 1."""
        parts = [f"{name}={v}" for name, v in self.sizes().items() if v != 1]
        return ",".join(parts) or "data=1"

    def validate_for(self, model_cfg: ModelConfig, micro_batch: int, seq_len: int | None = None) -> None:
        """Raise, before anything is compiled, if the model or a micro-batch of `micro_batch` sequences of
        `seq_len` tokens cannot be split as this (resolved) mesh asks. Messages name both numbers."""
        if any(v < 1 for v in self.sizes().values()):
            raise ValueError(f"resolve the mesh (replace -1) before validate_for, got {self.describe()}")
        if model_cfg.n_layers % self.stage:
            raise ValueError(f"model.n_layers ({model_cfg.n_layers}) must be divisible by mesh.stage ({self.stage}): "
                             f"each pipeline stage holds an equal block of layers")
        for name in ("n_heads", "d_ff") + (() if model_cfg.mla.enabled else ("n_kv_heads",)):  # MLA: unused
            value = getattr(model_cfg, name)
            if value % self.tensor:
                raise ValueError(f"model.{name} ({value}) must be divisible by mesh.tensor ({self.tensor})")
        if self.vocab_parallel and model_cfg.vocab_size % self.tensor:
            raise ValueError(f"mesh.vocab_parallel: model.vocab_size ({model_cfg.vocab_size}) must be divisible "
                             f"by mesh.tensor ({self.tensor})")
        batch_ways = self.data * self.fsdp * self.expert
        if micro_batch % batch_ways:
            raise ValueError(f"the batch per micro-step ({micro_batch} sequences = train.batch_size / "
                             f"train.grad_accum) must be divisible by mesh.data * mesh.fsdp * mesh.expert "
                             f"({batch_ways})")
        pipeline_micro = (model_cfg.pipeline_microbatches or self.stage) if self.stage > 1 else 1
        if micro_batch % (pipeline_micro * batch_ways):
            raise ValueError(f"the batch per micro-step ({micro_batch} sequences) must split into "
                             f"{pipeline_micro} pipeline micro-batches (model.pipeline_microbatches, 0 = one per "
                             f"stage) of a multiple of mesh.data * mesh.fsdp * mesh.expert ({batch_ways}) "
                             f"sequences: use a batch divisible by {pipeline_micro * batch_ways}")
        if seq_len is not None and seq_len % self.sequence:
            raise ValueError(f"train.seq_len ({seq_len}) must be divisible by mesh.sequence ({self.sequence})")
        moe = model_cfg.moe
        if moe.enabled and moe.first_dense_layers and self.stage > 1:
            raise ValueError(f"model.moe.first_dense_layers ({moe.first_dense_layers}) with mesh.stage ({self.stage}) "
                             f"is not supported: the pipeline takes one stack of like blocks")
        if moe.enabled and moe.n_experts % self.expert:
            raise ValueError(f"model.moe.n_experts ({moe.n_experts}) must be divisible by mesh.expert ({self.expert})")
        if moe.enabled and moe.dispatch == "dropless" and self.expert > 1 and self.stage > 1:
            raise ValueError(f"model.moe.dispatch 'dropless' with mesh.expert={self.expert} and mesh.stage="
                             f"{self.stage}: expert-parallel dropless dispatch does not run inside the pipeline yet; "
                             f"use 'capacity' dispatch, mesh.expert=1 or mesh.stage=1")
        heads_per_shard = model_cfg.n_heads // self.tensor
        if model_cfg.attention_impl == "ulysses" and heads_per_shard % self.sequence:
            raise ValueError(f"attention_impl 'ulysses' splits each tensor shard's heads (model.n_heads / "
                             f"mesh.tensor = {heads_per_shard}) over mesh.sequence ({self.sequence}); use a "
                             f"sequence size that divides {heads_per_shard}, or attention_impl 'ring'")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES, tensor innermost, all axes of type Auto."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = cfg.resolve(len(devices))
    shape = tuple(cfg.sizes()[name] for name in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh places devices topology-aware on accelerators (mesh_utils) and in id order on CPU.
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def parse_mesh(text: str, vocab_parallel: bool = False) -> MeshConfig:
    """"data=2,fsdp=2,tensor=2" -> MeshConfig(data=2, fsdp=2, tensor=2); unnamed axes stay 1."""
    return MeshConfig(**parse_axis_sizes(text, MESH_AXES), vocab_parallel=vocab_parallel)
