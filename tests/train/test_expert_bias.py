"""Aux-loss-free balancing in the train step (train/step.py): the sigmoid router's selection bias moves by exactly
rate x sign(mean load - load) per step and never by the optimizer (AdamW's weight decay included), and a
DeepSeekMoE model trains on an expert-parallel mesh (capacity) and a data mesh (dropless) as on one device."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from model.config import MoEConfig
from model.presets import get_preset
from model.transformer import create_model
from parallel.mesh import make_mesh, parse_mesh
from parallel.rules import rules_for
from parallel.sharding import create_sharded_params
from tests.parallel.mesh_grads import assert_mesh_matches_one_device
from train.config import TrainConfig
from train.metrics import moe_record
from train.optimizer import lr_schedule, make_optimizer
from train.sharded import sharded_training
from train.step import init_train_state, make_train_step

MOE = MoEConfig(n_experts=8, top_k=2, router="sigmoid", n_group=4, topk_group=2, n_shared_experts=1,
                routed_scaling_factor=2.0, bias_update_rate=0.01, aux_loss_weight=0.0, seq_aux_loss_weight=1e-3,
                capacity_factor=1.0)
CFG = get_preset("tiny").replace(dtype="float32", moe=MOE)
TRAIN = TrainConfig(steps=10, warmup_steps=1, lr=1e-2, weight_decay=0.1, batch_size=8, seq_len=16)


def batches(n: int) -> jax.Array:
    return jax.random.randint(jax.random.key(3), (n, 1, TRAIN.batch_size, TRAIN.seq_len + 1), 0, CFG.vocab_size)


def biased_params(cfg) -> tuple[nnx.GraphDef, dict]:
    """A fresh model's graphdef and params with a skewed selection bias (0.1 on experts 0 and 1)."""
    graphdef, state = nnx.split(create_model(cfg, seed=1))
    params = nnx.to_pure_dict(state)
    bias = params["blocks"]["mlp"]["expert_bias"]
    params["blocks"]["mlp"]["expert_bias"] = bias.at[:, :2].set(0.1)
    return graphdef, params


def steps_on_one_device(cfg, n: int) -> list[tuple[dict, dict]]:
    """(metrics, params before the step) of n train steps on one device."""
    graphdef, params = biased_params(cfg)
    optimizer = make_optimizer(TRAIN)
    step = make_train_step(graphdef, optimizer, lr_schedule(TRAIN))
    state, out = init_train_state(params, optimizer), []
    for batch in batches(n):
        before = jax.tree.map(np.asarray, state["params"])
        state, metrics = step(state, batch)
        out.append((jax.tree.map(np.asarray, metrics), before))
    out.append(({}, jax.tree.map(np.asarray, state["params"])))
    return out


@pytest.mark.parametrize("rate", [0.01, pytest.param(0.0, marks=pytest.mark.slow)])
def test_the_bias_moves_by_the_rule_and_never_by_the_optimizer(rate):
    """AdamW with weight decay would shrink a parameter of 0.1; the bias moves by the rule alone."""
    cfg = CFG.replace(moe=dataclasses.replace(MOE, bias_update_rate=rate))
    out = steps_on_one_device(cfg, 3)
    for (metrics, before), (_, after) in zip(out[:-1], out[1:], strict=True):
        load_LxE = metrics["expert_load"]
        assert load_LxE.shape == (cfg.n_layers, 8)
        np.testing.assert_allclose(load_LxE.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(metrics["load_max_over_mean"], (load_LxE.max(-1) * 8).max(), rtol=1e-6)
        old, new = before["blocks"]["mlp"]["expert_bias"], after["blocks"]["mlp"]["expert_bias"]
        np.testing.assert_array_equal(new, old + np.float32(rate) * np.sign(load_LxE.mean(-1, keepdims=True)
                                                                          - load_LxE))
    assert not np.allclose(out[0][1]["blocks"]["mlp"]["router"], out[-1][1]["blocks"]["mlp"]["router"])


def steps_on_mesh(cfg, n: int, mesh_text: str) -> list[tuple[dict, dict]]:
    mesh_cfg = parse_mesh(mesh_text).resolve(len(jax.devices()))
    mesh_cfg.validate_for(cfg, micro_batch=TRAIN.batch_size, seq_len=TRAIN.seq_len)
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg)
    graphdef, _, shardings = create_sharded_params(cfg, mesh, rules, seed=1)
    params = jax.device_put(biased_params(cfg)[1], shardings)
    state, step = sharded_training(graphdef, params, shardings, TRAIN, mesh, rules)
    out = []
    for batch in batches(n):
        state, metrics = step(state, batch)
        out.append((jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, state["params"])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dispatch, mesh_text", [("capacity", "data=2,expert=2,fsdp=2"),
                                                 ("dropless", "data=2,fsdp=2,tensor=2")])
def test_deepseek_moe_trains_on_a_mesh_as_on_one_device(dispatch, mesh_text):
    """Three steps: losses and expert loads to 1e-4, the updated bias (which the later steps route with) equal."""
    cfg = CFG.replace(moe=dataclasses.replace(MOE, dispatch=dispatch))
    ref = steps_on_one_device(cfg, 3)
    got = steps_on_mesh(cfg, 3, mesh_text)
    for (metrics, params), (metrics_ref, _), (_, params_ref) in zip(got, ref[:-1], ref[1:], strict=True):
        for name in ("loss", "router_loss", "expert_load"):
            np.testing.assert_allclose(metrics[name], metrics_ref[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(params["blocks"]["mlp"]["expert_bias"], params_ref["blocks"]["mlp"]["expert_bias"],
                                   atol=1e-7)
    assert not np.array_equal(got[-1][1]["blocks"]["mlp"]["expert_bias"][:, 2:], 0)  # the bias really moved


def test_moe_record_logs_the_load_per_expert():
    metrics = {"loss": np.float32(2.0), "router_loss": np.float32(0.5), "load_max_over_mean": np.float32(1.5),
               "expert_load": np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)}
    assert moe_record(metrics) == {"router_loss": 0.5, "load_max_over_mean": 1.5,
                                   "expert_load": [[0.25, 0.75], [0.5, 0.5]]}
    assert moe_record({"loss": 1.0}) == {}


@pytest.mark.slow
def test_each_layers_expert_load_comes_through_a_pipeline_in_layer_order():
    """4 layers on stage=2 (two per stage), 2 micro-batches: every layer's load equals one device's, averaged over
    the same micro-batches."""
    cfg = CFG.replace(n_layers=4, pipeline_microbatches=2, moe=dataclasses.replace(MOE, dispatch="capacity"))
    tokens = jax.random.randint(jax.random.key(8), (8, 17), 0, cfg.vocab_size)
    terms, terms_ref, _ = assert_mesh_matches_one_device(cfg, tokens, "fsdp=2,stage=2,tensor=2", micro_batches=2,
                                                         grads=False)
    assert terms["expert_load"].shape == (4, 8)
    assert len({tuple(row) for row in np.asarray(terms_ref["expert_load"])}) == 4  # the layers differ
    np.testing.assert_allclose(terms["expert_load"], terms_ref["expert_load"], atol=1e-6)
