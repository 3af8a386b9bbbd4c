"""scaling.accounting for DeepSeek-V3's multi-head latent attention and DeepSeekMoE (expert hidden size, dense
first layers, shared experts) against transformers' DeepseekV3ForCausalLM, instantiated on the meta device
(shapes only, no memory): parameter counts equal to the parameter, for the published 671B config and small
random ones, and the weights a token multiplies by equal to transformers' matrices with the routed experts
counted top_k / E. KV-cache, FLOP and all-to-all figures against hand arithmetic.

transformers' model (like meshlm) has no multi-token-prediction module, so every count here leaves out
DeepSeek-V3's 14B of MTP weights (its release is 685B).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import MLAConfig, ModelConfig, MoEConfig
from scaling.accounting import (
    Layout,
    comm_bytes,
    expert_all_to_all_bytes,
    expert_params,
    flops_per_token,
    kv_cache_bytes,
    layer_params,
    matmul_params,
    moe_layers,
    param_count,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DEEPSEEK_V3_TOTAL = 671_026_404_352  # transformers' DeepseekV3ForCausalLM(DeepseekV3Config()), no MTP


def from_hf(hf) -> ModelConfig:
    """The ModelConfig of a transformers DeepseekV3Config, field by field (independent of model/hf.py)."""
    return ModelConfig(
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_attention_heads, head_dim=hf.qk_rope_head_dim,
        d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, tie_embeddings=hf.tie_word_embeddings,
        mla=MLAConfig(kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank or 0,
                      qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                      v_head_dim=hf.v_head_dim),
        moe=MoEConfig(n_experts=hf.n_routed_experts, top_k=hf.num_experts_per_tok, dispatch="dropless",
                      router="sigmoid", n_shared_experts=hf.n_shared_experts, n_group=hf.n_group,
                      topk_group=hf.topk_group, routed_scaling_factor=hf.routed_scaling_factor,
                      d_ff=hf.moe_intermediate_size, first_dense_layers=hf.first_k_dense_replace))


def meta_model(hf):
    with torch.device("meta"):
        return transformers.DeepseekV3ForCausalLM(hf)


def hf_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once; the routers' selection bias is a buffer


def hf_matmul_params(model, hf) -> float:
    """The weights a token multiplies by, read off transformers' module: every matrix but the input embedding
    (the LM head included), the routed experts' [E, ...] tensors counted top_k / E."""
    total = 0.0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.ndim < 2 or name.endswith("embed_tokens.weight"):
            continue  # norm scales; the embedding is a lookup
        share = hf.num_experts_per_tok / hf.n_routed_experts if ".mlp.experts." in name else 1
        total += p.numel() * share
    return total


def small_configs(n: int = 6) -> list[dict]:
    """Small DeepseekV3Config fields, drawn at random (seeded), with and without q_lora_rank and dense first
    layers, tied and untied, with 0-2 shared experts."""
    rng = np.random.default_rng(21)
    out = []
    for i in range(n):
        experts = int(rng.choice([4, 8, 16]))
        layers = int(rng.integers(2, 6))
        out.append(dict(
            vocab_size=int(rng.integers(50, 300)), hidden_size=int(rng.choice([32, 48, 64])),
            num_hidden_layers=layers, first_k_dense_replace=int(rng.integers(0, layers)),
            num_attention_heads=int(rng.choice([2, 4, 6])), intermediate_size=int(rng.integers(20, 100)),
            moe_intermediate_size=int(rng.integers(8, 40)), n_routed_experts=experts,
            num_experts_per_tok=int(rng.integers(1, 3)), n_group=1, topk_group=1,
            n_shared_experts=int(rng.integers(0, 3)), kv_lora_rank=int(rng.choice([16, 24, 32])),
            q_lora_rank=None if i % 2 else int(rng.choice([12, 20])), qk_nope_head_dim=int(rng.choice([8, 16])),
            qk_rope_head_dim=int(rng.choice([4, 8])), v_head_dim=int(rng.choice([8, 12, 16])),
            tie_word_embeddings=bool(i % 3 == 2), max_position_embeddings=128))
    return out


# --- parameters ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deepseek_v3():
    """(config, meta-device model) of DeepSeek-V3: transformers' DeepseekV3Config defaults are its published
    config."""
    hf = transformers.DeepseekV3Config()
    return hf, meta_model(hf)


