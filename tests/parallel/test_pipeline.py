"""Pipeline parallelism (`parallel/pipeline.py`): the GPipe schedule against applying the layers one after the
other to each micro-batch (float32: the same operations in the same order, so 1e-6), with NaN-filled bubbles;
then whole models whose layers are split over the mesh's `stage` axis against the same model on one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import MoEConfig
from model.presets import get_preset
from parallel.mesh import parse_mesh
from parallel.pipeline import bubble_fraction, gpipe
from tests.parallel.mesh_grads import assert_mesh_matches_one_device

L, B, T, D = 4, 8, 3, 5


def toy_layer(x_bxTxD, w_DxD, positions_bxT):
    """A layer whose output depends on its weights, its input and the positions; its aux term on all three."""
    y = jnp.tanh(x_bxTxD @ w_DxD + positions_bxT[..., None] * 0.1)
    return y, jnp.mean(y**2) * jnp.sum(w_DxD)


def toy_stage(ws_NxDxD, x_bxTxD, positions_bxT):
    def body(x, w):
        return toy_layer(x, w, positions_bxT)
    x_bxTxD, aux_N = jax.lax.scan(body, x_bxTxD, ws_NxDxD)
    return x_bxTxD, jnp.sum(aux_N)


def sequential(ws_LxDxD, x_BxTxD, positions_BxT, m):
    """Every layer in turn over each micro-batch (rows j, j + m, ... as gpipe cuts them); aux averaged over them."""
    out, aux = jnp.zeros_like(x_BxTxD), 0.0
    for j in range(m):
        x, pos = x_BxTxD[j::m], positions_BxT[j::m]
        for w in ws_LxDxD:
            x, a = toy_layer(x, w, pos)
            aux = aux + a
        out = out.at[j::m].set(x)
    return out, aux / m


def toy_inputs():
    k1, k2 = jax.random.split(jax.random.key(0))
    ws = jax.random.normal(k1, (L, D, D)) / np.sqrt(D)
    x = jax.random.normal(k2, (B, T, D))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) + jnp.arange(B)[:, None]  # distinct per row
    return ws, x, positions


def value_and_grads(run, ws, x, positions):
    """run's output and aux, and the gradients in (ws, x) of a scalar that weighs every output element."""
    def scalar(ws, x):
        out, aux = run(ws, x, positions)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size)).reshape(out.shape)) + aux, (out, aux)
    (_, (out, aux)), grads = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(ws, x)
    return out, aux, grads


def assert_close(got, ref):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, ref)


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 2)])
def test_gpipe_equals_the_layers_in_turn_with_nan_bubbles(p, m):
    ws, x, positions = toy_inputs()
    run = functools.partial(gpipe, toy_stage, n_stages=p, n_microbatches=m, axis=None, bubble=jnp.nan)
    got = jax.jit(lambda ws, x, pos: value_and_grads(run, ws, x, pos))(ws, x, positions)
    ref = value_and_grads(lambda w, x, pos: sequential(w, x, pos, m), ws, x, positions)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(got))  # nothing from a bubble leaks anywhere
    assert_close(got, ref)


def test_gpipe_on_a_stage_mesh_sends_activations_stage_to_stage():
    """Stages on 4 devices (and rows on 2): the same numbers; activations hop between neighbouring stages as
    collective-permutes, and no device gathers another stage's weights."""
    ws, x, positions = toy_inputs()
    mesh = jax.make_mesh((2, 4), ("data", "stage"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def run(ws, x, pos):
        return gpipe(toy_stage, ws, x, pos, n_stages=4, n_microbatches=2, axis="stage", bubble=jnp.nan)

    shardings = (jax.NamedSharding(mesh, jax.P("stage")), jax.NamedSharding(mesh, jax.P("data")),
                 jax.NamedSharding(mesh, jax.P("data")))
    fn = jax.jit(lambda ws, x, pos: value_and_grads(run, ws, x, pos), in_shardings=shardings)
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, s) for a, s in zip((ws, x, positions), shardings, strict=True)]
        got = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    assert_close(got, value_and_grads(lambda w, x, pos: sequential(w, x, pos, 2), ws, x, positions))
    permutes = [line for line in hlo.splitlines() if "collective-permute(" in line]
    assert any("{0,1},{1,2},{2,3}" in line for line in permutes)  # forward: stage s to s + 1, no wrap-around
    assert any("{1,0},{2,1},{3,2}" in line for line in permutes)  # backward: gradients to the previous stage
    assert "all-gather" not in hlo


def test_bubble_fraction():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0


def test_model_on_a_pipeline_mesh_matches_one_device():
    """4 layers on 4 stages (one each), rows over data=2, 2 micro-batches: the loss and every gradient."""
    cfg = get_preset("tiny").replace(dtype="float32", n_layers=4, pipeline_microbatches=2)
    tokens = jax.random.randint(jax.random.key(7), (4, 17), 0, cfg.vocab_size)
    assert_mesh_matches_one_device(cfg, tokens, "data=2,stage=4")


@pytest.mark.slow
def test_moe_model_on_a_pipeline_with_fsdp_and_tensor_matches_one_device_per_micro_batch():
    """stage=2 with fsdp=2 and tensor=2 on an MoE model: the router loss is averaged over the pipeline's
    micro-batches (like gradient accumulation's), so the reference is one device's objective and gradients
    averaged over the same micro-batches (rows j, j + m, ...)."""
    cfg = get_preset("tiny").replace(dtype="float32", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=1.0))
    tokens = jax.random.randint(jax.random.key(8), (8, 17), 0, cfg.vocab_size)
    assert_mesh_matches_one_device(cfg, tokens, "fsdp=2,stage=2,tensor=2", terms=("router_loss",), micro_batches=2)


def test_pipeline_mesh_errors_name_the_numbers():
    tiny = get_preset("tiny")  # 2 layers
    with pytest.raises(ValueError, match=r"model.n_layers \(2\) must be divisible by mesh.stage \(4\)"):
        parse_mesh("data=2,stage=4").validate_for(tiny, micro_batch=8)
    with pytest.raises(ValueError, match=r"split into 3 pipeline micro-batches .* use a batch divisible by 6"):
        parse_mesh("data=2,stage=2").validate_for(tiny.replace(pipeline_microbatches=3), micro_batch=8)
    with pytest.raises(ValueError, match="model.pipeline_microbatches must be a non-negative integer"):
        tiny.replace(pipeline_microbatches=-1)
