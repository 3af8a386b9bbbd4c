"""An MoE model with its experts split over the mesh's `expert` axis computes what one device computes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from model import axes
from model.config import MoEConfig
from model.presets import get_preset
from model.transformer import create_model
from parallel.mesh import make_mesh, parse_mesh
from parallel.rules import logical_to_spec, rules_for
from parallel.sharding import MeshFunction, create_sharded_params
from train.step import objective_fn

MOE = get_preset("tiny").replace(dtype="float32", moe=MoEConfig(n_experts=8, top_k=2, capacity_factor=1.0))


def objective_and_grads(cfg, tokens, mesh_text: str | None):
    """(objective, its terms, gradients, compiled HLO or None) on one device or on the mesh `mesh_text`."""
    if mesh_text is None:
        graphdef, params = nnx.split(create_model(cfg, seed=1))
        fn = jax.jit(jax.value_and_grad(lambda p, t: objective_fn(p, graphdef, t), has_aux=True))
        (objective, terms), grads = fn(nnx.to_pure_dict(params), tokens)
        return objective, terms, grads, None
    mesh_cfg = parse_mesh(mesh_text)
    mesh_cfg.validate_for(cfg, micro_batch=tokens.shape[0], seq_len=tokens.shape[1] - 1)
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg)
    graphdef, params, shardings = create_sharded_params(cfg, mesh, rules, seed=1)
    rows = NamedSharding(mesh, logical_to_spec((axes.BATCH, None), rules))
    jitted = jax.jit(jax.value_and_grad(lambda p, t: objective_fn(p, graphdef, t), has_aux=True),
                     in_shardings=(shardings, rows), out_shardings=((None, None), shardings))
    tokens = jax.device_put(tokens, rows)
    fn = MeshFunction(jitted, mesh, rules)
    (objective, terms), grads = fn(params, tokens)
    hlo = fn.lower(params, tokens).compile().as_text()
    return objective, terms, grads, hlo


@pytest.mark.parametrize("mesh_text", ["fsdp=2,expert=2,tensor=2"])
def test_moe_model_on_an_expert_mesh_matches_one_device(mesh_text):
    """Loss, router loss and every gradient (experts' and router's included); capacity 1.0 drops tokens, so
    the groups (sequences) must be dispatched exactly as on one device."""
    tokens = jax.random.randint(jax.random.key(7), (8, 17), 0, MOE.vocab_size)
    objective_ref, terms_ref, grads_ref, _ = objective_and_grads(MOE, tokens, None)
    objective, terms, grads, hlo = objective_and_grads(MOE, tokens, mesh_text)
    np.testing.assert_allclose(objective, objective_ref, rtol=1e-5)
    np.testing.assert_allclose(terms["router_loss"], terms_ref["router_loss"], rtol=1e-5)
    assert terms_ref["router_loss"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_ref)
    assert "all-to-all" in hlo  # tokens travel to their experts' devices, not the experts to the tokens


def test_expert_mesh_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"model.moe.n_experts \(8\) must be divisible by mesh.expert \(3\)"):
        parse_mesh("expert=3").validate_for(MOE, micro_batch=6)
    dropless = MOE.replace(moe=MoEConfig(n_experts=8, dispatch="dropless"))
    with pytest.raises(ValueError, match="'dropless' with mesh.expert=2"):
        parse_mesh("expert=2").validate_for(dropless, micro_batch=2)
