"""Multi-token prediction (model/mtp.py): each depth's logits equal a by-hand computation of DeepSeek-V3's formula
from the model's weights; depth k at position i sees no token after t_(i+k); training adds the weighted MTP loss,
trains the modules (and only through the loss), and a run with MTP trains, checkpoints and logs `mtp_loss`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig, MoEConfig
from model.layers import rope_tables
from model.presets import get_preset
from model.transformer import create_model
from train.config import TrainConfig
from train.optimizer import lr_schedule, make_optimizer
from train.step import init_train_state, make_train_step, objective_fn

CFG = get_preset("tiny").replace(dtype="float32", mtp_depth=2, max_seq_len=32)
T = 12


def tokens(seed: int = 0, batch: int = 2, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def by_hand(model, toks: jax.Array) -> list[jax.Array]:
    """Each depth's logits, written out: h^k_i = Block(W [rms(E t_(i+k)); rms(h^(k-1)_i)]), logits = rms(h^k) E^T."""
    eps, table = model.cfg.norm_eps, model.embed[...]
    h = model.hidden(toks)
    out = []
    for k, m in enumerate(model.mtp, start=1):
        n = toks.shape[1] - k
        x = jnp.concatenate([rms(table[toks[:, k:]], m.embed_norm.scale[...], eps),
                             rms(h[:, :n], m.hidden_norm.scale[...], eps)], axis=-1) @ m.proj[...]
        cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(n), (toks.shape[0], n)), model.cfg.rope_dim,
                               model.cfg.rope_theta)
        h = m.block(x, cos, sin)[0]
        out.append(rms(h, m.norm.scale[...], eps) @ table.T)
    return out


@pytest.mark.slow
def test_each_depth_is_deepseek_v3s_formula():
    model = create_model(CFG, seed=1)
    toks = tokens()
    logits, _ = model.mtp_logits(model.hidden(toks), toks)
    expected = by_hand(model, toks)
    assert [x.shape for x in logits] == [(2, T - 1, CFG.vocab_size), (2, T - 2, CFG.vocab_size)]
    for got, want in zip(logits, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_depth_k_at_position_i_sees_no_token_after_i_plus_k():
    model = create_model(CFG, seed=2)
    toks = tokens(1, batch=1)
    j = 8
    changed = toks.at[0, j].set((toks[0, j] + 1) % CFG.vocab_size)
    before, _ = model.mtp_logits(model.hidden(toks), toks)
    after, _ = model.mtp_logits(model.hidden(changed), changed)
    for k, (a, b) in enumerate(zip(before, after, strict=True), start=1):
        np.testing.assert_array_equal(a[0, :j - k], b[0, :j - k])  # positions i + k < j: blind to token j
        assert not np.allclose(a[0, j - k], b[0, j - k])  # position j - k embeds token j itself


def test_the_objective_adds_the_weighted_mtp_loss():
    model = create_model(CFG, seed=3)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    batch = tokens(2, length=T + 1)
    objective, terms = objective_fn(params, graphdef, batch)
    logits, _ = model.mtp_logits(model.hidden(batch[:, :-1]), batch[:, :-1])
    nll = [np.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, batch[:, k + 1:, None], -1)[..., 0])
           for k, x in enumerate(logits, start=1)]
    np.testing.assert_allclose(terms["mtp_loss"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(objective, terms["loss"] + CFG.mtp_loss_weight * terms["mtp_loss"], rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], model.loss(batch[:, :-1], batch[:, 1:]), rtol=1e-6)


@pytest.mark.slow
def test_training_moves_the_modules_and_lowers_their_loss():
    """On a repeating sequence the MTP loss falls; with weight 0 the modules get no gradient (Adam leaves them)."""
    train = TrainConfig(steps=40, warmup_steps=1, lr=1e-2, weight_decay=0.0, batch_size=4, seq_len=T)
    pattern = jnp.tile(jnp.arange(5), 4)[:T + 1]
    batch = jnp.broadcast_to(pattern, (1, train.batch_size, T + 1))
    for weight in (0.3, 0.0):
        graphdef, state = nnx.split(create_model(CFG.replace(mtp_loss_weight=weight), seed=4))
        optimizer = make_optimizer(train)
        step = make_train_step(graphdef, optimizer, lr_schedule(train))
        train_state = init_train_state(nnx.to_pure_dict(state), optimizer)
        first = jax.tree.map(np.asarray, train_state["params"]["mtp"])
        losses = []
        for _ in range(train.steps):
            train_state, metrics = step(train_state, batch)
            losses.append(float(metrics["mtp_loss"]))
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), first,
                                             jax.tree.map(np.asarray, train_state["params"]["mtp"])))
        if weight:
            assert losses[-1] < 0.5 * losses[0], losses
            assert all(moved)
        else:
            assert not any(moved)


def test_an_moe_model_with_mtp_trains_and_keeps_the_mtp_blocks_bias():
    cfg = CFG.replace(mtp_depth=1, moe=MoEConfig(n_experts=4, top_k=2, router="sigmoid", bias_update_rate=0.01))
    train = TrainConfig(steps=2, warmup_steps=1, batch_size=2, seq_len=T)
    graphdef, state = nnx.split(create_model(cfg, seed=5))
    optimizer = make_optimizer(train)
    train_state = init_train_state(nnx.to_pure_dict(state), optimizer)
    bias = np.asarray(train_state["params"]["mtp"][0]["block"]["mlp"]["expert_bias"])
    train_state, metrics = make_train_step(graphdef, optimizer, lr_schedule(train))(
        train_state, tokens(3, length=T + 1)[None])
    assert np.isfinite(metrics["mtp_loss"]) and np.isfinite(metrics["router_loss"])
    np.testing.assert_array_equal(train_state["params"]["mtp"][0]["block"]["mlp"]["expert_bias"], bias)
    assert not np.array_equal(train_state["params"]["blocks"]["mlp"]["expert_bias"],
                              nnx.to_pure_dict(state)["blocks"]["mlp"]["expert_bias"])


@pytest.mark.parametrize("field, value, message", [("mtp_depth", -1, "non-negative integer"),
                                                   ("mtp_depth", 32, "less than model.max_seq_len"),
                                                   ("mtp_loss_weight", -0.1, "non-negative number")])
def test_bad_mtp_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=f"model.{field}.*{message}|{message}"):
        ModelConfig(**{**CFG.__dict__, field: value})


@pytest.mark.slow
def test_a_run_with_mtp_trains_checkpoints_and_logs_it(tmp_path):
    from scripts.train import main

    out = tmp_path / "run"
    args = ["--preset", "tiny", "--steps", "4", "--out", str(out), "--set", "model.mtp_depth=1",
            "--set", "train.batch_size=8", "--set", "train.seq_len=32", "--set", "train.ckpt_every=2",
            "--set", "train.eval_every=1000", "--set", "train.log_every=1"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("mtp_loss" in r for r in records)
    assert all(np.isfinite(r["mtp_loss"]) for r in records if "mtp_loss" in r)
    assert main([*args, "--extend", "2"]) == 0  # restores the MTP modules from the checkpoint and goes on
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 6


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(mtp_depth=1, moe=MoEConfig(n_experts=4, top_k=2, router="sigmoid",
                                                                          n_shared_experts=1))])
def test_the_accounting_counts_the_modules(cfg):
    from scaling.accounting import param_count

    state = nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param)
    counts = param_count(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(state))
    assert counts["mtp"] == sum(x.size for x in jax.tree.leaves(state["mtp"]))
    assert counts["active"] == param_count(cfg.replace(mtp_depth=0))["active"]
