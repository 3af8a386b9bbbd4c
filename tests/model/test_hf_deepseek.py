"""model/hf.py's DeepSeek-V3 (model/hf_deepseek.py) against transformers' DeepseekV3ForCausalLM: a checkpoint loads
into meshlm with the same logits (multi-head latent attention with and without a query LoRA, interleaved and
half-split rotary rows, a dense first layer, sigmoid group-limited routing with a selection bias, shared experts),
save_hf writes one transformers loads with the same logits and load_hf reads back exactly, and both instantiate
the same number of parameters, DeepSeek-V3's published config included.

Tolerance as tests/model/hf_reference.py: float32 on both sides, 1e-5 relative and 1e-5 of the largest logit (the
issue asks 1e-4 relative). The router's choices are discrete; with these random weights no two experts' scores
come within float32 rounding of each other, so both sides pick the same experts (a wrong bias, group or rotary
order moves the logits by O(max)).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.hf import config_from_hf, hf_config_from, load_hf, save_hf
from model.transformer import Transformer
from tests.model.hf_reference import assert_logits_close, perturbed, torch_logits
from tests.model.test_hf_moe import _param_count

VOCAB = 300
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 20))
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
             routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
             qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
             max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
VARIANTS = {"q-lora": {}, "full-rank-q": {"q_lora_rank": None}, "half-split-rope": {"rope_interleave": False}}


def _hf_config(**changes):
    transformers = pytest.importorskip("transformers")
    return transformers.DeepseekV3Config(**(SMALL | changes), attn_implementation="eager",
                                         experts_implementation="eager")


def _hf_model(seed: int = 0, **changes):
    """A small random DeepseekV3ForCausalLM with every weight perturbed, and each router's selection bias (a
    buffer, not a parameter) set to N(0, 0.1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = perturbed(transformers.DeepseekV3ForCausalLM(_hf_config(**changes)).eval())
    with torch.no_grad():
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.1 * torch.randn_like(bias))
    return model


def assert_served_as_transformers_generates(hf_model, directory, prompts, new_tokens, max_running):
    """`hf_model` saved to `directory`, loaded with load_hf and served by the engine (latent paged cache, absorbed
    MLA, reference decode) in one batch: `new_tokens` greedy tokens a prompt, those of transformers' `generate`."""
    torch = pytest.importorskip("torch")
    from serve.engine import Engine, Request, ServeConfig  # noqa: PLC0415

    hf_model.save_pretrained(directory)
    model = load_hf(directory, dtype="float32")
    engine = Engine(model, ServeConfig(page_size=4, max_running=max_running, token_budget=16, decode_impl="reference"))
    served = engine.generate([Request(tuple(p), new_tokens) for p in prompts])
    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert [c.token_ids for c in served] == expected


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_load_hf_deepseek_matches_transformers(tmp_path, changes):
    hf_model = _hf_model(**changes)
    hf_model.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype="float32")
    cfg = model.cfg
    assert cfg.mla == MLAConfig(kv_lora_rank=16, q_lora_rank=32 if "q_lora_rank" not in changes else 0,
                                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    assert (cfg.d_ff, cfg.moe.d_ff, cfg.moe.first_dense_layers, cfg.moe.router) == (96, 32, 1, "sigmoid")
    bias = hf_model.model.layers[2].mlp.gate.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(np.asarray(model.blocks.mlp.expert_bias[...][1]), bias)
    assert_logits_close(np.asarray(model(jnp.asarray(TOKENS))), torch_logits(hf_model, TOKENS))


@pytest.mark.parametrize("changes", [VARIANTS["q-lora"], VARIANTS["full-rank-q"]], ids=["q-lora", "full-rank-q"])
def test_save_hf_deepseek_loads_in_transformers_and_round_trips(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    hf_model = _hf_model(seed=1, **changes)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf", dtype="float32")
    save_hf(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["rope_interleave"] is True
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                                 experts_implementation="eager").eval()
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    assert_logits_close(torch_logits(exported, TOKENS), torch_logits(hf_model, TOKENS))
    assert sum(p.numel() for p in exported.parameters()) == _param_count(model)
    loaded = load_hf(tmp_path / "ours", dtype="float32")  # and back, exactly
    assert loaded.cfg == model.cfg
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded)),
                                 strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"first_k_dense_replace": 3}],
                         ids=["q-lora", "full-rank-q", "all-dense"])
