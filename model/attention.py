"""Attention on one device: one signature, implementations chosen by name (`ModelConfig.attention_impl`).

All take q [B, T, H, Dh], k and v [B, S, K, Dh] with H a multiple of K (grouped-query attention), and return
[B, T, H, Dh] in q's dtype. Causal masking aligns the last query with the last key (T <= S). Shape letters:
the legend at the top of model/kernels/flash_attention.py.

Nothing here looks at a device mesh except `auto`'s refusal of cuDNN under a sequence-sharded one. The versions
that need the mesh (flash per shard, ring, Ulysses) live in `parallel/attention.py`, which gives the model the
one to use (`Transformer(attend=...)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.kernels import flash_attention as kernels


def reference_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                        causal: bool = True) -> jax.Array:
    """Plain jnp attention with float32 scores and softmax; the ground truth for every other implementation."""
    B, T, H, Dh = q_BxTxHxDh.shape
    S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
    G = H // K
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh,
                                  preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(Dh))
    if causal:
        mask_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
        scores_BxKxGxTxS = jnp.where(mask_TxS, scores_BxKxGxTxS, -jnp.inf)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh, preferred_element_type=jnp.float32)
    return out_BxTxKxGxDh.reshape(B, T, H, Dh).astype(q_BxTxHxDh.dtype)


def _dot_product_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, causal: bool,
                           implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` (GQA handled natively); its causal mask is top-left aligned, so causal with
    T != S (the last query aligned with the last key) falls back to the reference."""
    T, S = q_BxTxHxDh.shape[1], k_BxSxKxDh.shape[1]
    if causal and T != S:
        return reference_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=True)
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, is_causal=causal,
                                        implementation=implementation)


def xla_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                  causal: bool = True) -> jax.Array:
    """`jax.nn.dot_product_attention` with the XLA implementation."""
    return _dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal, "xla")


def cudnn_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                    causal: bool = True) -> jax.Array:
    """`jax.nn.dot_product_attention` through cuDNN's fused flash attention (NVIDIA GPUs; bfloat16/float16)."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl 'cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()!r}")
    if q_BxTxHxDh.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl 'cudnn' needs bfloat16 or float16 inputs, got {q_BxTxHxDh.dtype}")
    return _dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal, "cudnn")


def auto_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                   causal: bool = True) -> jax.Array:
    """cuDNN's fused kernel where it runs (an NVIDIA GPU, bfloat16 or float16, head dim a multiple of 8 up to
    128, no sequence-sharded mesh), the XLA path elsewhere (docs/BENCHMARKS.md compares the two)."""
    mesh = jax.sharding.get_abstract_mesh()
    sequence_sharded = not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1
    Dh = q_BxTxHxDh.shape[-1]
    if (jax.default_backend() == "gpu" and q_BxTxHxDh.dtype in (jnp.bfloat16, jnp.float16) and Dh % 8 == 0
            and Dh <= 128 and not sequence_sharded):
        return cudnn_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal)
    return xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal)


def kernel_interpret(impl: str) -> bool:
    """Whether our Pallas kernels run interpreted (CPU) or compiled (NVIDIA GPUs, through Triton)."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"attention_impl {impl!r} runs on NVIDIA GPUs (or interpreted on CPU), not {backend!r}")
    return backend == "cpu"


def flash_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                    causal: bool = True) -> jax.Array:
    """Our Pallas flash-attention kernel (`model/kernels/flash_attention.py`) on this device's arrays: compiled
    through Triton on NVIDIA GPUs, in interpret mode on CPU (slow; for tests). On a device mesh `parallel/`
    hands the model a version that runs it per shard (`parallel/attention.py`): XLA cannot partition a Pallas
    call."""
    return kernels.flash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal,
                                   interpret=kernel_interpret("flash"))[0]


# On one device there is no sequence to spread: `ring` and `ulysses` are `flash`. Their sequence-parallel forms
# need a mesh, and `parallel/attention.py` passes them to the model (`Transformer(attend=...)`).
IMPLEMENTATIONS = {"auto": auto_attention, "reference": reference_attention, "xla": xla_attention,
                   "cudnn": cudnn_attention, "flash": flash_attention, "ring": flash_attention,
                   "ulysses": flash_attention}


def attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *, impl: str = "auto",
              causal: bool = True) -> jax.Array:
    """Dispatch to the implementation named `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal)
