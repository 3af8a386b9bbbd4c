"""DeepSeekMoE (model/router.py, model/moe.py): the layer against transformers' DeepseekV3MoE with copied weights
(sigmoid router, selection bias, group-limited routing, shared experts), the aux-loss-free bias update moving load
toward balance, and the new MoEConfig fields' errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig, MoEConfig
from model.moe import MoE
from model.router import expert_load, load_max_over_mean, route, sequence_balance_loss, update_expert_bias

E, D, F, K, GROUPS, KEEP = 8, 16, 24, 3, 4, 2
DEEPSEEK = MoEConfig(n_experts=E, top_k=K, router="sigmoid", n_group=GROUPS, topk_group=KEEP, n_shared_experts=2,
                     routed_scaling_factor=2.5, dispatch="dropless")


def deepseek_layer(moe: MoEConfig, seed: int = 0) -> MoE:
    cfg = ModelConfig(d_model=D, d_ff=F, n_layers=2, dtype="float32", init_std=0.3, moe=moe)
    return MoE(cfg, nnx.Rngs(params=seed))


def inputs(B: int = 2, T: int = 12, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def hf_moe(layer: MoE, bias: np.ndarray):
    """transformers' DeepseekV3MoE holding `layer`'s weights and `bias` as its e_score_correction_bias."""
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    moe = layer.moe
    config = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E,
                              num_experts_per_tok=moe.top_k, n_group=moe.n_group, topk_group=moe.topk_group,
                              n_shared_experts=moe.n_shared_experts, routed_scaling_factor=moe.routed_scaling_factor,
                              norm_topk_prob=moe.norm_topk_prob, hidden_act="silu")
    module = DeepseekV3MoE(config).float().eval()

    def t(a) -> "torch.Tensor":
        return torch.tensor(np.asarray(a, np.float32))

    with torch.no_grad():
        module.gate.weight.copy_(t(layer.router[...]).T)
        module.gate.e_score_correction_bias.copy_(t(bias))
        gate_up = jnp.concatenate([layer.w_gate[...], layer.w_up[...]], axis=-1)  # [E, D, 2F]
        module.experts.gate_up_proj.copy_(t(gate_up).transpose(1, 2))
        module.experts.down_proj.copy_(t(layer.w_down[...]).transpose(1, 2))
        module.shared_experts.gate_proj.weight.copy_(t(layer.shared.w_gate[...]).T)
        module.shared_experts.up_proj.weight.copy_(t(layer.shared.w_up[...]).T)
        module.shared_experts.down_proj.weight.copy_(t(layer.shared.w_down[...]).T)
    return module


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_deepseek_moe_equals_transformers(dispatch):
    """Same output to 1e-5 (fp32) as transformers' DeepseekV3MoE, with a non-zero selection bias and groups that
    change which experts are chosen; capacity dispatch with room for every assignment is the same mixture."""
    torch = pytest.importorskip("torch")
    moe = dataclasses.replace(DEEPSEEK, dispatch=dispatch, capacity_factor=float(E))
    layer = deepseek_layer(moe)
    bias = 0.3 * jax.random.normal(jax.random.key(5), (E,))
    layer.expert_bias[...] = bias
    x = inputs()
    chosen = route(x, layer.router[...], K, moe, bias).experts_BxTxJ
    assert not np.array_equal(chosen, route(x, layer.router[...], K, moe).experts_BxTxJ)  # the bias matters
    ungrouped = dataclasses.replace(moe, n_group=1, topk_group=1)
    assert not np.array_equal(chosen, route(x, layer.router[...], K, ungrouped, bias).experts_BxTxJ)  # groups too
    with torch.no_grad():
        ref = hf_moe(layer, np.asarray(bias))(torch.tensor(np.asarray(x))).numpy()
    y, _ = layer(x)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_router_weights_come_from_the_unbiased_scores():
    """The bias chooses experts but never weighs them, and carries no gradient."""
    layer = deepseek_layer(dataclasses.replace(DEEPSEEK, routed_scaling_factor=1.0, n_group=1, topk_group=1))
    x = inputs()
    bias = jnp.array([5.0, 0, 0, 0, 0, 0, 0, 0])  # expert 0 always chosen
    routing = route(x, layer.router[...], K, layer.moe, bias)
    assert (routing.experts_BxTxJ[..., 0] == 0).all()
    scores = jax.nn.sigmoid(x @ layer.router[...])
    chosen = jnp.take_along_axis(scores, routing.experts_BxTxJ, axis=-1)
    np.testing.assert_allclose(routing.weights_BxTxJ, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    grad = jax.grad(lambda b: jnp.sum(route(x, layer.router[...], K, layer.moe, b).weights_BxTxJ ** 2))(bias)
    assert not np.asarray(grad).any()


def test_bias_updates_move_a_skewed_load_toward_balance():
    """A bias skewed onto two experts: repeated updates (rate 0.01) bring max/mean load from over 2 down below
    1.2, each moving every expert's bias by the rate against its load (not at all at exactly the mean)."""
    moe = dataclasses.replace(DEEPSEEK, n_group=1, topk_group=1, bias_update_rate=0.01)
    layer = deepseek_layer(moe)
    x = inputs(B=8, T=32)
    bias = jnp.zeros((E,)).at[:2].set(0.5)  # a skewed start: experts 0 and 1 take nearly every token
    skewed = load_max_over_mean(expert_load(route(x, layer.router[...], K, moe, bias)))
    step = jax.jit(lambda bias: (expert_load(route(x, layer.router[...], K, moe, bias)), bias))
    for _ in range(200):
        load, bias = step(bias)
        new = update_expert_bias(bias, load, 0.01)
        np.testing.assert_allclose(new - bias, 0.01 * np.sign(load.mean() - load), atol=1e-7)
        bias = new
    assert skewed > 2.0
    assert load_max_over_mean(expert_load(route(x, layer.router[...], K, moe, bias))) < 1.2


