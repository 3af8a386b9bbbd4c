"""YaRN-scaled RoPE (model/config.py `RopeScaling`, model/layers.py `rope_inv_freq` / `rope_tables`, MLA's softmax
factor, model/hf_rope.py) against transformers: `_compute_yarn_parameters`' inverse frequencies and attention factor,
DeepseekV3Attention's mscale^2, and a small LlamaForCausalLM with YaRN loading with transformers' logits (a
Llama-style model takes only the tables' attention factor). DeepSeek-V3's logits: tests/model/test_hf_deepseek.py.

Tolerances: frequencies and tables float32 on both sides, same operation order: 1e-6 relative; logits as
tests/model/hf_reference.py.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, RopeScaling
from model.hf import config_from_hf, hf_config_from, load_hf, save_hf
from model.hf_rope import rope_from_hf, rope_to_hf
from model.layers import rope_inv_freq, rope_tables
from model.mla import softmax_scale
from tests.model.hf_reference import assert_logits_close, perturbed, torch_logits
from train.config import RunConfig, TrainConfig, apply_overrides

DEEPSEEK_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# (head_dim, theta, RopeScaling): DeepSeek-V3's, Qwen-style (no mscale), truncate off, mscale != mscale_all_dim
CASES = {
    "deepseek-v3": (64, 10000.0, RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)),
    "qwen": (128, 1e6, RopeScaling("yarn", 4.0, 32768)),
    "no-truncate": (64, 10000.0, RopeScaling("yarn", 8.0, 2048, 16.0, 2.0, truncate=False)),
    "mscale": (32, 500.0, RopeScaling("yarn", 16.0, 64, 32.0, 1.0, 0.707, 1.0)),
}


def _hf_rope_parameters(s: RopeScaling, theta: float) -> dict:
    return rope_to_hf(ModelConfig(rope_theta=theta, rope_scaling=s))["rope_parameters"]


@pytest.mark.parametrize("head_dim,theta,scaling", CASES.values(), ids=CASES.keys())
def test_yarn_frequencies_and_attention_factor_equal_transformers(head_dim, theta, scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters  # noqa: PLC0415

    context = int(scaling.factor * scaling.original_max_position_embeddings)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=context,
                                      rope_parameters=_hf_rope_parameters(scaling, theta))
    inv_freq, attention_factor = _compute_yarn_parameters(config)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(head_dim, theta, scaling)), inv_freq.numpy(), rtol=1e-6)
    assert scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    assert not np.allclose(np.asarray(rope_inv_freq(head_dim, theta)), inv_freq.numpy())  # the scaling matters
    positions = jnp.broadcast_to(jnp.arange(50), (2, 50))
    cos, sin = rope_tables(positions, head_dim, theta, scaling)
    angles = np.arange(50, dtype=np.float32)[:, None] * inv_freq.numpy()[None]  # float32, as ours
    np.testing.assert_allclose(np.asarray(cos[1]), np.cos(angles) * attention_factor, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[1]), np.sin(angles) * attention_factor, rtol=1e-5, atol=1e-6)


def test_unscaled_tables_unchanged():
    positions = jnp.broadcast_to(jnp.arange(9), (1, 9))
    plain = rope_tables(positions, 16, 1e4)
    for a, b in zip(plain, rope_tables(positions, 16, 1e4, RopeScaling()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(plain[0][0]), np.cos(np.arange(9)[:, None] * 1e4 ** (-np.arange(0, 16, 2)
                                                                                                 / 16)), atol=1e-6)


@pytest.mark.parametrize("mscale_all_dim", [0.0, 1.0, 0.7])
def test_mla_softmax_scale_equals_deepseek_v3_attention(mscale_all_dim):
    """DeepseekV3Attention's scaling: qk_head_dim^-0.5 x mscale(factor, mscale_all_dim)^2 when mscale_all_dim is
    set; meshlm's `softmax_scale` (serving) and the training path's factor take the same."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale  # noqa: PLC0415

    from model.config import MLAConfig  # noqa: PLC0415

    scaling = RopeScaling("yarn", 40.0, 4096, mscale=1.0, mscale_all_dim=mscale_all_dim)
    cfg = ModelConfig(mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=128, qk_rope_head_dim=64),
                      rope_scaling=scaling)
    expected = yarn_apply_mscale({"rope_type": "yarn", "factor": 40.0, "mscale_all_dim": mscale_all_dim},
                                 192 ** -0.5)
    assert softmax_scale(cfg) == pytest.approx(expected, rel=1e-12)
    assert (scaling.softmax_factor == 1.0) == (not mscale_all_dim)
    assert RopeScaling(factor=40.0, mscale_all_dim=1.0).softmax_factor == 1.0  # kind "none": no factor at all


