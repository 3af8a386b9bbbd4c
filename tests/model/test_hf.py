"""model/hf.py against transformers itself (the dense families; the MoE ones are in test_hf_moe.py): HF
checkpoints load into meshlm with the same logits, and meshlm models saved with save_hf load in transformers
with the same logits.

Tolerance for float32 logit parity: both sides compute in float32 (eps 1.2e-7) with different summation orders
(XLA vs torch CPU kernels) through 2 layers of 64/128-wide dot products and a softmax; the observed difference is
~3e-7 of max|logit|, so `atol = 1e-5 * max|ref|` (the house fp32 tolerance) leaves ~30x headroom while any
mapping error (a transposed or permuted weight, a wrong RoPE convention, a missing bias) moves logits by O(max).
"""

from __future__ import annotations

import copy
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import create_model, get_preset
from model.hf import config_from_hf, hf_config_from, load_hf, save_hf
from tests.model.hf_reference import assert_logits_close, perturbed, torch_logits

VOCAB = 300
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 20))


def _hf_model(family: str, kv_heads: int = 2, tie: bool = False, seed: int = 0):
    """A small random transformers model with every weight perturbed (norm scales away from 1, biases nonzero)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    extra = {"sliding_window": None} if family == "mistral" else {}
    config = config_cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=64,
                        rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=tie,
                        attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    return perturbed(model)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.parametrize("family,kv_heads,tie", [
    ("llama", 2, False), ("llama", 2, True), ("llama", 4, False), ("llama", 4, True),
    ("mistral", 2, False), ("qwen2", 2, False), ("qwen2", 4, True),
], ids=lambda v: str(v))
def test_load_hf_matches_transformers(tmp_path, family, kv_heads, tie):
    hf_model = _hf_model(family, kv_heads, tie)
    hf_model.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype="float32")
    assert model.cfg.n_kv_heads == kv_heads and model.cfg.tie_embeddings == tie
    assert model.cfg.qkv_bias == (family == "qwen2") and model.cfg.rope_theta == 500000.0
    assert_logits_close(_logits(model, TOKENS), torch_logits(hf_model, TOKENS))


def test_load_hf_sharded_checkpoint(tmp_path):
    hf_model = _hf_model("llama")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    model = load_hf(tmp_path, dtype="float32")
    assert_logits_close(_logits(model, TOKENS), torch_logits(hf_model, TOKENS))


def test_load_hf_bfloat16_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    hf_model = _hf_model("llama")
    with torch.no_grad():  # round the weights to bf16 in place: bf16 -> f32 is exact, so this is the reference
        for p in hf_model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    model = load_hf(tmp_path, dtype="float32", param_dtype="float32")
    assert model.embed[...].dtype == jnp.float32
    assert_logits_close(_logits(model, TOKENS), torch_logits(hf_model, TOKENS))


@pytest.mark.parametrize("qkv_bias,tie,head_dim", [(False, True, 16), (False, False, 16), (True, False, 32)],
                         ids=["llama-tied", "llama-untied", "qwen2-wide-heads"])
def test_save_hf_loads_in_transformers(tmp_path, qkv_bias, tie, head_dim):
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("tiny").replace(dtype="float32", qkv_bias=qkv_bias, tie_embeddings=tie, head_dim=head_dim)
    model = create_model(cfg, seed=3)
    if qkv_bias:  # biases start at zero; make them matter
        rng = np.random.default_rng(1)
        for name in ("bq", "bk", "bv"):
            var = getattr(model.blocks.attn, name)
            var[...] = jnp.asarray(rng.normal(0, 0.5, var.shape), jnp.float32)
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    tokens = TOKENS % cfg.vocab_size
    assert_logits_close(_logits(model, tokens), torch_logits(hf_model, tokens))


def test_save_then_load_is_exact_in_bfloat16(tmp_path):
    pytest.importorskip("safetensors")
    cfg = get_preset("tiny").replace(param_dtype="bfloat16", tie_embeddings=False, qkv_bias=True)
    model = create_model(cfg, seed=5)
    save_hf(model, tmp_path)
    loaded = load_hf(tmp_path, param_dtype="bfloat16")
    assert loaded.cfg == cfg
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param)), strict=True):
        assert a[...].dtype == b[...].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_config_round_trip():
    cfg = get_preset("tiny").replace(qkv_bias=True, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6)
    assert config_from_hf(hf_config_from(cfg)) == cfg
    assert config_from_hf(hf_config_from(get_preset("7b"))) == get_preset("7b")


BASE = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}


def test_config_from_hf_defaults_and_rope_spellings():
    cfg = config_from_hf(BASE)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_embeddings) == (4, 16, 10000.0, False)
    assert (cfg.dtype, cfg.param_dtype, cfg.qkv_bias) == ("auto", "float32", False)
    assert config_from_hf(BASE | {"rope_theta": 5e5}).rope_theta == 5e5  # transformers 4 spelling
    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}  # transformers 5 spelling
    assert config_from_hf(BASE | v5).rope_theta == 1e6
    assert config_from_hf(BASE | {"rope_scaling": None, "head_dim": None}).head_dim == 16
    assert config_from_hf(BASE | {"model_type": "mistral", "sliding_window": None}).n_layers == 2
    qwen = config_from_hf(BASE | {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32768})
    assert qwen.qkv_bias


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"vocab_size": None}, "'vocab_size'"),
    ({"num_key_value_heads": 3}, "n_kv_heads"),
], ids=lambda v: str(v)[:40])
def test_config_from_hf_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(BASE | changes)


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny untied meshlm model saved as an HF checkpoint; returns its directory and tensors."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    save_hf(create_model(get_preset("tiny").replace(tie_embeddings=False)), tmp_path)
    return tmp_path, safetensors_numpy.load_file(tmp_path / "model.safetensors")


def _rewrite(directory, tensors) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name, tensor, pattern", [
    ("model.layers.1.mlp.up_proj.weight", None,  # missing
     r"missing tensor 'model.layers.1.mlp.up_proj.weight' in .*model.safetensors"),
    ("model.layers.0.self_attn.k_proj.weight", np.zeros((16, 64), np.float32),  # one kv head, not two
     r"'model.layers.0.self_attn.k_proj.weight' in .*model.safetensors' has shape \[16, 64\], expected \[32, 64\]"),
    ("model.layers.0.self_attn.o_proj.bias", np.zeros((64,), np.float32),  # unexpected
     r"unexpected tensors \['model.layers.0.self_attn.o_proj.bias'\] in \['model.safetensors'\]"),
    ("model.norm.weight", np.zeros((64,), np.int32), r"'model.norm.weight' in .*model.safetensors' has dtype I32"),
])
def test_load_hf_names_a_bad_tensor(saved_tiny, name, tensor, pattern):
    """A missing, misshaped, unexpected or non-float tensor: the error names it and its file."""
    directory, tensors = saved_tiny
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    _rewrite(directory, tensors)
    with pytest.raises(ValueError, match=pattern):
        load_hf(directory)


def test_hf_io_without_safetensors_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` raise ImportError
    with pytest.raises(ImportError, match=r"pip install meshlm\[hf\]"):
        load_hf(tmp_path)
    with pytest.raises(ImportError, match=r"pip install meshlm\[hf\]"):
        save_hf(create_model(get_preset("tiny")), tmp_path)


def test_load_hf_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path)
