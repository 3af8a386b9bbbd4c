"""Attention: one signature, implementations chosen by name (`ModelConfig.attention_impl`).

All take q [B, T, H, D], k and v [B, S, K, D] with H a multiple of K (grouped-query attention), and return
[B, T, H, D] in q's dtype. Causal masking aligns the last query with the last key (T <= S).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd

from model import axes
from model.kernels import flash_attention as kernels
from parallel import ring_attention as parallel_ring
from parallel import ulysses as parallel_ulysses


def reference_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                        causal: bool = True) -> jax.Array:
    """Plain jnp attention with float32 scores and softmax; the ground truth for every other implementation."""
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    G = H // K
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, G, D)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                  preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
    if causal:
        mask_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
        scores_BxKxGxTxS = jnp.where(mask_TxS, scores_BxKxGxTxS, -jnp.inf)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32)
    return out_BxTxKxGxD.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)


def _dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, causal: bool,
                           implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` (GQA handled natively); its causal mask is top-left aligned, so causal with
    T != S (the last query aligned with the last key) falls back to the reference."""
    T, S = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
    if causal and T != S:
        return reference_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=True)
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, is_causal=causal,
                                        implementation=implementation)


def xla_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                  causal: bool = True) -> jax.Array:
    """`jax.nn.dot_product_attention` with the XLA implementation."""
    return _dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal, "xla")


def cudnn_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                    causal: bool = True) -> jax.Array:
    """`jax.nn.dot_product_attention` through cuDNN's fused flash attention (NVIDIA GPUs; bfloat16/float16)."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl 'cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()!r}")
    if q_BxTxHxD.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl 'cudnn' needs bfloat16 or float16 inputs, got {q_BxTxHxD.dtype}")
    return _dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal, "cudnn")


def auto_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                   causal: bool = True) -> jax.Array:
    """cuDNN's fused kernel where it runs (an NVIDIA GPU, bfloat16 or float16, head dim a multiple of 8 up to
    128, no sequence-sharded mesh), the XLA path elsewhere: on one H100, 350m trains at 44% MFU with cudnn and
    20% with xla (docs/BENCHMARKS.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    sequence_sharded = not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1
    D = q_BxTxHxD.shape[-1]
    if (jax.default_backend() == "gpu" and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16) and D % 8 == 0
            and D <= 128 and not sequence_sharded):
        return cudnn_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)
    return xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)


def _mesh_and_rules() -> tuple[jax.sharding.AbstractMesh, tuple] | None:
    """The mesh and logical-axis rules of the training step being traced, or None outside one (one device)."""
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return None
    return mesh, rules


def _spec(names: tuple, rules: tuple) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(*spmd.from_sharding_rules(names, rules))


def _kernel_interpret(impl: str) -> bool:
    """Whether our Pallas kernels run interpreted (CPU) or compiled (NVIDIA GPUs, through Triton)."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"attention_impl {impl!r} runs on NVIDIA GPUs (or interpreted on CPU), not {backend!r}")
    return backend == "cpu"


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                    causal: bool = True) -> jax.Array:
    """Our Pallas flash-attention kernel (`model/kernels/flash_attention.py`): compiled through Triton on NVIDIA
    GPUs, in interpret mode on CPU (slow; for tests). Under a device mesh with logical-axis rules active (the
    training step), it runs per device through `shard_map` over the batch and head shards: XLA cannot partition
    a Pallas call, and would otherwise gather every input onto every device. A sequence-sharded length is
    gathered first (per-shard causal attention would be wrong; `ring` and `ulysses` are the scalable paths)."""
    interpret = _kernel_interpret("flash")

    def local(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array) -> jax.Array:
        return kernels.flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal, interpret=interpret)[0]

    if (context := _mesh_and_rules()) is None:
        return local(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
    mesh, rules = context
    q_spec, kv_spec = _spec((axes.BATCH, None, axes.HEADS, None), rules), _spec((axes.BATCH, None, axes.KV_HEADS, None),
                                                                               rules)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)


def _sequence_parallel(impl: str, local, q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                       causal: bool) -> jax.Array | None:
    """Runs `local(q, k, v, causal, axis_name, axis_size)` per device with the sequence sharded over the mesh
    axes that `length` maps to; None when there is no such axis (then plain flash attention is the answer)."""
    if q_BxTxHxD.shape[1] != k_BxSxKxD.shape[1]:
        raise ValueError(f"attention_impl {impl!r} is self-attention over one sharded sequence: queries and keys "
                         f"must have the same length, got {q_BxTxHxD.shape[1]} and {k_BxSxKxD.shape[1]}")
    if (context := _mesh_and_rules()) is None:
        return None
    mesh, rules = context
    seq_axes = spmd.from_sharding_rules((axes.LENGTH,), rules)[0]
    seq_axes = () if seq_axes is None else (seq_axes,) if isinstance(seq_axes, str) else tuple(seq_axes)
    n = math.prod(mesh.shape[a] for a in seq_axes)
    if n == 1:
        return None
    q_spec = _spec((axes.BATCH, axes.LENGTH, axes.HEADS, None), rules)
    kv_spec = _spec((axes.BATCH, axes.LENGTH, axes.KV_HEADS, None), rules)
    fn = functools.partial(local, causal=causal, axis_name=seq_axes, axis_size=n)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)


def ring_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                   causal: bool = True) -> jax.Array:
    """Sequence-parallel attention (`parallel/ring_attention.py`): with the sequence sharded over the mesh's
    `sequence` axis, key/value chunks go around the ring and each device attends its query chunk with our flash
    kernel per block; nothing gathers the sequence. Without a sequence axis it is `flash`."""
    interpret = _kernel_interpret("ring")
    out = _sequence_parallel("ring", functools.partial(parallel_ring.ring_attention, interpret=interpret),
                             q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal)
    return flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal) if out is None else out


def ulysses_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                      causal: bool = True) -> jax.Array:
    """Sequence-parallel attention (`parallel/ulysses.py`, DeepSpeed-Ulysses): an all-to-all trades the sequence
    shards for head shards, each device runs our flash kernel over the whole sequence for its heads, and a second
    all-to-all trades back. Needs the (per-tensor-shard) heads divisible by the sequence axis. Without a sequence
    axis it is `flash`."""
    interpret = _kernel_interpret("ulysses")
    out = _sequence_parallel("ulysses", functools.partial(parallel_ulysses.ulysses_attention, interpret=interpret),
                             q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal)
    return flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal) if out is None else out


IMPLEMENTATIONS = {"auto": auto_attention, "reference": reference_attention, "xla": xla_attention,
                   "cudnn": cudnn_attention, "flash": flash_attention, "ring": ring_attention,
                   "ulysses": ulysses_attention}


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, impl: str = "auto",
              causal: bool = True) -> jax.Array:
    """Dispatch to the implementation named `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)
