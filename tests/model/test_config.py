"""ModelConfig / TrainConfig / RunConfig validation, presets, and `--set` overrides.

References: error messages must name the field and the bad value (DESIGN.md section 2); parameter counts are
compared with the leaves of the real (abstract) model and with the published Llama-2-7B count, 6,738,415,616
(Touvron et al. 2023; the HF `meta-llama/Llama-2-7b-hf` model card). Counts are integers: compared exactly.
"""

from __future__ import annotations

import re

import jax
import pytest
from flax import nnx

from model.config import ModelConfig
from model.presets import PRESETS, get_preset
from model.transformer import create_model
from scaling.accounting import param_count
from train.config import RunConfig, TrainConfig, apply_overrides

LLAMA2_7B_PARAMS = 6_738_415_616


MODEL_ERRORS = [
    ({"n_heads": 6, "n_kv_heads": 4}, r"n_heads \(6\).*n_kv_heads \(4\)"),
    ({"head_dim": 15}, r"head_dim.*15"),
    ({"d_model": 0}, r"d_model.*0"),
    ({"n_layers": -2}, r"n_layers.*-2"),
    ({"vocab_size": True}, r"vocab_size.*True"),
    ({"d_ff": 2.0}, r"d_ff.*2\.0"),
    ({"max_seq_len": None}, r"max_seq_len.*None"),
    ({"norm_eps": 0.0}, r"norm_eps.*0\.0"),
    ({"rope_theta": -1.0}, r"rope_theta.*-1\.0"),
    ({"dtype": "float64"}, r"dtype.*'float64'"),
    ({"param_dtype": "auto"}, r"param_dtype.*'auto'"),
    ({"attention_impl": "flash2"}, r"attention_impl.*'flash2'"),
    ({"remat": "some"}, r"remat.*'some'"),
    ({"tie_embeddings": 1}, r"tie_embeddings.*1"),
    ({"qkv_bias": "yes"}, r"qkv_bias.*'yes'"),
]
TRAIN_ERRORS = [
    ({"batch_size": 10, "grad_accum": 4}, r"batch_size \(10\).*grad_accum \(4\)"),
    ({"steps": 0}, r"train\.steps.*0"),
    ({"warmup_steps": -1}, r"warmup_steps.*-1"),
    ({"lr": 0.0}, r"train\.lr.*0\.0"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio.*1\.5"),
    ({"val_fraction": 1.0}, r"val_fraction.*1\.0"),
    ({"weight_decay": -0.1}, r"weight_decay.*-0\.1"),
    # float fields reject non-numbers
    ({"lr": "3e-4"}, r"train\.lr.*'3e-4'"),
    ({"min_lr_ratio": None}, r"train\.min_lr_ratio.*None"),
    ({"val_fraction": "0.1"}, r"train\.val_fraction.*'0\.1'"),
    ({"lr": True}, r"train\.lr.*True"),
]


@pytest.mark.parametrize("config, changes, pattern", [(ModelConfig, *case) for case in MODEL_ERRORS]
                         + [(TrainConfig, *case) for case in TRAIN_ERRORS])
def test_config_errors_name_field_and_value(config, changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        config(**changes)


def test_model_config_accepts_valid_values_and_round_trips():
    cfg = ModelConfig(n_heads=8, n_kv_heads=2, dtype="bfloat16", remat="dots", attention_impl="reference")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_layers=7).n_layers == 7


def test_model_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown model config keys \['hidden_size', 'n_layer'\]"):
        ModelConfig.from_dict({"d_model": 64, "hidden_size": 64, "n_layer": 2})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_model_leaves(name):
    cfg = get_preset(name)
    abstract = nnx.eval_shape(lambda: create_model(cfg))  # shapes only: the 7b preset allocates nothing
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(leaf.size for leaf in leaves) == param_count(cfg)["total"]


@pytest.mark.parametrize("changes", [{"qkv_bias": True, "tie_embeddings": False}, {"n_kv_heads": 1}])
def test_variant_param_count_matches_model_leaves(changes):
    cfg = get_preset("tiny").replace(**changes)
    leaves = jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param))
    assert sum(leaf.size for leaf in leaves) == param_count(cfg)["total"]


def test_7b_preset_is_llama2_7b():
    assert param_count(get_preset("7b"))["total"] == LLAMA2_7B_PARAMS


def test_get_preset_unknown_name():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'tiny'"):
        get_preset("huge")


def test_run_config_seq_len_must_fit_model():
    model = get_preset("tiny")  # max_seq_len 64
    RunConfig(model=model, train=TrainConfig(seq_len=64))
    with pytest.raises(ValueError, match=r"seq_len \(65\).*max_seq_len \(64\)"):
        RunConfig(model=model, train=TrainConfig(seq_len=65))


def test_run_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="optim"):
        RunConfig.from_dict({"model": {}, "train": {}, "optim": {}})
    with pytest.raises(ValueError, match="learning_rate"):
        RunConfig.from_dict({"train": {"learning_rate": 1.0}})


@pytest.fixture
def run_config() -> RunConfig:
    return RunConfig(model=get_preset("tiny"), train=TrainConfig(seq_len=32))


def test_apply_overrides_parses_field_types(run_config):
    out = apply_overrides(run_config, [
        "train.lr=3e-4", "train.steps=7", "model.n_layers=3", "model.tie_embeddings=false",
        "model.qkv_bias=True", "train.data=None", "model.dtype=bfloat16", " train.warmup_steps = 2 "])
    assert out.train.lr == 3e-4 and isinstance(out.train.lr, float)
    assert out.train.steps == 7 and isinstance(out.train.steps, int)
    assert out.model.n_layers == 3
    assert out.model.tie_embeddings is False and out.model.qkv_bias is True
    assert out.train.data is None
    assert out.model.dtype == "bfloat16"
    assert out.train.warmup_steps == 2
    assert apply_overrides(run_config, ["train.data=some/folder"]).train.data == "some/folder"
    # everything not overridden is unchanged
    assert out.model.d_model == run_config.model.d_model and out.train.seq_len == run_config.train.seq_len


@pytest.mark.parametrize("item, fragment", [
    ("optim.lr=1", "optim"),
    ("train.learning_rate=1", "train.learning_rate"),
    ("model.d_model=big", "model.d_model"),
    ("train.lr=fast", "train.lr"),
    ("model.qkv_bias=maybe", "model.qkv_bias"),
    ("train.lr", "train.lr"),
    ("lr=1", "lr=1"),
])
def test_apply_overrides_errors_name_the_key(run_config, item, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        apply_overrides(run_config, [item])


def test_apply_overrides_validates_result(run_config):
    with pytest.raises(ValueError, match=r"n_heads \(4\).*n_kv_heads \(3\)"):
        apply_overrides(run_config, ["model.n_kv_heads=3"])
    with pytest.raises(ValueError, match=r"seq_len \(128\)"):
        apply_overrides(run_config, ["train.seq_len=128"])
