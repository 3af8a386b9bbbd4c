"""The MoE layer against a per-token numpy float64 loop, its losses against their formulas, its gradients against
dense gating, and an MoE model on a data x expert mesh against one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig, MoEConfig
from model.moe import MoE, load_balance_loss, route, router_z_loss
from model.presets import get_preset

E, D, F = 4, 16, 24


def moe_layer(top_k: int, dispatch: str, capacity_factor: float = 1.25, seed: int = 0) -> MoE:
    cfg = ModelConfig(d_model=D, d_ff=F, n_layers=2, dtype="float32", init_std=0.3,
                      moe=MoEConfig(n_experts=E, top_k=top_k, dispatch=dispatch, capacity_factor=capacity_factor))
    return MoE(cfg, nnx.Rngs(params=seed))


def inputs(B: int = 2, T: int = 12, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def reference_moe(layer: MoE, x, capacity: int | None) -> np.ndarray:
    """Token by token in float64: each token's top-k experts (first choices of the whole sequence take slots
    before any second choice), weights renormalised when k > 1, a choice past `capacity` dropped."""
    x = np.asarray(x, np.float64)
    router, wg, wu, wd = (np.asarray(w[...], np.float64) for w in (layer.router, layer.w_gate, layer.w_up,
                                                                    layer.w_down))
    k = layer.moe.top_k
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        used = np.zeros(E, int)
        for rank in range(k):
            for t in range(x.shape[1]):
                order = np.argsort(-probs[b, t], kind="stable")[:k]
                e = order[rank]
                weight = probs[b, t, e] / (probs[b, t, order].sum() if k > 1 else 1.0)
                if capacity is not None and used[e] >= capacity:
                    continue
                used[e] += 1
                h = x[b, t] @ wg[e]
                out[b, t] += weight * ((h / (1 + np.exp(-h)) * (x[b, t] @ wu[e])) @ wd[e])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dispatch, capacity_factor", [("dropless", 1.0), ("capacity", 0.5), ("capacity", 4.0)])
def test_moe_matches_a_per_token_reference(top_k, dispatch, capacity_factor):
    layer = moe_layer(top_k, dispatch, capacity_factor)
    x = inputs()
    capacity = layer.moe.capacity(x.shape[1]) if dispatch == "capacity" else None
    ref = reference_moe(layer, x, capacity)
    if capacity_factor == 0.5:
        assert (np.abs(ref).sum(-1) == 0).any() or top_k > 1  # the test really drops tokens
        assert not np.allclose(ref, reference_moe(layer, x, None))
    y, _ = layer(x)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_router_losses_against_their_formulas():
    layer = moe_layer(2, "capacity")
    x = inputs()
    routing = route(x, layer.router[...], top_k=2)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    fraction = np.array([(top2 == e).sum() for e in range(E)]) / top2.size
    np.testing.assert_allclose(load_balance_loss(routing), E * np.sum(fraction * probs.mean((0, 1))), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(router_z_loss(routing), np.mean(lse ** 2), rtol=1e-5)
    uniform = route(x, jnp.zeros((D, E)), top_k=2)  # every probability 1/E: balance 1, z = log(E)^2
    np.testing.assert_allclose(load_balance_loss(uniform), 1.0, rtol=1e-6)
    np.testing.assert_allclose(router_z_loss(uniform), np.log(E) ** 2, rtol=1e-6)
    _, router_loss = layer(x)
    np.testing.assert_allclose(router_loss, 0.01 * load_balance_loss(routing) + 0.001 * router_z_loss(routing),
                               rtol=1e-6)


def dense_gating(layer: MoE, x, weights) -> jax.Array:
    """Every expert on every token, weighted by the router's renormalised top-k weights (0 elsewhere)."""
    router, wg, wu, wd = weights
    probs = jax.nn.softmax(x @ router, axis=-1)
    top, idx = jax.lax.top_k(probs, layer.moe.top_k)
    gates = jnp.sum(jax.nn.one_hot(idx, E) * (top / top.sum(-1, keepdims=True))[..., None], axis=-2)
    h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, wg)) * jnp.einsum("btd,edf->btef", x, wu)
    return jnp.einsum("btef,efd,bte->btd", h, wd, gates)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_moe_gradients_match_dense_gating(dispatch):
    """With room for every token, both dispatches are the dense gated mixture, gradients included (the router
    through the top-k weights)."""
    layer = moe_layer(2, dispatch, capacity_factor=E / 2)  # C = T: nothing dropped
    x, probe = inputs(), inputs(seed=2)
    graphdef, state = nnx.split(layer)
    names = ("router", "w_gate", "w_up", "w_down")

    def through_layer(x, state):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * probe)

    dx, dstate = jax.grad(through_layer, argnums=(0, 1))(x, state)
    got = (dx, *(dstate[name][...] for name in names))
    params = tuple(state[name][...] for name in names)
    ref = jax.grad(lambda x, params: jnp.sum(dense_gating(layer, x, params) * probe), argnums=(0, 1))(x, params)
    for g, r in zip(got, jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


def test_moe_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"model.moe.top_k must be between 1 and model.moe.n_experts \(4\), got 5"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="model.moe.dispatch must be one of"):
        MoEConfig(n_experts=4, dispatch="sinkhorn")
    with pytest.raises(ValueError, match="model.moe.capacity_factor must be a positive number, got 0"):
        MoEConfig(n_experts=4, capacity_factor=0)
    with pytest.raises(ValueError, match=r"unknown model.moe config keys \['experts'\]"):
        ModelConfig.from_dict({"moe": {"experts": 8}})
    cfg = ModelConfig.from_dict(dataclasses.asdict(get_preset("tiny").replace(moe=MoEConfig(n_experts=8))))
    assert cfg.moe == MoEConfig(n_experts=8)
