"""Hugging Face interop for the Llama family (Llama, Mistral without sliding windows, Qwen2) and its
Mixture-of-Experts kin (Mixtral, Qwen3-MoE): config.json and safetensors weights in, and out again in the layout
`transformers`' LlamaForCausalLM / Qwen2ForCausalLM / MixtralForCausalLM / Qwen3MoeForCausalLM load (experts
one tensor each, `experts.{j}.w1` or `experts.{j}.gate_proj`, as on the Hub and as transformers writes them).
Weights are read and written with the `safetensors` package (`pip install meshlm[hf]`); torch is not needed.

MoE checkpoints load with `dispatch="dropless"`: transformers computes every token's chosen experts, and
capacity dispatch would drop a token past its expert's slots, so only dropless gives transformers' logits.
The routers agree: softmax over the expert logits, the top k, renormalised to sum to 1 when k > 1 and
norm_topk_prob (Mixtral: always) (model/router.py); configs whose router does otherwise are refused (k = 1 with
renormalisation, which weighs the one expert 1 where meshlm keeps its probability), as are Qwen3-MoE's dense
layers (mlp_only_layers, decoder_sparse_step), which meshlm's uniform layer stack does not have, and, on export,
DeepSeekMoE's router features (sigmoid scores, groups, shared experts, scaling). DeepSeek-V3
(DeepseekV3ForCausalLM: multi-head latent attention, dense first layers, DeepSeekMoE) has its config and layer
names in model/hf_deepseek.py; the layout of a table row (names, reshapes) is model/hf_tensors.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import hf_deepseek
from model.config import ModelConfig, MoEConfig
from model.hf_rope import rope_from_hf, rope_to_hf
from model.hf_tensors import _from_hf, _hf_names, _hf_shape, _stacked, _Tensor, _to_hf, require
from model.router import ExpertBias
from model.transformer import Transformer

MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen3_moe", hf_deepseek.MODEL_TYPE)
MOE_TYPES = ("mixtral", "qwen3_moe")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors dtype codes load_hf accepts
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older Llama exports carry; recomputed, not loaded
_WEIGHTS = nnx.Any(nnx.Param, ExpertBias)  # what a checkpoint holds


# --- config.json <-> ModelConfig -----------------------------------------------------------------------------

def _moe_from_hf(hf_config: dict, model_type: str) -> MoEConfig:
    """The MoE of a Mixtral / Qwen3-MoE config: dropless dispatch (transformers drops no token), the router's
    balance loss weighted as transformers weighs it, no z-loss (transformers has none)."""
    if model_type == "qwen3_moe":
        for key, fine in (("decoder_sparse_step", 1), ("mlp_only_layers", [])):
            if (hf_config.get(key) or fine) != fine:
                raise ValueError(f"qwen3_moe {key}={hf_config[key]!r} is not supported: it makes some layers "
                                 f"dense and meshlm's layers are all alike (only {key}={fine!r} loads)")
    n_experts = hf_config.get("num_local_experts") or hf_config.get("num_experts")
    if not n_experts:
        raise ValueError(f"{model_type} config has no experts (num_local_experts / num_experts "
                         f"{n_experts!r}); a Mixture-of-Experts config needs at least 1")
    top_k = require(hf_config, "num_experts_per_tok")
    renormalised = bool(hf_config.get("norm_topk_prob", False)) if model_type == "qwen3_moe" else True
    if renormalised and top_k == 1:  # meshlm's router renormalises (norm_topk_prob) only when top_k > 1
        field = "num_experts_per_tok=1" + (" with norm_topk_prob=true" if model_type == "qwen3_moe" else "")
        raise ValueError(f"{model_type} {field} is not supported: transformers then weighs the one chosen expert "
                         f"1, meshlm's router by its probability (which keeps the router learning)")
    # transformers' aux loss is E * sum over the k choices and experts of f_{k,e} * P_e: k times model/moe.py's.
    coef = float(hf_config.get("router_aux_loss_coef", 0.0))
    return MoEConfig(n_experts=n_experts, top_k=top_k, dispatch="dropless", aux_loss_weight=coef * top_k,
                     z_loss_weight=0.0, norm_topk_prob=renormalised or top_k == 1)


def config_from_hf(hf_config: dict) -> ModelConfig:
    """A `ModelConfig` for a Llama / Mistral / Qwen2 / Mixtral / Qwen3-MoE `config.json` dict; raises ValueError,
    naming the field, for anything this model cannot reproduce exactly (sliding windows, RoPE scaled other than
    by YaRN (model/hf_rope.py), o_proj/MLP biases, other activations, dense layers among MoE ones, a router that
    weighs experts otherwise). MoE configs get dropless dispatch (see the module docstring); Mixtral's
    router_jitter_noise, which transformers applies only in training, is not reproduced."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; supported: {list(MODEL_TYPES)}")
    if model_type in ("mistral", "mixtral") and hf_config.get("sliding_window") is not None:
        raise ValueError(f"{model_type} sliding_window={hf_config['sliding_window']!r} is not supported "
                         "(no sliding-window attention); only checkpoints with sliding_window null load")
    if model_type in ("qwen2", "qwen3_moe") and hf_config.get("use_sliding_window"):
        raise ValueError(f"{model_type} use_sliding_window=true is not supported (no sliding-window attention)")
    layer_types = set(hf_config.get("layer_types") or ())
    if layer_types - {"full_attention"}:
        raise ValueError(f"HF config layer_types {sorted(layer_types)} are not supported; only 'full_attention'")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"HF config hidden_act {act!r} is not supported; the MLP is SwiGLU ('silu')")
    if hf_config.get("attention_bias"):
        raise ValueError(f"{model_type} attention_bias=true is not supported (it adds an o_proj bias)")
    if hf_config.get("mlp_bias"):
        raise ValueError(f"{model_type} mlp_bias=true is not supported")
    d_model = require(hf_config, "hidden_size")
    rope_theta, rope_scaling = rope_from_hf(hf_config)
    common = dict(
        vocab_size=require(hf_config, "vocab_size"),
        d_model=d_model,
        n_layers=require(hf_config, "num_hidden_layers"),
        max_seq_len=require(hf_config, "max_position_embeddings"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(require(hf_config, "rms_norm_eps")),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    if model_type == hf_deepseek.MODEL_TYPE:
        return hf_deepseek.config_from_hf(hf_config, common)
    n_heads = require(hf_config, "num_attention_heads")
    moe = _moe_from_hf(hf_config, model_type) if model_type in MOE_TYPES else MoEConfig()
    d_ff_key = "moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"
    return ModelConfig(
        **common,
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
        head_dim=hf_config.get("head_dim") or d_model // n_heads,
        d_ff=require(hf_config, d_ff_key),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3_moe",
        dtype="auto",
        param_dtype="float32",
        moe=moe,
    )


def _hf_family(cfg: ModelConfig) -> tuple[str, str]:
    """(model_type, architecture) that describes `cfg` exactly; ValueError naming the field when none does."""
    if cfg.mla.enabled:
        return hf_deepseek.MODEL_TYPE, hf_deepseek.ARCHITECTURE
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("HF export of model.qk_norm=true with model.qkv_bias=true is not supported: no exported "
                         "family has both (Qwen3-MoE has q/k norms and no biases, Qwen2 the reverse)")
    moe = cfg.moe
    if moe.enabled:
        for name, plain in (("router", "softmax"), ("n_shared_experts", 0), ("n_group", 1),
                            ("routed_scaling_factor", 1.0), ("first_dense_layers", 0), ("d_ff", 0)):
            if getattr(moe, name) != plain:
                raise ValueError(f"HF export of model.moe.{name}={getattr(moe, name)!r} is not supported: Mixtral "
                                 f"and Qwen3-MoE have a plain softmax router and every layer's experts of "
                                 f"model.d_ff ({name}={plain!r}); DeepSeek-V3's needs model.mla")
        if cfg.qkv_bias:
            raise ValueError("HF export of a Mixture-of-Experts model with model.qkv_bias=true is not supported: "
                             "Mixtral and Qwen3-MoE have no q/k/v biases")
        if cfg.qk_norm:
            return "qwen3_moe", "Qwen3MoeForCausalLM"
        if moe.top_k == 1 or not moe.norm_topk_prob:
            field = "top_k=1" if moe.top_k == 1 else "norm_topk_prob=false"
            raise ValueError(f"HF export of model.moe.{field} as Mixtral is not supported: Mixtral renormalises "
                             f"the chosen experts' weights, a lone expert's to 1 (Qwen3-MoE, model.qk_norm=true, "
                             f"matches it)")
        return "mixtral", "MixtralForCausalLM"
    if cfg.qk_norm:
        raise ValueError("HF export of a dense model with model.qk_norm=true is not supported (Qwen3-MoE, the "
                         "family with q/k norms that meshlm writes, needs model.moe.n_experts > 0)")
    return ("qwen2", "Qwen2ForCausalLM") if cfg.qkv_bias else ("llama", "LlamaForCausalLM")


def hf_config_from(cfg: ModelConfig) -> dict:
    """The `config.json` dict for `cfg`: model_type "qwen2" when it has q/k/v biases, "mixtral" for an MoE, and
    "qwen3_moe" for an MoE with q/k norms, else "llama". The MoE balance loss goes out as transformers weighs it;
    the z-loss, the sequence-wise balance loss and the dispatch are training choices transformers has no field
    for (it computes dropless), so a capacity-dispatch model comes back from `load_hf` dropless."""
    model_type, architecture = _hf_family(cfg)
    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(cfg),  # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta / rope_scaling
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if model_type in ("qwen2", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "mixtral":
        out.update(sliding_window=None, num_local_experts=cfg.moe.n_experts, router_jitter_noise=0.0)
    if model_type == "qwen3_moe":  # every layer sparse; intermediate_size (dense layers' width) is then unused
        out.update(attention_bias=False, num_experts=cfg.moe.n_experts, moe_intermediate_size=cfg.d_ff,
                   decoder_sparse_step=1, mlp_only_layers=[],
                   norm_topk_prob=cfg.moe.norm_topk_prob and cfg.moe.top_k > 1)
    if cfg.moe.enabled:
        out.update(num_experts_per_tok=cfg.moe.top_k, router_aux_loss_coef=cfg.moe.aux_loss_weight / cfg.moe.top_k)
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == hf_deepseek.MODEL_TYPE:
        out.update(hf_deepseek.hf_config_from(cfg))
    return out


# --- the weight mapping --------------------------------------------------------------------------------------

def _tensors(cfg: ModelConfig, rope_interleave: bool = True) -> list[_Tensor]:
    """Every tensor of `cfg`'s model (`rope_interleave`: DeepSeek-V3 checkpoints' rotary row order)."""
    layer = [
        (("attn_norm", "scale"), "input_layernorm.weight", 0),
        (("attn", "wq"), "self_attn.q_proj.weight", 1),
        (("attn", "wk"), "self_attn.k_proj.weight", 1),
        (("attn", "wv"), "self_attn.v_proj.weight", 1),
        (("attn", "wo"), "self_attn.o_proj.weight", 2),
        (("mlp_norm", "scale"), "post_attention_layernorm.weight", 0),
        (("mlp", "w_gate"), "mlp.gate_proj.weight", 1),
        (("mlp", "w_up"), "mlp.up_proj.weight", 1),
        (("mlp", "w_down"), "mlp.down_proj.weight", 1),
    ]
    if cfg.qkv_bias:
        layer += [(("attn", f"b{x}"), f"self_attn.{x}_proj.bias", None) for x in "qkv"]
    if cfg.qk_norm:
        layer += [(("attn", f"{x}_norm", "scale"), f"self_attn.{x}_norm.weight", 0) for x in "qk"]
    e = cfg.moe.n_experts
    if e:  # the dense MLP's three rows give way to the router and the experts
        moe, gate, up, down = (("block_sparse_moe", "w1", "w3", "w2") if not cfg.qk_norm
                               else ("mlp", "gate_proj", "up_proj", "down_proj"))
        layer = [row for row in layer if row[0][0] != "mlp"] + [(("mlp", "router"), f"{moe}.gate.weight", 1)]
        layer += [(("mlp", ours), f"{moe}.experts.{{j}}.{theirs}.weight", 1)
                  for ours, theirs in (("w_gate", gate), ("w_up", up), ("w_down", down))]
    out = [_Tensor(("embed",), "model.embed_tokens.weight", 0)]
    if cfg.mla.enabled:
        out += hf_deepseek.tensors(cfg, rope_interleave)
    else:
        out += [_Tensor(("blocks", *path), "model.layers.{i}." + name, n_in, e if "{j}" in name else 0)
                for path, name, n_in in layer]
    out.append(_Tensor(("final_norm", "scale"), "model.norm.weight", 0))
    if not cfg.tie_embeddings:
        out.append(_Tensor(("lm_head",), "lm_head.weight", 1))
    return out


def _refuse_unexpected(unexpected: list[str], where: str, described_by: str) -> None:
    """Refuse a checkpoint with tensors the model does not use (the first 8 named)."""
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} in {where}: "
                         f"not used by the model its {described_by} describes")


def _abstract_model(cfg: ModelConfig, specs: list[_Tensor]) -> tuple[Transformer, nnx.State, dict, dict]:
    """The model of `cfg` in shapes only (no weights allocated), its weights' state (Params and the routers' expert
    biases), that state's variables by path, and each tensor's shape in the model (one layer's or expert's, for a
    stacked tensor): what the loaders fill in."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, _WEIGHTS)
    variables = dict(nnx.to_flat_state(state))
    shapes = {t.path: variables[t.path].shape[_stacked(t):] for t in specs}
    return model, state, variables, shapes


# --- load and save -------------------------------------------------------------------------------------------

def _safetensors():
    try:
        import safetensors
        import safetensors.flax
    except ImportError as e:
        raise ImportError("reading and writing HF checkpoints needs the safetensors package: "
                          "pip install meshlm[hf]") from e
    return safetensors


def _checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """The checkpoint's safetensors files, and for a sharded one the file its index names for each tensor."""
    if (directory / INDEX_FILE).exists():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        return [directory / file for file in sorted(set(weight_map.values()))], weight_map
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE], {}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}")


