"""Start a run from pretrained weights (`train.init`): "hf:DIR" (a Hugging Face Llama/Mistral/Qwen2 directory),
"gguf:FILE" (llama.cpp's format, dequantized) or "run:DIR[@STEP]" (another meshlm run; default its newest
checkpoint). The source decides the model's architecture (`source_model_config`); the optimizer starts fresh.

Loading is sharded: each tensor is read on the host (one at a time) and placed straight onto its sharding on the
run's mesh with `jax.make_array_from_callback`, every device receiving only its own slice; a run source is
restored by orbax straight into the shardings. Nothing gathers the whole model on one device. The tensor layout
(HF names, transposes, GGUF's RoPE row order) is model/hf.py's and model/gguf.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from model.config import ModelConfig
from model.hf import (
    _checkpoint_files,
    _from_hf,
    _hf_names,
    _hf_shape,
    _safetensors,
    _stacked,
    _Tensor,
    _tensors,
    config_from_hf,
)
from train.run_tokenizer import run_path, split_source

# Fields a run may set differently from its pretrained source: how the same math is computed or stored, not what
# it is. Every other model field must equal the source's.
FREE_FIELDS = ("max_seq_len", "dtype", "param_dtype", "attention_impl", "remat", "scan_layers",
               "logits_grad_dtype", "loss_chunks", "pipeline_microbatches", "init_std")


def init_source(spec: str) -> tuple[str, Path, int | None]:
    """(kind "hf" | "gguf" | "run", path, step or None) of a `train.init` value; ValueError naming a bad one."""
    kind, rest = split_source(spec)
    if kind == "path":
        raise ValueError(f"--init {spec!r}: expected hf:DIR, gguf:FILE or run:DIR[@STEP]")
    if kind == "run":
        directory, step = run_path(rest)
        return kind, directory, step
    return kind, Path(rest), None


def source_model_config(spec: str) -> ModelConfig:
    """The model config of the pretrained source `spec`. Raises FileNotFoundError or ValueError naming it."""
    kind, path, _ = init_source(spec)
    if kind == "hf":
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--init {spec!r}: no config.json in {str(path)!r}")
        return config_from_hf(json.loads((path / "config.json").read_text()))
    if kind == "gguf":
        from model.gguf import config_from_gguf, gguf_metadata

        if not path.is_file():
            raise FileNotFoundError(f"--init {spec!r}: no GGUF file at {str(path)!r}")
        import gguf

        names = [t.name for t in gguf.GGUFReader(path).tensors]
        return config_from_gguf(gguf_metadata(path), names)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {spec!r}: {str(path)!r} has no config.json (not a meshlm run)")
    return ModelConfig.from_dict(json.loads((path / "config.json").read_text())["model"])


def check_matches_source(model: ModelConfig, source: ModelConfig, spec: str) -> None:
    """ValueError naming the first model field that differs from the pretrained source's (except FREE_FIELDS)."""
    for field in dataclasses.fields(ModelConfig):
        if field.name in FREE_FIELDS:
            continue
        ours, theirs = getattr(model, field.name), getattr(source, field.name)
        if ours != theirs:
            raise ValueError(f"model.{field.name} is {ours!r} but the pretrained model of --init {spec!r} has "
                             f"{theirs!r}; the architecture comes from --init (only {', '.join(FREE_FIELDS)} may "
                             f"differ)")