def test_deepseek_v3_param_count_equals_transformers(deepseek_v3):
    hf, model = deepseek_v3
    assert (hf.hidden_size, hf.num_hidden_layers, hf.first_k_dense_replace, hf.n_routed_experts,
            hf.num_experts_per_tok, hf.q_lora_rank, hf.kv_lora_rank, hf.vocab_size) == (
                7168, 61, 3, 256, 8, 1536, 512, 129280)
    cfg = from_hf(hf)
    counts = param_count(cfg)
    assert counts["total"] == hf_param_count(model) == DEEPSEEK_V3_TOTAL
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert counts["embedding"] == 2 * 129280 * 7168  # untied
    # 58 MoE blocks of 256 routed experts of 3 * 7168 * 2048; 248 of 256 idle per token.
    assert moe_layers(cfg) == 58 and expert_params(cfg) == 58 * 256 * 3 * 7168 * 2048
    assert counts["total"] - counts["active"] == expert_params(cfg) * 248 // 256
    assert 37e9 <= counts["active"] <= 38e9  # published: 37B activated (DeepSeek-V3 report, without MTP)
    assert counts["active"] == DEEPSEEK_V3_TOTAL - 58 * 248 * 3 * 7168 * 2048 == 37_552_282_624


def test_deepseek_v3_attention_by_hand(deepseek_v3):
    """One MLA block of DeepSeek-V3, projection by projection, against transformers' own modules."""
    hf, model = deepseek_v3
    by_hand = {"q_a_proj": 7168 * 1536, "q_a_layernorm": 1536, "q_b_proj": 1536 * 128 * 192,
               "kv_a_proj_with_mqa": 7168 * (512 + 64), "kv_a_layernorm": 512, "kv_b_proj": 512 * 128 * (128 + 128),
               "o_proj": 128 * 128 * 7168}
    assert {name: sum(p.numel() for p in module.parameters())
            for name, module in model.model.layers[0].self_attn.named_children()} == by_hand
    block = layer_params(from_hf(hf), dense=True)
    assert block["attention"] + block["norms"] == sum(by_hand.values()) + 2 * 7168  # + the block's two norms
    assert block["mlp"] == 3 * 7168 * 18432


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # no shared experts: a 0-wide MLP
@pytest.mark.parametrize("fields", small_configs(), ids=lambda f: (
    f"L{f['num_hidden_layers']}-dense{f['first_k_dense_replace']}-qlora{f['q_lora_rank']}"
    f"-shared{f['n_shared_experts']}{'-tied' if f['tie_word_embeddings'] else ''}"))
def test_small_param_counts_equal_transformers(fields):
    hf = transformers.DeepseekV3Config(**fields)
    model = meta_model(hf)
    cfg = from_hf(hf)
    counts = param_count(cfg)
    assert counts["total"] == hf_param_count(model)
    assert matmul_params(cfg) == hf_matmul_params(model, hf)


def test_deepseek_v3_matmul_params_equal_transformers_matrices(deepseek_v3):
    hf, model = deepseek_v3
    assert matmul_params(from_hf(hf)) == hf_matmul_params(model, hf)


def test_dense_first_layers_and_expert_hidden_size_by_hand():
    h, f, fe, e = 32, 40, 8, 4
    base = ModelConfig(vocab_size=100, d_model=h, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=f)
    moe = base.replace(moe=MoEConfig(n_experts=e, top_k=1, d_ff=fe, n_shared_experts=2, first_dense_layers=1))
    # one dense block keeps 3*h*f; two MoE blocks: 4 experts of 3*h*fe, the router h*E, shared 3*h*(2*fe)
    delta = 2 * (e * 3 * h * fe + h * e + 3 * h * 2 * fe - 3 * h * f)
    assert param_count(moe)["total"] - param_count(base)["total"] == delta
    assert expert_params(moe) == 2 * e * 3 * h * fe
    assert param_count(moe)["total"] - param_count(moe)["active"] == 2 * 3 * 3 * h * fe
    assert matmul_params(moe) - matmul_params(base) == 2 * (3 * h * fe + h * e + 3 * h * 2 * fe - 3 * h * f)


# --- FLOPs ---------------------------------------------------------------------------------------------------

def test_deepseek_v3_flops_by_hand():
    cfg = from_hf(transformers.DeepseekV3Config())
    attention = 2 * 61 * 4096 * 128 * (192 + 128)  # QK^T over 192 dims, PV over 128, per query token
    forward = 2 * matmul_params(cfg) + attention
    assert flops_per_token(cfg, 4096, training=False) == forward
    assert flops_per_token(cfg, 4096) == 3 * forward
    assert flops_per_token(cfg, 4096, causal_halved=True, training=False) == 2 * matmul_params(cfg) + attention / 2
    # about 2 * 37.6B active minus the input embedding: DeepSeek-V3's forward is ~73 GFLOPs per token + attention
    assert 2 * matmul_params(cfg) == 2 * (param_count(cfg)["active"] - 129280 * 7168 - 61 * (2 * 7168 + 1536 + 512)
                                          - 7168)


# --- KV cache ------------------------------------------------------------------------------------------------

def test_deepseek_v3_kv_cache_is_the_latent():
    cfg = from_hf(transformers.DeepseekV3Config())
    assert kv_cache_bytes(cfg, 1) == 61 * (512 + 64) * 2 == 70_272
    assert kv_cache_bytes(cfg, 4096, "float32") == 61 * (512 + 64) * 4 * 4096
    # the same heads as GQA (128 KV heads of 192/128 dims) would cache 2 * 61 * 128 * 160 * 2 per token
    assert kv_cache_bytes(cfg.replace(mla=MLAConfig()), 1) == 2 * 61 * 128 * cfg.head_dim * 2


