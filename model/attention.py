"""Attention on one device: one signature, implementations chosen by name (`ModelConfig.attention_impl`).

All take q [B, T, H, D], k and v [B, S, K, D] with H a multiple of K (grouped-query attention), and return
[B, T, H, D] in q's dtype. Causal masking aligns the last query with the last key (T <= S). Shape letters as in
model/kernels/flash_attention.py; here D is the head dim.

Nothing here looks at a device mesh except `auto`'s refusal of cuDNN under a sequence-sharded one. The versions
that need the mesh (flash per shard, ring, Ulysses) live in `parallel/attention.py`, which gives the model the
one to use (`Transformer(attend=...)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.kernels import flash_attention as kernels


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
    128, no sequence-sharded mesh), the XLA path elsewhere (docs/BENCHMARKS.md compares the two)."""
    mesh = jax.sharding.get_abstract_mesh()
    sequence_sharded = not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1
    D = q_BxTxHxD.shape[-1]
    if (jax.default_backend() == "gpu" and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16) and D % 8 == 0
            and D <= 128 and not sequence_sharded):
        return cudnn_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)
    return xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)


def kernel_interpret(impl: str) -> bool:
    """Whether our Pallas kernels run interpreted (CPU) or compiled (NVIDIA GPUs, through Triton)."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"attention_impl {impl!r} runs on NVIDIA GPUs (or interpreted on CPU), not {backend!r}")
    return backend == "cpu"


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                    causal: bool = True) -> jax.Array:
    """Our Pallas flash-attention kernel (`model/kernels/flash_attention.py`) on this device's arrays: compiled
    through Triton on NVIDIA GPUs, in interpret mode on CPU (slow; for tests). On a device mesh `parallel/`
    hands the model a version that runs it per shard (`parallel/attention.py`): XLA cannot partition a Pallas
    call."""
    return kernels.flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal,
                                   interpret=kernel_interpret("flash"))[0]


# On one device there is no sequence to spread: `ring` and `ulysses` are `flash`. Their sequence-parallel forms
# need a mesh, and `parallel/attention.py` passes them to the model (`Transformer(attend=...)`).
IMPLEMENTATIONS = {"auto": auto_attention, "reference": reference_attention, "xla": xla_attention,
                   "cudnn": cudnn_attention, "flash": flash_attention, "ring": flash_attention,
                   "ulysses": flash_attention}


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, impl: str = "auto",
              causal: bool = True) -> jax.Array:
    """Dispatch to the implementation named `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal)