def load_hf(directory: str | Path, dtype: str = "auto", param_dtype: str = "float32") -> Transformer:
    """A `Transformer` with the weights of the HF checkpoint in `directory` (config.json and model.safetensors,
    or shards listed in model.safetensors.index.json), params cast to `param_dtype`. Raises ValueError naming
    any missing, unexpected or misshaped tensor and its file, before any weight is read."""
    safetensors = _safetensors()
    directory = Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf_config).replace(dtype=dtype, param_dtype=param_dtype)
    files, weight_map = _checkpoint_files(directory)
    where = f"{str(directory / SINGLE_FILE)!r}" if not weight_map else f"the shards of {str(directory)!r}"

    with contextlib.ExitStack() as stack:  # headers only until every tensor has been checked
        handles = {file: stack.enter_context(safetensors.safe_open(file, framework="flax")) for file in files}
        file_of = {name: file for file, f in handles.items() for name in f.keys()}
        specs = _tensors(cfg, bool(hf_config.get("rope_interleave", True)))
        expected = {name for t in specs for name in _hf_names(t, cfg.n_layers)}
        ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()  # HF ties it to the embedding anyway
        ignored |= {n for n in file_of if hf_deepseek.is_mtp_layer(n, hf_config, cfg.n_layers)}
        unexpected = sorted(n for n in set(file_of) - expected - ignored if not n.endswith(_IGNORED_SUFFIXES))
        _refuse_unexpected(unexpected, f"{sorted({file_of[n].name for n in unexpected})} of {str(directory)!r}",
                           "config.json")
        model, state, variables, shapes = _abstract_model(cfg, specs)
        for t in specs:
            want = _hf_shape(shapes[t.path], t.n_in)
            for name in _hf_names(t, cfg.n_layers):
                if name not in file_of:
                    file = repr(str(directory / weight_map[name])) if name in weight_map else where
                    raise ValueError(f"missing tensor {name!r} in {file} (config.json asks for {want})")
                info = handles[file_of[name]].get_slice(name)
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise ValueError(f"tensor {name!r} in {str(file_of[name])!r} has dtype {info.get_dtype()}; "
                                     f"supported: {list(_FLOAT_DTYPES)}")
                if tuple(info.get_shape()) != want:
                    raise ValueError(f"tensor {name!r} in {str(file_of[name])!r} has shape {list(info.get_shape())}, "
                                     f"expected {list(want)} from config.json")
        for t in specs:
            dtype = variables[t.path].get_value().dtype  # the params' dtype; an expert bias stays float32
            arrays = [_from_hf(handles[file_of[name]].get_tensor(name), t.n_in, shapes[t.path], t.order).astype(dtype)
                      for name in _hf_names(t, cfg.n_layers)]
            variables[t.path].set_value(jnp.stack(arrays).reshape(variables[t.path].shape) if _stacked(t)
                                        else arrays[0])
    nnx.update(model, state)
    return model


def save_hf(model: Transformer, directory: str | Path) -> None:
    """Write `model` as config.json and model.safetensors (in its param dtype) that `from_pretrained` loads."""
    safetensors = _safetensors()
    cfg = model.cfg
    hf_config = hf_config_from(cfg)  # refuses what HF cannot describe before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {path: var for path, var in nnx.to_flat_state(nnx.state(model, _WEIGHTS))}
    tensors: dict[str, np.ndarray] = {}
    for t in _tensors(cfg):
        value = np.asarray(jax.device_get(params[t.path][...]))
        # The writer copies each array's raw buffer, so the transposed views must be made contiguous.
        if _stacked(t):
            slices = value.reshape(-1, *value.shape[_stacked(t):])  # layer-major, then expert: as _hf_names
            for name, one in zip(_hf_names(t, cfg.n_layers), slices, strict=True):
                tensors[name] = np.ascontiguousarray(_to_hf(one, t.n_in, t.order))
        else:
            tensors[t.hf_name] = np.ascontiguousarray(_to_hf(value, t.n_in, t.order))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    safetensors.flax.save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})  # "pt": transformers