def test_deepseek_v3_rope_scaling_parses():
    theta, scaling = rope_from_hf({"rope_theta": 10000, "max_position_embeddings": 163840,
                                   "rope_scaling": DEEPSEEK_V3_YARN})
    assert (theta, scaling) == (10000.0, RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0))
    assert scaling.attention_factor == 1.0  # mscale == mscale_all_dim: all of it goes to the softmax scale
    assert scaling.softmax_factor == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    v5 = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                              "original_max_position_embeddings": 32768}}
    assert rope_from_hf(v5) == (1e6, RopeScaling("yarn", 4.0, 32768))
    # transformers' defaults: factor = max_position_embeddings / original; original = max_position_embeddings
    derived = rope_from_hf({"max_position_embeddings": 8192, "original_max_position_embeddings": 2048,
                            "rope_scaling": {"type": "yarn", "beta_fast": None}})[1]
    assert (derived.factor, derived.original_max_position_embeddings, derived.beta_fast) == (4.0, 2048, 32.0)
    both = {"rope_scaling": DEEPSEEK_V3_YARN, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            "max_position_embeddings": 163840}
    assert rope_from_hf(both)[1] == scaling


@pytest.mark.parametrize("scaling", CASES["deepseek-v3"][2:] + (RopeScaling("yarn", 2.0, 16, truncate=False),
                                                                 RopeScaling()))
def test_rope_scaling_hf_round_trip(scaling):
    cfg = ModelConfig(rope_theta=5e5, rope_scaling=scaling)
    hf = rope_to_hf(cfg)
    assert rope_from_hf(hf) == (5e5, scaling)
    assert rope_from_hf({"rope_parameters": hf["rope_parameters"]}) == (5e5, scaling)  # transformers 5 alone
    assert ("rope_scaling" in hf) == scaling.enabled