def _nested(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_nested(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _shapes(cfg: ModelConfig, abstract: dict, rope_interleave: bool = True
            ) -> Iterator[tuple[_Tensor, tuple[int, ...], bool, tuple[int, ...]]]:
    """(tensor, its parameter's shape, whether it stacks HF tensors (layers, and experts), one HF tensor's shape in
    meshlm's layout) for each tensor of model/hf.py's table, the shapes read from `abstract` (`rope_interleave`:
    a DeepSeek-V3 checkpoint's rotary row order)."""
    for t in _tensors(cfg, rope_interleave):
        shape = tuple(_nested(abstract, t.path).shape)
        stacked = _stacked(t)
        yield t, shape, stacked > 0, shape[stacked:]


def _hf_arrays(directory: Path, cfg: ModelConfig, abstract: dict) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(param path, float32 host array in meshlm's layout) for each parameter of an HF checkpoint."""
    safetensors = _safetensors()
    files, _ = _checkpoint_files(directory)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safetensors.safe_open(f, framework="flax")) for f in files]
        file_of = {name: h for h in handles for name in h.keys()}
        rope_interleave = bool(json.loads((directory / "config.json").read_text()).get("rope_interleave", True))
        for t, shape, layered, one in _shapes(cfg, abstract, rope_interleave):
            parts = []
            for name in _hf_names(t, cfg.n_layers):
                if name not in file_of:
                    raise ValueError(f"missing tensor {name!r} in {str(directory)!r}")
                x = np.asarray(jax.device_get(file_of[name].get_tensor(name)), np.float32)
                if x.shape != _hf_shape(one, t.n_in):
                    raise ValueError(f"tensor {name!r} in {str(directory)!r} has shape {list(x.shape)}, expected "
                                     f"{list(_hf_shape(one, t.n_in))}")
                parts.append(np.asarray(_from_hf(x, t.n_in, one, t.order)))
            yield t.path, np.stack(parts).reshape(shape) if layered else parts[0]


def _gguf_arrays(path: Path, cfg: ModelConfig, abstract: dict) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(param path, float32 host array in meshlm's layout) for each parameter of a GGUF file (as load_gguf)."""
    import gguf

    from model.gguf import _MODEL_ARCH, _dequantize, _gguf_name, _undo_rope_permutation, gguf_metadata

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = gguf_metadata(path)["general.architecture"]
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], cfg.n_layers)
    rope_heads = {("attn", "wq"): cfg.n_heads, ("attn", "wk"): cfg.n_kv_heads} if arch == "llama" else {}
    for t, shape, layered, one in _shapes(cfg, abstract):
        out = np.empty(shape, np.float32)
        flat = out.reshape(-1, *one) if layered else out  # a view: one HF tensor per row
        for i, hf_name in enumerate(_hf_names(t, cfg.n_layers)):
            name = _gguf_name(hf_name, names)
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r} in {str(path)!r}")
            w = _dequantize(tensors[name])
            if t.path[1:] in rope_heads:
                w = _undo_rope_permutation(w, rope_heads[t.path[1:]])
            flat[i if layered else ...] = _from_hf(w, t.n_in, one)
        yield t.path, out


def _placed(host: np.ndarray, like: jax.ShapeDtypeStruct) -> jax.Array:
    """`host` cast to `like`'s dtype and placed on `like.sharding`, each device getting only its slice."""
    if tuple(host.shape) != tuple(like.shape):
        raise ValueError(f"pretrained tensor of shape {list(host.shape)} for a parameter of shape {list(like.shape)}")
    return jax.make_array_from_callback(like.shape, like.sharding,
                                        lambda index: np.asarray(host[index], dtype=like.dtype))


def load_pretrained_params(spec: str, cfg: ModelConfig, abstract: dict, shardings: dict) -> dict:
    """The parameters of the pretrained source `spec` as a pure dict shaped like `abstract` (ShapeDtypeStructs of
    the run's model, `cfg`), each array in its sharding from `shardings`. Raises ValueError naming a field of `cfg`
    that differs from the source's, or a missing or misshaped tensor."""
    kind, path, step = init_source(spec)
    check_matches_source(cfg, source_model_config(spec), spec)
    like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if kind == "run":
        return _restore_run_params(path, step, like)
    arrays = _hf_arrays(path, cfg, abstract) if kind == "hf" else _gguf_arrays(path, cfg, abstract)
    params: dict = {}
    for param_path, host in arrays:
        _set_nested(params, param_path, _placed(host, _nested(like, param_path)))
    if jax.tree.structure(params) != jax.tree.structure(like):
        raise ValueError(f"--init {spec!r} does not give every parameter of the model")
    return params


def _restore_run_params(run: Path, step: int | None, like: dict) -> dict:
    """The parameters of `run`'s checkpoint `step` (None: its newest that restores; a newer damaged one is reported
    and left in place), through the restore `load_params` uses; an error names the --init source."""
    from train.checkpoint import CheckpointError, restore_run_params

    try:
        return restore_run_params(run, step, like)[1]
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"--init run:{run}{'' if step is None else f'@{step}'}: {e}") from e