# --- all-to-all ----------------------------------------------------------------------------------------------

def test_deepseek_v3_all_to_all_by_hand():
    cfg = from_hf(transformers.DeepseekV3Config())
    # one MoE layer, forward: dispatch + combine of each token's 8 copies of 7168 bf16 numbers, 63/64 leave
    assert expert_all_to_all_bytes(cfg, 64, 1, 4096) == 2 * 63 / 64 * 8 * 7168 * 2 == 225_792
    assert expert_all_to_all_bytes(cfg, 1, 1, 4096) == 0
    # a training step: 58 MoE layers (not the 3 dense ones), forward and backward
    out = comm_bytes(cfg, Layout(expert=64), micro_batch=1, seq_len=4096)
    assert out["expert"] == 58 * 2 * 4096 * 225_792
    capacity = cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch="capacity"))
    slots = 256 * capacity.moe.capacity(4096)  # padded slots per sequence: 1.25 * 8 * 4096 = 40960
    assert expert_all_to_all_bytes(capacity, 64, 4096, 4096) == 2 * 63 / 64 * slots * 7168 * 2
    with pytest.raises(ValueError, match="expert"):
        expert_all_to_all_bytes(cfg, 0, 1, 4096)
    with pytest.raises(ValueError, match=r"layout.expert \(3\)"):
        comm_bytes(cfg, Layout(expert=3), 1, 4096)


# --- meshlm's own model --------------------------------------------------------------------------------------

MESHLM_CASES = {  # small MLA + DeepSeekMoE configs that meshlm builds
    "q_lora-dense1-shared2": dict(mla=MLAConfig(kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=16,
                                                qk_rope_head_dim=8, v_head_dim=12),
                                  moe=MoEConfig(n_experts=4, top_k=2, d_ff=24, n_shared_experts=2,
                                                first_dense_layers=1, router="sigmoid")),
    "full_q-dense0": dict(mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
                          moe=MoEConfig(n_experts=4, top_k=1, d_ff=16, dispatch="dropless")),
    "dense-mla": dict(mla=MLAConfig(kv_lora_rank=32, q_lora_rank=16), tie_embeddings=False),
    "dense-mla-full_q": dict(mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                           v_head_dim=32)),
}


def small_meshlm(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=120, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=96,
                       max_seq_len=64, attention_impl="reference", **MESHLM_CASES[name])


@pytest.mark.parametrize("name", sorted(MESHLM_CASES))
def test_param_count_equals_meshlm_model(name):
    from flax import nnx

    from model.transformer import create_model

    cfg = small_meshlm(name)
    abstract = nnx.eval_shape(lambda: create_model(cfg))
    assert param_count(cfg)["total"] == sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", ["dense-mla", "dense-mla-full_q"])
def test_forward_flops_match_xla(name, monkeypatch):
    """XLA's count of meshlm's MLA forward, within [1.00, 1.05] x the analytic one, as test_accounting's
    dense models (the excess is elementwise work: softmax, norms, RoPE, SiLU). model/mla.py pads the shorter
    of d_qk and d_v to the longer; those extra FLOPs are added to the analytic side here (observed, jax CPU,
    2 x 64 tokens: dense-mla 1.016, dense-mla-full_q 1.028). MoE MLPs are left
    out: XLA counts capacity dispatch's one-hot einsums and every expert of a ragged_dot (1.4x here), which
    are not model FLOPs."""
    from flax import nnx

    from model.transformer import create_model

    monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))  # XLA counts a loop once
    cfg = small_meshlm(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))
    batch, seq_len = 2, 64
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, tokens).compile().cost_analysis()
    measured = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    qk, v = cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    padding = 2 * cfg.n_layers * seq_len * cfg.n_heads * (2 * max(qk, v) - qk - v)
    analytic = (flops_per_token(cfg, seq_len, training=False) + padding) * batch * seq_len
    assert 1.0 <= measured / analytic <= 1.05, measured / analytic


# --- scripts/estimate.py -------------------------------------------------------------------------------------

def test_estimate_cli_on_deepseek_v3_config_json(tmp_path, capsys):
    from scripts.estimate import main

    path = tmp_path / "config.json"
    transformers.DeepseekV3Config().to_json_file(str(path))  # DeepSeek-V3's published config.json fields
    assert main(["--hf-config", str(path), "--layout", "expert=64"]) == 0
    out = capsys.readouterr().out
    assert "MLA 128 heads x qk 128+64, v 128, kv_lora 512, q_lora 1536" in out
    assert "58 MoE layers after 3 dense" in out
    for figure in ("671,026,404,352", "37,552,282,624", "70,272", "225,792", f"{58 * 225_792:,}"):
        assert figure in out, figure