@pytest.mark.parametrize("rope,match", [
    ({"type": "dynamic", "factor": 2.0}, "rope_scaling has rope_type 'dynamic'"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope_scaling has rope_type 'longrope'"),
    ({"type": "yarn", "factor": 0, "original_max_position_embeddings": 16}, "model.rope_scaling.factor .*got 0"),
    ({"type": "yarn", "factor": -2.0, "original_max_position_embeddings": 16}, "factor .*got -2.0"),
    ({"type": "yarn", "factor": 4.0, "attention_factor": 1.2}, "attention_factor 1.2"),
    ({"type": "yarn", "factor": 4.0, "extrapolation_factor": 1.0}, r"keys \['extrapolation_factor'\]"),
    ({"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"type": "yarn", "factor": 4.0, "truncate": "no"}, "model.rope_scaling.truncate must be true or false"),
    ("yarn", "rope_scaling must be a dict or null"),
], ids=lambda v: str(v)[:40])
def test_hf_rope_refusals_name_the_value(rope, match):
    with pytest.raises(ValueError, match=match):
        rope_from_hf({"max_position_embeddings": 64, "rope_scaling": rope})


def test_hf_rope_parameters_disagreeing_with_rope_scaling_refused():
    with pytest.raises(ValueError, match="rope_scaling and rope_parameters disagree"):
        rope_from_hf({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                      "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}})


@pytest.mark.parametrize("changes,match", [
    ({"factor": 0.0}, r"model.rope_scaling.factor must be a positive number, got 0.0"),
    ({"factor": -1.0}, r"model.rope_scaling.factor must be a positive number, got -1.0"),
    ({"kind": "linear"}, r"model.rope_scaling.kind must be one of \('none', 'yarn'\), got 'linear'"),
    ({"kind": "llama3"}, r"model.rope_scaling.kind must be one of .* got 'llama3'"),
    ({"original_max_position_embeddings": 0}, "model.rope_scaling.original_max_position_embeddings"),
    ({"beta_fast": 0.0}, "model.rope_scaling.beta_fast must be a positive number, got 0.0"),
    ({"mscale_all_dim": -1.0}, "model.rope_scaling.mscale_all_dim must be a non-negative number, got -1.0"),
], ids=lambda v: str(v)[:40])
def test_rope_scaling_refuses_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**{"kind": "yarn"} | changes)


def test_model_config_nests_rope_scaling():
    with pytest.raises(ValueError, match="model.rope_scaling must be a RopeScaling, got"):
        ModelConfig(rope_scaling={"kind": "yarn"})
    cfg = ModelConfig(rope_scaling=RopeScaling("yarn", 4.0, 64, mscale_all_dim=1.0))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as a run's config.json
    with pytest.raises(ValueError, match=r"unknown model.rope_scaling config keys \['type'\]"):
        ModelConfig.from_dict({"rope_scaling": {"type": "yarn"}})
    base = RunConfig(model=ModelConfig(), train=TrainConfig(seq_len=64))
    run = apply_overrides(base, ["model.rope_scaling.factor=40", "model.rope_scaling.kind=yarn",
                                        "model.rope_scaling.original_max_position_embeddings=4096"])
    assert run.model.rope_scaling == RopeScaling("yarn", 40.0, 4096)
    with pytest.raises(ValueError, match="model.rope_scaling.factor must be a positive number, got 0.0"):
        apply_overrides(base, ["model.rope_scaling.factor=0"])


def test_estimate_reads_deepseek_v3_config_with_yarn(tmp_path):
    """scripts/estimate.py --hf-config on DeepSeek-V3's published config (transformers' defaults plus its YaRN
    block) parses."""
    transformers = pytest.importorskip("transformers")
    from scripts.estimate import load_model_config, parse_args  # noqa: PLC0415

    hf = transformers.DeepseekV3Config().to_dict() | {"rope_scaling": DEEPSEEK_V3_YARN}
    hf.pop("rope_parameters", None)  # as the Hub's config.json, written by transformers 4
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_model_config(parse_args(["--hf-config", str(tmp_path / "config.json")]))
    assert cfg.rope_scaling == RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0) and cfg.mla.enabled


def test_llama_with_yarn_loads_and_saves_with_transformers_logits(tmp_path):
    """A Llama-style model with YaRN (original context 8 < the 20 test tokens, so the ramp and factor act): only
    the tables' attention factor applies (no mscale^2 outside MLA); save_hf's config gives transformers the
    same model back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, attn_implementation="eager",
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 8})
    torch.manual_seed(0)
    hf_model = perturbed(transformers.LlamaForCausalLM(config).eval())
    hf_model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 20))
    model = load_hf(tmp_path / "hf", dtype="float32")
    assert model.cfg.rope_scaling == RopeScaling("yarn", 4.0, 8) and model.cfg.rope_scaling.attention_factor > 1
    assert_logits_close(np.asarray(model(jnp.asarray(tokens))), torch_logits(hf_model, tokens))
    save_hf(model, tmp_path / "ours")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert_logits_close(torch_logits(exported.eval(), tokens), torch_logits(hf_model, tokens))
    assert config_from_hf(hf_config_from(model.cfg)).rope_scaling == model.cfg.rope_scaling