def test_param_count_equals_transformers(changes):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = _hf_config(**changes)
    with torch.device("meta"):
        hf_model = transformers.DeepseekV3ForCausalLM(config)
    cfg = config_from_hf(config.to_dict())
    assert _param_count(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))) == sum(
        p.numel() for p in hf_model.parameters())


# deepseek-ai/DeepSeek-V3's config.json (the fields that matter here) without its YaRN rope_scaling (factor 40),
# which changes no parameter count (DEEPSEEK_V3_YARN below). transformers counts no multi-token-prediction layer.
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
               "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
               "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
               "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
               "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "scoring_func": "sigmoid",
               "topk_method": "noaux_tc", "attention_bias": False}


def test_param_count_of_deepseek_v3():
    """671B without the multi-token-prediction layer (the model card's 685B has it); shapes only on both sides."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**DEEPSEEK_V3)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    cfg = config_from_hf(DEEPSEEK_V3)
    assert _param_count(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))) == hf_count
    assert round(hf_count / 1e9) == 671


def test_deepseek_config_round_trip():
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=96,
                      norm_eps=1e-6, tie_embeddings=False,
                      mla=MLAConfig(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                    v_head_dim=16),
                      moe=MoEConfig(n_experts=8, top_k=2, dispatch="dropless", aux_loss_weight=0.0, z_loss_weight=0.0,
                                    router="sigmoid", n_shared_experts=1, n_group=2, topk_group=1,
                                    routed_scaling_factor=2.5, d_ff=32, first_dense_layers=1))
    hf_config = hf_config_from(cfg)
    assert (hf_config["model_type"], hf_config["first_k_dense_replace"], hf_config["q_lora_rank"]) == (
        "deepseek_v3", 1, 32)
    assert config_from_hf(hf_config) == cfg
    dense = cfg.replace(moe=MoEConfig(), mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8))
    assert hf_config_from(dense)["first_k_dense_replace"] == 3 and hf_config_from(dense)["q_lora_rank"] is None
    assert config_from_hf(hf_config_from(dense)) == dense


def test_load_hf_skips_multi_token_prediction_layers(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    hf_model = _hf_model(first_k_dense_replace=3)  # all dense: a small checkpoint
    hf_model.save_pretrained(tmp_path)
    tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((64, 128), np.float32)  # the MTP layer's projection
    safetensors_numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_logits_close(np.asarray(load_hf(tmp_path, dtype="float32")(jnp.asarray(TOKENS))),
                        torch_logits(hf_model, TOKENS))


BASE = {k: v for k, v in DEEPSEEK_V3.items()} | {"num_hidden_layers": 4}


@pytest.mark.parametrize("changes,match", [
    ({"rope_scaling": {"type": "dynamic", "factor": 40}}, "rope_scaling has rope_type 'dynamic'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config \\(quant_method 'fp8'\\)"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"topk_method": "greedy"}, "topk_method='greedy'"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok=1 with norm_topk_prob=true"),
    ({"n_routed_experts": 8}, "n_group=8 with n_routed_experts=8"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"kv_lora_rank": None}, "'kv_lora_rank'"),
], ids=lambda v: str(v)[:30])
def test_deepseek_config_from_hf_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(BASE | changes)


def test_save_hf_refuses_mla_with_a_softmax_router(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, mla=MLAConfig(kv_lora_rank=8),
                      moe=MoEConfig(n_experts=4))
    with pytest.raises(ValueError, match="model.moe.router='softmax' is not supported"):
        save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("moe,match", [
    (MoEConfig(n_experts=4, first_dense_layers=1), r"model.moe.first_dense_layers=1 is not supported"),
    (MoEConfig(n_experts=4, d_ff=16), r"model.moe.d_ff=16 is not supported"),
], ids=["first-dense-layers", "expert-d-ff"])
def test_save_hf_refuses_deepseek_moe_shapes_without_mla(tmp_path, moe, match):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, moe=moe)
    with pytest.raises(ValueError, match=match):
        save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path / "out")


@pytest.mark.slow
def test_a_deepseek_v3_checkpoint_is_served_as_transformers_generates(tmp_path):
    """End to end: a DeepseekV3ForCausalLM checkpoint loaded and served by the engine (latent paged cache, absorbed
    MLA, dense first layer, sigmoid group-limited routing), prompts of several pages decoded in one batch, gives
    transformers' own greedy `generate` tokens."""
    prompts = [TOKENS[0].tolist(), TOKENS[1, :7].tolist(), TOKENS[1, 3:].tolist()]
    assert_served_as_transformers_generates(_hf_model(seed=2), tmp_path, prompts, new_tokens=12, max_running=4)


