"""Starting from pretrained weights: a tiny random `transformers` Llama saved with `save_pretrained` and loaded
with `train.init = hf:DIR` gives transformers' logits and loss on the same tokens; on an 8-device mesh the
parameters equal the one-device ones, each device holding only its slice; the model config comes from the source
and a contradicting one is refused naming the field.

Tolerances: float32 on both sides, different matmul orders: 1e-4 relative on the loss, 2e-4 absolute on the
logits (values of order 1)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from parallel.mesh import MeshConfig
from train.config import RunConfig, TrainConfig
from train.pretrained import check_matches_source, source_model_config
from train.run_data import initial_state
from train.sharded import plan_mesh
from train.step import loss_fn

# The tiny source models' shape (Llama's and Mixtral's) and the tokens both sides are given
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return directory, model


def run_config(hf_dir, **model_changes) -> RunConfig:
    model = source_model_config(f"hf:{hf_dir}")
    model = dataclasses.replace(model, dtype="float32", **model_changes)
    return RunConfig(model=model, train=TrainConfig(seq_len=32, batch_size=8, init=f"hf:{hf_dir}"))


def loaded_params(cfg: RunConfig, mesh: MeshConfig, devices):
    optimizer = optax.adamw(1e-3)
    plan = plan_mesh(cfg.model, mesh, optimizer, micro_batch=8, seq_len=32, devices=devices)
    return plan, initial_state(plan, optimizer, cfg)["params"]


def hf_output(hf_model, **kwargs):
    """transformers' output on TOKENS."""
    with torch.no_grad():
        return hf_model(torch.from_numpy(TOKENS.astype(np.int64)), **kwargs)


def assert_logits_match(plan, params, hf_out):
    """The loaded params' logits on TOKENS are transformers' (2e-4 absolute)."""
    logits = np.asarray(nnx.merge(plan.graphdef, params)(jax.numpy.asarray(TOKENS)))
    np.testing.assert_allclose(logits, hf_out.logits.numpy(), atol=2e-4)


def test_init_from_hf_gives_transformers_logits_and_loss(hf_dir):
    directory, hf_model = hf_dir
    cfg = run_config(directory)
    plan, params = loaded_params(cfg, MeshConfig(data=1), jax.devices()[:1])
    out = hf_output(hf_model, labels=torch.from_numpy(TOKENS.astype(np.int64)))
    ours = float(loss_fn(params, plan.graphdef, jax.numpy.asarray(TOKENS)))
    np.testing.assert_allclose(ours, float(out.loss), rtol=1e-4)
    assert_logits_match(plan, params, out)


def test_init_on_eight_devices_equals_one_device_and_is_sharded(hf_dir):
    directory, _ = hf_dir
    cfg = run_config(directory)
    assert len(jax.devices()) == 8  # tests/conftest.py's fake CPU devices
    _, one = loaded_params(cfg, MeshConfig(data=1), jax.devices()[:1])
    _, eight = loaded_params(cfg, MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wq = eight["blocks"]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8
    assert all(s.data.size < wq.size for s in wq.addressable_shards)  # nobody holds the whole tensor


def test_model_config_comes_from_the_source_and_contradictions_are_named(hf_dir):
    directory, hf_model = hf_dir
    source = source_model_config(f"hf:{directory}")
    assert (source.d_model, source.n_layers, source.n_kv_heads, source.vocab_size) == (64, 2, 2, 300)
    check_matches_source(dataclasses.replace(source, remat="full", dtype="bfloat16"), source, "hf:x")  # allowed
    with pytest.raises(ValueError, match=r"model\.n_layers is 3 .* has 2"):
        check_matches_source(dataclasses.replace(source, n_layers=3), source, "hf:x")


def test_train_cli_takes_the_config_from_init_and_refuses_a_contradiction(hf_dir):
    from scripts.train import build_config, parse_args

    directory, _ = hf_dir
    cfg = build_config(parse_args(["--out", "x", "--init", f"hf:{directory}", "--set", "model.remat=full"]))
    assert cfg.model.n_layers == 2 and cfg.train.init == f"hf:{directory}" and cfg.train.tokenizer == cfg.train.init
    with pytest.raises(SystemExit) as exit_info:
        build_config(parse_args(["--out", "x", "--init", f"hf:{directory}", "--set", "model.d_model=128"]))
    assert exit_info.value.code == 2


def test_init_from_a_mixtral_checkpoint_gives_transformers_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    hf_model = transformers.MixtralForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path)
    cfg = run_config(tmp_path)
    plan, params = loaded_params(cfg, MeshConfig(data=1), jax.devices()[:1])
    assert_logits_match(plan, params, hf_output(hf_model))