def test_sequence_balance_loss_is_one_when_every_sequence_is_balanced():
    """DeepSeek-V3's formula E * sum_e f_e P_e per sequence, checked against numpy; 1 for a uniform router."""
    layer = deepseek_layer(DEEPSEEK)
    x = inputs()
    routing = route(x, layer.router[...], K, layer.moe)
    s = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64))))
    p = s / s.sum(-1, keepdims=True)
    chosen = np.asarray(routing.experts_BxTxJ)
    f = np.stack([[np.mean(chosen[b] == e) for e in range(E)] for b in range(x.shape[0])])
    np.testing.assert_allclose(sequence_balance_loss(routing), E * np.mean(np.sum(f * p.mean(1), -1)), rtol=1e-5)


def test_deepseek_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"model.moe.topk_group \(3\) must be at most model.moe.n_group \(2\)"):
        MoEConfig(n_experts=8, router="sigmoid", n_group=2, topk_group=3)
    with pytest.raises(ValueError, match=r"model.moe.n_experts \(8\) must be divisible by model.moe.n_group \(3\)"):
        MoEConfig(n_experts=8, router="sigmoid", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match=r"model.moe.top_k \(3\) must be at most model.moe.topk_group \(1\) x "
                                         r"experts per group \(2\)"):
        MoEConfig(n_experts=8, top_k=3, router="sigmoid", n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="model.moe.router must be one of"):
        MoEConfig(n_experts=8, router="sinkhorn")
    with pytest.raises(ValueError, match=r"model.moe.bias_update_rate \(0.001\) needs model.moe.router 'sigmoid'"):
        MoEConfig(n_experts=8, bias_update_rate=0.001)
    with pytest.raises(ValueError, match="model.moe.bias_update_rate must be a non-negative number, got -1"):
        MoEConfig(n_experts=8, router="sigmoid", bias_update_rate=-1)
    with pytest.raises(ValueError, match="model.moe.routed_scaling_factor must be a positive number, got 0"):
        MoEConfig(n_experts=8, routed_scaling_factor=0)
    with pytest.raises(ValueError, match="model.moe.n_shared_experts must be a non-negative integer, got -1"):
        MoEConfig(n_experts=8, n_shared_experts=-1)
