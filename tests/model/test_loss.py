"""The fused LM-head cross-entropy (model/loss.py) against float64 numpy: the loss and its analytic gradients
dL/dlogits = (softmax - onehot) / N, pulled back through the head; then the whole model with `loss_chunks`
against the unfused loss, on one device and on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.loss import cross_entropy, linear_cross_entropy
from model.presets import get_preset
from model.transformer import create_model
from parallel.mesh import parse_mesh
from tests.parallel.mesh_grads import on_mesh
from train.config import RunConfig, TrainConfig
from train.step import loss_fn

TINY = get_preset("tiny").replace(dtype="float32")


def np_loss_and_grads(x, w, targets):
    x, w = x.astype(np.float64), w.astype(np.float64)
    logits = x @ w
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    onehot = np.eye(w.shape[1])[targets]
    n = targets.size
    dlogits = (np.exp(logp) - onehot) / n
    return -(logp * onehot).sum() / n, dlogits @ w.T, np.einsum("btd,btv->dv", x, dlogits)


def problem(B=2, T=12, D=16, V=37, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, D)).astype(np.float32), (0.3 * rng.normal(size=(D, V))).astype(np.float32),
            rng.integers(0, V, (B, T)))


@pytest.mark.parametrize("chunks", [1, 3, 4, 12])
def test_fused_loss_and_grads_match_numpy(chunks):
    x, w, targets = problem()
    loss_ref, dx_ref, dw_ref = np_loss_and_grads(x, w, targets)

    @jax.jit
    def run(x, w):
        fused = lambda x, w: linear_cross_entropy(x, w, targets, chunks)  # noqa: E731
        loss, (dx, dw) = jax.value_and_grad(lambda x, w: 3.0 * fused(x, w), (0, 1))(x, w)
        return fused(x, w), loss, dx, dw  # the undifferentiated loss too (the eval path)

    loss, loss3, dx, dw = run(x, w)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_allclose(loss3, 3 * loss_ref, rtol=1e-6)  # the cotangent scales the saved gradients
    np.testing.assert_allclose(dx, 3 * dx_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, 3 * dw_ref, rtol=1e-5, atol=1e-7)


def test_fused_bfloat16_inputs_and_gradient():
    """bf16 x and head with a bf16 logits gradient: within bf16 rounding (2^-8 relative per product term) of the
    float64 gradients of the same (rounded) inputs; the loss itself is accumulated in float32."""
    x, w, targets = problem(B=2, T=16, D=32, V=300, seed=1)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss_ref, dx_ref, dw_ref = np_loss_and_grads(np.asarray(xb, np.float32), np.asarray(wb, np.float32), targets)
    loss, (dx, dw) = jax.jit(jax.value_and_grad(
        lambda x, w: linear_cross_entropy(x, w, targets, 4, jnp.bfloat16), (0, 1)))(xb, wb)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_bad_chunks_named():
    x, w, targets = problem()
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match=f"divisor of the sequence length 12, got {bad!r}"):
            linear_cross_entropy(x, w, targets, bad)
    with pytest.raises(ValueError, match="model.loss_chunks must be a non-negative integer"):
        TINY.replace(loss_chunks=-1)
    with pytest.raises(ValueError, match=r"train.seq_len \(30\) must be a multiple of model.loss_chunks \(4\)"):
        RunConfig(TINY.replace(loss_chunks=4), TrainConfig(seq_len=30))


def _model_loss_and_grads(cfg, tokens):
    graphdef, params = nnx.split(create_model(cfg, seed=3))
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, graphdef, tokens)))(nnx.to_pure_dict(params))


@pytest.mark.slow
def test_model_with_loss_chunks_matches_unfused_loss():
    tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, TINY.vocab_size)
    for cfg, tol in ((TINY, 1e-5), (TINY.replace(dtype="bfloat16", logits_grad_dtype="compute"), 3e-2)):
        loss_ref, grads_ref = _model_loss_and_grads(cfg, tokens)
        loss, grads = _model_loss_and_grads(cfg.replace(loss_chunks=4), tokens)
        np.testing.assert_allclose(loss, loss_ref, rtol=tol / 10)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))
    # eval without differentiation takes the plain scan and agrees with the unfused loss
    graphdef, params = nnx.split(create_model(TINY.replace(loss_chunks=8), seed=3))
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    np.testing.assert_allclose(loss_fn(params, graphdef, tokens), cross_entropy(logits, tokens[:, 1:]), rtol=1e-6)


def test_loss_chunks_on_a_mesh_match_one_device():
    """Sequence-sharded tokens (strided chunks keep the shards) and a vocabulary-sharded head."""
    cfg = TINY.replace(vocab_size=256)
    tokens = jax.random.randint(jax.random.key(6), (4, 17), 0, cfg.vocab_size)
    loss_ref, grads_ref = _model_loss_and_grads(cfg, tokens)  # unfused, one device
    mesh_cfg = parse_mesh("data=2,sequence=2,tensor=2", vocab_parallel=True)
    loss, _, grads = on_mesh(cfg.replace(loss_chunks=4), tokens, mesh_cfg, seed=3)
    assert grads["embed"].sharding.spec[0] == "tensor"
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_ref)
