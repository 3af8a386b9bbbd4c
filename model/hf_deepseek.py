"""DeepSeek-V3 (`DeepseekV3ForCausalLM`, model_type "deepseek_v3") for model/hf.py: config.json both ways and the
per-layer weight names. Multi-head latent attention (model/mla.py), `first_k_dense_replace` dense first layers,
then MoE layers of `moe_intermediate_size` experts with shared experts and the sigmoid, group-limited router whose
`e_score_correction_bias` is meshlm's expert bias (model/router.py); dropless dispatch, as transformers computes.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... of the rotary dims (`rope_interleave`, true in its
checkpoints); meshlm rotates halves (x_i, x_i+Dp/2). The two agree once the rotary rows of q_proj / q_b_proj and
kv_a_proj_with_mqa are taken evens first, then odds (`rope_rows`): transformers' interleaved RoPE does the same
de-interleave before rotating, so scores are unchanged. Export writes interleaved rows and rope_interleave=true.

YaRN-scaled RoPE (DeepSeek-V3's published config: factor 40 over 4096 positions) loads through model/hf_rope.py
into `ModelConfig.rope_scaling`: the tables' frequencies and attention factor, and MLA's softmax scale times
mscale(factor, mscale_all_dim)^2 as DeepseekV3Attention's. Not loaded: fp8 checkpoints (quantization_config:
dequantize first), attention biases. The multi-token-prediction layers (num_nextn_predict_layers: checkpoint
layers past num_hidden_layers) are skipped on import.
"""

from __future__ import annotations

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.hf_tensors import _Tensor, require
from model.transformer import dense_layers

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"

# (meshlm path in a block, HF name after "model.layers.{i}.", how many leading meshlm axes are HF's input)
_ATTENTION_Q_LORA = [(("attn", "wq_a"), "self_attn.q_a_proj.weight", 1),
                     (("attn", "q_norm", "scale"), "self_attn.q_a_layernorm.weight", 0),
                     (("attn", "wq_b"), "self_attn.q_b_proj.weight", 1)]
