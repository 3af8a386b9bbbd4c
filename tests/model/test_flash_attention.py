"""The Pallas flash-attention kernel (interpret mode on CPU; compiled on a GPU) against plain attention:
outputs, log-sum-exp, and dQ/dK/dV through a loss that also weighs the lse (so its cotangent path is checked).

The reference is `model.attention.reference_attention` (dense float32 scores and softmax, differentiated by JAX)
with the lse computed by `jax.nn.logsumexp` over the same masked scores: nothing in it is shared with the kernel.
Tolerances: float32 1e-5 (the math is the same up to summation order); bfloat16 2e-2 relative to the values'
scale (inputs, probabilities and outputs rounded to 8 mantissa bits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import reference_attention
from model.config import ModelConfig
from model.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference, merge_blocks
from model.transformer import create_model

SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)


def inputs(B, T, S, H, K, D, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
    d_lse = jax.random.normal(keys[4], (B, H, T), jnp.float32)
    return q, k, v, d_out, d_lse


def reference_lse(q, k, causal):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scores = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, H // K, D).astype(jnp.float32),
                        k.astype(jnp.float32), precision="highest") / np.sqrt(D)
    if causal:
        scores = jnp.where(jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :], scores, -jnp.inf)
    return jax.nn.logsumexp(scores, axis=-1).reshape(B, H, T)


def outputs_and_grads(attend, q, k, v, d_out, d_lse):
    """(out, lse, dq, dk, dv) of loss = <out, d_out> + <lse, d_lse>."""
    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, lse, *grads)


def reference_outputs_and_grads(q, k, v, d_out, d_lse, causal):
    """`outputs_and_grads` of the reference attention and lse, at full float32 matmul precision."""
    with jax.default_matmul_precision("highest"):
        return outputs_and_grads(lambda q, k, v: (reference_attention(q, k, v, causal=causal),
                                                  reference_lse(q, k, causal)), q, k, v, d_out, d_lse)


def assert_float32_close(ours, ref):
    """(out, lse, dq, dk, dv) against the reference's, to the float32 tolerance 1e-5."""
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def check(B, T, S, H, K, D, causal, dtype, tol, *, blocks, interpret):
    q, k, v, d_out, d_lse = inputs(B, T, S, H, K, D, dtype)
    ours = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks,
                                                             interpret=interpret), q, k, v, d_out, d_lse)
    ref = reference_outputs_and_grads(q, k, v, d_out, d_lse, causal)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        scale = 1.0 if dtype == jnp.float32 else max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)


# (T, S, H, K, D, causal): GQA ratios 1, 4 and 8; tails that are not whole tiles; T < S; a head dim that is not a
# power of two; a single query.
CASES = [
    (48, 48, 2, 2, 16, True),
    (37, 37, 4, 1, 16, True),
    (40, 61, 8, 1, 32, True),
    (29, 50, 4, 1, 24, False),
    (1, 33, 2, 2, 16, True),
]


@pytest.mark.parametrize("T, S, H, K, D, causal", CASES)
def test_float32_matches_reference(T, S, H, K, D, causal):
    check(1, T, S, H, K, D, causal, jnp.float32, 1e-5, blocks=SMALL, interpret=True)


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_matches_reference(causal):
    check(2, 45, 45, 4, 2, 32, causal, jnp.bfloat16, 2e-2, blocks=SMALL, interpret=True)


def test_blocks_merged_by_lse_equal_whole_attention_with_gradients():
    """Ring attention's use: the last 24 queries over keys [0, 24) (all visible) and [24, 48) (causal), each with
    the kernel, merged through their lse, equal causal attention over all 48 keys, gradients included (they flow
    through both blocks' lse cotangents)."""
    q, k, v, d_out, d_lse = inputs(1, 24, 48, 4, 2, 16, jnp.float32)

    def blocked(q, k, v):
        past = flash_attention(q, k[:, :24], v[:, :24], causal=False, block_sizes=SMALL, interpret=True)
        diag = flash_attention(q, k[:, 24:], v[:, 24:], causal=True, block_sizes=SMALL, interpret=True)
        return merge_blocks(*past, *diag)

    ours = outputs_and_grads(blocked, q, k, v, d_out, d_lse)
    assert_float32_close(ours, reference_outputs_and_grads(q, k, v, d_out, d_lse, True))


@pytest.mark.parametrize("T, S, H, K, D, causal", CASES)
def test_module_reference_matches_test_reference(T, S, H, K, D, causal):
    """`flash_attention_reference` (the kernel's same-signature reference) against this file's reference."""
    q, k, v, d_out, d_lse = inputs(2, T, S, H, K, D, jnp.float32)
    ours = outputs_and_grads(lambda q, k, v: flash_attention_reference(q, k, v, causal=causal), q, k, v, d_out,
                             d_lse)
    assert_float32_close(ours, reference_outputs_and_grads(q, k, v, d_out, d_lse, causal))


def test_rejects_bad_arguments_by_name():
    q, k, v, *_ = inputs(1, 8, 4, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="T <= S; got T = 8, S = 4"):
        flash_attention(q, k, v, causal=True, interpret=True)
    with pytest.raises(ValueError, match="H a multiple of K"):
        flash_attention(q[:, :, :1], k, v, causal=False, interpret=True)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16, got 48"):
        BlockSizes(block_k=48)
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, causal=False, interpret=True)


def test_model_with_flash_attention_matches_reference_attention():
    """A whole model's logits and parameter gradients with attention_impl="flash" (interpret mode on CPU)."""
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                      max_seq_len=32, dtype="float32")
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 50)

    def loss_and_grads(impl):
        from flax import nnx

        model = create_model(ModelConfig(**{**cfg.__dict__, "attention_impl": impl}))
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss))(params)

    (l_flash, g_flash), (l_ref, g_ref) = loss_and_grads("flash"), loss_and_grads("reference")
    np.testing.assert_allclose(l_flash, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


GPU_CASES = [(T, S, H, K, D, c) for (T, S, H, K, D, c) in
             [(256, 256, 4, 4, 64, True), (300, 300, 8, 2, 128, True), (200, 333, 8, 1, 64, False),
              (130, 517, 4, 1, 64, True), (512, 512, 2, 2, 128, False), (77, 77, 4, 1, 40, True)]]


@pytest.mark.gpu
@pytest.mark.parametrize("T, S, H, K, D, causal, dtype, tol",
                         [(*case, jnp.float32, 1e-5) for case in GPU_CASES[:3]]
                         + [(*case, jnp.bfloat16, 2e-2) for case in GPU_CASES])
def test_compiled_kernel_matches_reference_on_gpu(T, S, H, K, D, causal, dtype, tol):
    """The same checks with the kernels compiled through Triton, default tile sizes. Float32 only on three cases:
    each compiles for about a minute (full-precision Triton dots)."""
    check(2, T, S, H, K, D, causal, dtype, tol, blocks=None, interpret=False)


@pytest.mark.parametrize("T, S, H, K, D, causal", GPU_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_without_a_gpu(T, S, H, K, D, causal, dtype):
    """Forward and backward lowered for CUDA (Pallas -> Triton IR) on this machine, default tiles: Triton-specific
    lowering errors (one was found on a GPU first) show up in CI, not only on a lent GPU."""
    q = jax.ShapeDtypeStruct((2, T, H, D), dtype)
    kv = jax.ShapeDtypeStruct((2, S, K, D), dtype)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v)
        return vjp(out)

    text = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
        assert name in text