# YaRN as DeepSeek-V3's config.json has it, over a context (16) shorter than TOKENS (20) so that the ramp, the
# tables' attention factor (mscale != mscale_all_dim) and MLA's mscale(factor, mscale_all_dim)^2 all act.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}
DEEPSEEK_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_deepseek_v3_published_config_with_yarn_loads():
    from model.config import RopeScaling  # noqa: PLC0415

    cfg = config_from_hf(DEEPSEEK_V3 | {"rope_scaling": DEEPSEEK_V3_YARN})
    assert cfg.rope_scaling == RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert cfg.replace(rope_scaling=RopeScaling()) == config_from_hf(DEEPSEEK_V3)
    assert hf_config_from(cfg)["rope_scaling"] == {"rope_type": "yarn"} | {
        k: v for k, v in DEEPSEEK_V3_YARN.items() if k != "type"}


@pytest.mark.parametrize("yarn", [YARN, YARN | {"mscale_all_dim": 1.0}], ids=["mscale-0.8", "mscale-1"])
def test_load_hf_deepseek_with_yarn_matches_transformers_and_round_trips(tmp_path, yarn):
    """Logits equal transformers' with YaRN, and save_hf -> transformers keeps them (and load_hf reads back the
    same config)."""
    from model.config import RopeScaling  # noqa: PLC0415

    transformers = pytest.importorskip("transformers")
    hf_model = _hf_model(seed=3, rope_scaling=dict(yarn))
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf", dtype="float32")
    assert model.cfg.rope_scaling == RopeScaling("yarn", 4.0, 16, 32.0, 1.0, 1.0, yarn["mscale_all_dim"])
    expected = torch_logits(hf_model, TOKENS)
    assert_logits_close(np.asarray(model(jnp.asarray(TOKENS))), expected)
    save_hf(model, tmp_path / "ours")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                                 experts_implementation="eager").eval()
    assert exported.config.rope_parameters["rope_type"] == "yarn"
    assert_logits_close(torch_logits(exported, TOKENS), expected)
    assert load_hf(tmp_path / "ours", dtype="float32").cfg == model.cfg


def test_deepseek_yarn_logits_need_mla_mscale_squared(tmp_path, monkeypatch):
    """With DeepSeek-V3's mscale == mscale_all_dim the tables' attention factor is 1 and YaRN's magnitude
    correction is all in MLA's softmax scale: without mscale(factor, mscale_all_dim)^2 (RopeScaling.softmax_factor
    patched to 1) the logits are far from transformers'."""
    from model.config import RopeScaling  # noqa: PLC0415

    hf_model = _hf_model(seed=4, rope_scaling=YARN | {"mscale_all_dim": 1.0})
    hf_model.save_pretrained(tmp_path)
    expected = torch_logits(hf_model, TOKENS)
    model = load_hf(tmp_path, dtype="float32")
    assert model.cfg.rope_scaling.attention_factor == 1.0 and model.cfg.rope_scaling.softmax_factor > 1.2
    assert_logits_close(np.asarray(model(jnp.asarray(TOKENS))), expected)
    monkeypatch.setattr(RopeScaling, "softmax_factor", property(lambda self: 1.0))
    without = np.asarray(load_hf(tmp_path, dtype="float32")(jnp.asarray(TOKENS)))
    assert np.abs(without - expected).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.slow
def test_a_deepseek_v3_checkpoint_with_yarn_is_served_as_transformers_generates(tmp_path):
    """The serving step (absorbed MLA over the latent cache) takes the scaled tables and the softmax scale's
    mscale^2: greedy tokens past the original context equal transformers' `generate`."""
    prompts = [TOKENS[0].tolist(), TOKENS[1, :13].tolist()]
    assert_served_as_transformers_generates(_hf_model(seed=5, rope_scaling=dict(YARN)), tmp_path, prompts,
                                            new_tokens=8, max_running=2)