_ATTENTION_Q = [(("attn", "wq"), "self_attn.q_proj.weight", 1)]
_ATTENTION_KV = [(("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight", 1),
                 (("attn", "kv_norm", "scale"), "self_attn.kv_a_layernorm.weight", 0),
                 (("attn", "wkv_b"), "self_attn.kv_b_proj.weight", 1),
                 (("attn", "wo"), "self_attn.o_proj.weight", 2)]
_NORMS = [(("attn_norm", "scale"), "input_layernorm.weight", 0),
          (("mlp_norm", "scale"), "post_attention_layernorm.weight", 0)]
_DENSE_MLP = [(("mlp", f"w_{ours}"), f"mlp.{ours}_proj.weight", 1) for ours in ("gate", "up", "down")]
_MOE = ([(("mlp", "router"), "mlp.gate.weight", 1), (("mlp", "expert_bias"), "mlp.gate.e_score_correction_bias", 0)]
        + [(("mlp", "shared", f"w_{ours}"), f"mlp.shared_experts.{ours}_proj.weight", 1)
           for ours in ("gate", "up", "down")])
_EXPERTS = [(("mlp", f"w_{ours}"), f"mlp.experts.{{j}}.{ours}_proj.weight", 1) for ours in ("gate", "up", "down")]


def layer_rows(cfg: ModelConfig, moe: bool) -> list[tuple[tuple[str, ...], str, int]]:
    """The weights of one DeepSeek-V3 layer: (path in the block, HF name after "model.layers.{i}.", n_in); an
    MoE layer's (`moe`) experts have "{j}" in the name."""
    attention = (_ATTENTION_Q_LORA if cfg.mla.q_lora_rank else _ATTENTION_Q) + _ATTENTION_KV
    return _NORMS + attention + (_MOE + _EXPERTS if moe else _DENSE_MLP)


def rope_rows(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...] | None:
    """For the weights whose last meshlm axis holds rotary rows, that axis as HF's rows in meshlm's order (the
    rotary rows evens first, then odds); None for the others."""
    mla = cfg.mla
    rope = tuple(range(0, mla.qk_rope_head_dim, 2)) + tuple(range(1, mla.qk_rope_head_dim, 2))
    if path[-2:] in (("attn", "wq"), ("attn", "wq_b")):
        return tuple(range(mla.qk_nope_head_dim)) + tuple(mla.qk_nope_head_dim + r for r in rope)
    if path[-2:] == ("attn", "wkv_a"):
        return tuple(range(mla.kv_lora_rank)) + tuple(mla.kv_lora_rank + r for r in rope)
    return None


def tensors(cfg: ModelConfig, rope_interleave: bool) -> list[_Tensor]:
    """DeepSeek-V3's per-layer tensors: `dense_blocks` for its first dense layers, `blocks` for the rest
    (`rope_interleave`: the checkpoint's rotary row order)."""
    n_dense, e = dense_layers(cfg), cfg.moe.n_experts
    stacks = [("dense_blocks", (0, n_dense), False)] if n_dense else []
    stacks.append(("blocks", (n_dense, cfg.n_layers), cfg.moe.enabled))
    return [_Tensor((stack, *path), "model.layers.{i}." + name, n_in, e if "{j}" in name else 0, layers,
                    rope_rows(cfg, path) if rope_interleave else None)
            for stack, layers, moe in stacks for path, name, n_in in layer_rows(cfg, moe)]


def is_mtp_layer(name: str, hf_config: dict, n_layers: int) -> bool:
    """Whether `name` is in DeepSeek-V3's multi-token-prediction layers (model.layers.{n_layers + k}.*), which
    meshlm does not load."""
    if hf_config.get("model_type") != MODEL_TYPE or not name.startswith("model.layers."):
        return False
    index = name.split(".")[2]
    return index.isdigit() and int(index) >= n_layers


def _refuse_unsupported(hf_config: dict) -> None:
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method")
        raise ValueError(f"{MODEL_TYPE} quantization_config (quant_method {method!r}) is not supported: dequantize "
                         f"the checkpoint to bfloat16 first")
    for key, supported in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf_config.get(key, supported) != supported:
            raise ValueError(f"{MODEL_TYPE} {key}={hf_config[key]!r} is not supported (only {supported!r})")
    if hf_config.get("ep_size", 1) != 1:
        raise ValueError(f"{MODEL_TYPE} ep_size={hf_config['ep_size']!r} is not supported (only 1)")


def config_from_hf(hf_config: dict, common: dict) -> ModelConfig:
    """The `ModelConfig` of a DeepSeek-V3 config.json; `common` holds the fields model/hf.py reads for every
    family (vocab_size, d_model, n_layers, max_seq_len, rope_theta, norm_eps, tie_embeddings, init_std)."""
    _refuse_unsupported(hf_config)
    n_heads, n_layers = require(hf_config, "num_attention_heads"), common["n_layers"]
    if hf_config.get("num_key_value_heads") not in (None, n_heads):
        raise ValueError(f"{MODEL_TYPE} num_key_value_heads={hf_config['num_key_value_heads']!r} is not supported: "
                         f"multi-head latent attention has one key and value per head ({n_heads})")
    mla = MLAConfig(kv_lora_rank=require(hf_config, "kv_lora_rank"), q_lora_rank=hf_config.get("q_lora_rank") or 0,
                    qk_nope_head_dim=require(hf_config, "qk_nope_head_dim"),
                    qk_rope_head_dim=require(hf_config, "qk_rope_head_dim"),
                    v_head_dim=require(hf_config, "v_head_dim"))
    first_dense = require(hf_config, "first_k_dense_replace")
    moe = MoEConfig()
    if first_dense < n_layers:
        top_k, norm_topk_prob = require(hf_config, "num_experts_per_tok"), bool(hf_config.get("norm_topk_prob", True))
        if top_k == 1 and norm_topk_prob:
            raise ValueError(f"{MODEL_TYPE} num_experts_per_tok=1 with norm_topk_prob=true is not supported: "
                             f"transformers then weighs the one chosen expert 1, meshlm's router by its affinity")
        n_experts, n_group = require(hf_config, "n_routed_experts"), require(hf_config, "n_group")
        if n_group > 1 and n_experts // n_group < 2:
            raise ValueError(f"{MODEL_TYPE} n_group={n_group} with n_routed_experts={n_experts} is not supported: "
                             f"transformers scores a group by its two best experts")
        moe = MoEConfig(n_experts=n_experts, top_k=top_k, dispatch="dropless", aux_loss_weight=0.0,
                        z_loss_weight=0.0, router="sigmoid", n_shared_experts=hf_config.get("n_shared_experts") or 0,
                        n_group=n_group, topk_group=require(hf_config, "topk_group"),
                        routed_scaling_factor=float(require(hf_config, "routed_scaling_factor")),
                        norm_topk_prob=norm_topk_prob or top_k == 1, d_ff=require(hf_config, "moe_intermediate_size"),
                        first_dense_layers=first_dense)
    return ModelConfig(**common, n_heads=n_heads, n_kv_heads=n_heads, head_dim=mla.qk_rope_head_dim,
                       d_ff=require(hf_config, "intermediate_size"), mla=mla, moe=moe, dtype="auto",
                       param_dtype="float32")


def hf_config_from(cfg: ModelConfig) -> dict:
    """The DeepSeek-V3 fields of `cfg`'s config.json (model/hf.py adds those every family shares); ValueError
    naming the field for what DeepseekV3ForCausalLM cannot describe."""
    moe = cfg.moe
    if moe.enabled:
        if moe.router != "sigmoid":
            raise ValueError(f"HF export of multi-head latent attention with model.moe.router={moe.router!r} is not "
                             f"supported: DeepSeek-V3's router is 'sigmoid'")
        if moe.n_group > 1 and moe.n_experts // moe.n_group < 2:
            raise ValueError(f"HF export of model.moe.n_group={moe.n_group} with n_experts={moe.n_experts} is not "
                             f"supported: transformers scores a group by its two best experts")
        routing = dict(n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k, n_group=moe.n_group,
                       topk_group=moe.topk_group, routed_scaling_factor=moe.routed_scaling_factor,
                       norm_topk_prob=moe.norm_topk_prob and moe.top_k > 1, n_shared_experts=moe.n_shared_experts,
                       moe_intermediate_size=moe.expert_d_ff(cfg.d_ff), first_k_dense_replace=moe.first_dense_layers)
    else:  # every layer dense: the router fields are unused, but must describe some valid router
        routing = dict(n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                       norm_topk_prob=False, n_shared_experts=0, moe_intermediate_size=cfg.d_ff,
                       first_k_dense_replace=cfg.n_layers)
    mla = cfg.mla
    return dict(routing, num_key_value_heads=cfg.n_heads, kv_lora_rank=mla.kv_lora_rank,
                q_lora_rank=mla.q_lora_rank or None, qk_nope_head_dim=mla.qk_nope_head_dim,
                qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim,
                rope_interleave=True, attention_bias=False, num_nextn_predict_layers=0)
