"""Dropless MoE dispatch with the experts split over the mesh's `expert` axis (parallel/expert_dropless.py) computes
what one device computes: each device's experts' partial outputs, summed over the expert axis, are every token's
top_k experts' weighted sum. float32 throughout, so logits and the objective to 1e-5 and gradients to 1e-4
relative (the sums over a token's experts and the gradients' reductions run in other orders on the mesh)."""

import jax
import numpy as np
import pytest
from flax import nnx

from model.config import MoEConfig
from model.moe import Routing, dropless_experts
from model.presets import get_preset
from model.transformer import create_model
from parallel.expert_dropless import ExpertParallelDropless
from parallel.mesh import make_mesh, parse_mesh
from parallel.rules import rules_for
from parallel.sharding import MeshFunction, create_sharded_params
from tests.parallel.mesh_grads import assert_mesh_matches_one_device

SOFTMAX = get_preset("tiny").replace(dtype="float32", moe=MoEConfig(n_experts=8, top_k=2, dispatch="dropless"))
DEEPSEEK = get_preset("tiny").replace(  # sigmoid routing in groups, a shared expert, its own width, an MTP module
    dtype="float32", n_layers=2, mtp_depth=1,
    moe=MoEConfig(n_experts=8, top_k=2, d_ff=16, n_shared_experts=1, router="sigmoid", n_group=2, topk_group=1,
                  routed_scaling_factor=2.0, dispatch="dropless"))


def test_experts_shares_sum_to_all_experts():
    """`dropless_experts` over a slice of the experts (one device's share) gives those experts' part of the
    output; the parts add up to all experts' output, and assignments outside the slice add nothing."""
    rng = np.random.default_rng(0)
    B, T, D, F, E, J = 2, 5, 8, 6, 8, 2
    x = rng.standard_normal((B, T, D), np.float32)
    w_gate, w_up = rng.standard_normal((E, D, F), np.float32), rng.standard_normal((E, D, F), np.float32)
    w_down = rng.standard_normal((E, F, D), np.float32)
    experts = rng.integers(0, E, (B, T, J), dtype=np.int32)
    routing = Routing(rng.uniform(size=(B, T, J)).astype(np.float32), experts, None, None)
    experts_fn = jax.jit(dropless_experts)
    full = experts_fn(x, routing, w_gate, w_up, w_down)
    parts = [experts_fn(x, routing, w_gate[s:s + 2], w_up[s:s + 2], w_down[s:s + 2], first_expert=s)
             for s in range(0, E, 2)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5, atol=1e-5)
    outside = Routing(routing.weights_BxTxJ, experts % 2 + 4, None, None)  # only experts 4 and 5
    np.testing.assert_array_equal(experts_fn(x, outside, w_gate[:2], w_up[:2], w_down[:2], first_expert=0), 0)


def test_dropless_logits_on_a_data_expert_mesh_match_one_device():
    cfg = SOFTMAX.replace(n_layers=1)  # one MoE layer keeps this quick check in `make test`
    tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, cfg.vocab_size)
    mesh_cfg = parse_mesh("data=2,expert=4").resolve(len(jax.devices()))
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg)
    graphdef, params, _ = create_sharded_params(cfg, mesh, rules, seed=1)
    assert isinstance(nnx.merge(graphdef, params).blocks.mlp.routed_experts, ExpertParallelDropless)
    logits = MeshFunction(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)), mesh, rules)(params, tokens)
    reference = jax.jit(lambda m, t: m(t))(create_model(cfg, seed=1), tokens)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~20 s on 2 cores: forward and backward compiled on one device and on 8
def test_dropless_train_step_on_a_data_expert_mesh_matches_one_device():
    tokens = jax.random.randint(jax.random.key(7), (8, 17), 0, SOFTMAX.vocab_size)
    hlo = assert_mesh_matches_one_device(SOFTMAX, tokens, "data=2,expert=4", terms=("router_loss", "expert_load"),
                                         with_hlo=True).hlo
    assert "reduce-scatter" in hlo  # the partial outputs go back to the tokens' owners


@pytest.mark.slow  # ~45 s on 2 cores
def test_deepseek_dropless_train_step_on_an_fsdp_expert_tensor_mesh_matches_one_device():
    """Sigmoid group-limited routing with a shared expert and an MTP module's MoE block; the experts' hidden
    width split over tensor (partial sums psum-ed) and their d_model rows over fsdp (gathered for the step)."""
    tokens = jax.random.randint(jax.random.key(5), (8, 13), 0, DEEPSEEK.vocab_size)
    assert_mesh_matches_one_device(DEEPSEEK, tokens, "fsdp=2,expert=2,tensor=2", terms=("mtp_loss",))


def test_dropless_expert_parallelism_in_a_pipeline_is_refused_by_name():
    parse_mesh("data=2,expert=4").validate_for(SOFTMAX, micro_batch=8)  # accepted now
    with pytest.raises(ValueError, match=r"'dropless' with mesh.expert=2 and mesh.stage=2"):
        parse_mesh("expert=2,stage=2").validate_for(SOFTMAX, micro_batch=4)
