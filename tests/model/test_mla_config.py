"""`MLAConfig` and DeepSeek-V3's MoE shape fields (`moe.d_ff`, `moe.first_dense_layers`): validation that names
the field and value, JSON round trips, and `--set model.mla.x=...` overrides (the path nested MoEConfig takes)."""

from __future__ import annotations

import json

import pytest

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.presets import get_preset
from train.config import RunConfig, TrainConfig, apply_overrides

MLA = MLAConfig(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize("changes, pattern", [
    ({"kv_lora_rank": -1}, r"model\.mla\.kv_lora_rank must be a non-negative integer, got -1"),
    ({"q_lora_rank": 1.5}, r"model\.mla\.q_lora_rank must be a non-negative integer, got 1\.5"),
    ({"qk_rope_head_dim": 7}, r"model\.mla\.qk_rope_head_dim must be even .*got 7"),
    ({"qk_rope_head_dim": 0}, r"model\.mla\.qk_rope_head_dim must be a positive integer, got 0"),
    ({"v_head_dim": True}, r"model\.mla\.v_head_dim must be a positive integer, got True"),
])
def test_mla_config_errors_name_field_and_value(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        MLAConfig(**changes)


def test_mla_enabled_and_head_dims():
    assert not MLAConfig().enabled
    assert MLA.enabled and MLA.qk_head_dim == 24
    assert ModelConfig(head_dim=32).rope_dim == 32 and ModelConfig(head_dim=32, mla=MLA).rope_dim == 8


@pytest.mark.parametrize("changes, pattern", [
    ({"mla": {"kv_lora_rank": 16}}, r"model\.mla must be an MLAConfig"),
    ({"mla": MLA, "qk_norm": True}, r"model\.qk_norm does not apply to multi-head latent attention.*True"),
    ({"mla": MLA, "qkv_bias": True}, r"model\.qkv_bias does not apply"),
    ({"n_layers": 2, "moe": MoEConfig(n_experts=4, first_dense_layers=2)},
     r"model\.moe\.first_dense_layers \(2\) must be less than model\.n_layers \(2\)"),
])
def test_model_config_refuses_bad_mla_and_moe_shapes(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**changes)


@pytest.mark.parametrize("changes, pattern", [
    ({"d_ff": -1}, r"model\.moe\.d_ff must be a non-negative integer, got -1"),
    ({"first_dense_layers": -2}, r"model\.moe\.first_dense_layers must be a non-negative integer, got -2"),
])
def test_moe_shape_errors_name_field_and_value(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(n_experts=4, **changes)


def test_expert_d_ff_defaults_to_model_d_ff():
    assert MoEConfig(n_experts=4).expert_d_ff(96) == 96
    assert MoEConfig(n_experts=4, d_ff=32).expert_d_ff(96) == 32


def test_mla_config_round_trips_through_json():
    cfg = ModelConfig(mla=MLA, moe=MoEConfig(n_experts=4, d_ff=32, first_dense_layers=1))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown model\.mla config keys \['rank'\]"):
        ModelConfig.from_dict({"mla": {"rank": 4}})


def test_set_overrides_reach_mla_and_moe_fields():
    run = RunConfig(model=get_preset("tiny"), train=TrainConfig(seq_len=32))
    out = apply_overrides(run, ["model.mla.kv_lora_rank=16", "model.mla.qk_rope_head_dim=8",
                                "model.moe.n_experts=4", "model.moe.d_ff=32", "model.moe.first_dense_layers=1"])
    assert out.model.mla == MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8)
    assert (out.model.moe.d_ff, out.model.moe.first_dense_layers) == (32, 1)
    with pytest.raises(ValueError, match=r"model\.mla\.qk_rope_head_dim must be even.*got 5"):
        apply_overrides(run, ["model.mla.qk_rope_head_dim=5"])
