"""The layout of Hugging Face tensors against meshlm's parameters (model/hf.py, model/hf_deepseek.py, model/gguf.py
and train/pretrained.py share it): one row per parameter, the HF names it stacks, and the reshapes between them;
and `require`, a config.json field that the layout cannot do without."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np


def require(hf_config: dict, key: str) -> Any:
    """`hf_config[key]`, refused with a ValueError naming the key and the model_type when missing or null."""
    if hf_config.get(key) is None:
        raise ValueError(f"HF config has no {key!r}; it is required for model_type {hf_config.get('model_type')!r}")
    return hf_config[key]


class _Tensor(NamedTuple):
    """One meshlm parameter and its HF tensor. `n_in` is how many leading meshlm axes are the input of an HF
    Linear (stored [out, in]): HF = ours.reshape(prod(in), -1).T; 0 means the same layout, None a flattened bias.
    Per-layer tensors have "{i}" in `hf_name` and a leading layers axis on our side (HF layers `layers`, a
    (first, stop) range; None: all); per-expert ones also "{j}" and, after the layers axis, an experts axis of
    `n_experts`. `order`, where given, is our last axis as HF's (after the reshape) taken in that order."""

    path: tuple[str, ...]
    hf_name: str
    n_in: int | None
    n_experts: int = 0
    layers: tuple[int, int] | None = None
    order: tuple[int, ...] | None = None


def _stacked(t: _Tensor) -> int:
    """How many leading meshlm axes (layers, experts) one HF tensor of `t` is a slice of."""
    return ("{i}" in t.hf_name) + ("{j}" in t.hf_name)


def _hf_names(t: _Tensor, n_layers: int) -> list[str]:
    """`t`'s HF names in the order of its stacked meshlm axes (layer-major, then expert)."""
    layers = range(*t.layers) if t.layers else range(n_layers)
    if "{j}" in t.hf_name:
        return [t.hf_name.format(i=i, j=j) for i in layers for j in range(t.n_experts)]
    return [t.hf_name.format(i=i) for i in layers] if "{i}" in t.hf_name else [t.hf_name]


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return (math.prod(shape),)
    if n_in == 0:
        return tuple(shape)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_hf(x: np.ndarray, n_in: int | None, order: tuple[int, ...] | None = None) -> np.ndarray:
    if order is not None:
        x = x[..., np.argsort(order)]
    if n_in is None:
        return x.reshape(-1)
    if n_in == 0:
        return x
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def _from_hf(x: jax.Array, n_in: int | None, shape: tuple[int, ...], order: tuple[int, ...] | None = None
             ) -> jax.Array:
    x = (x if n_in in (None, 0) else x.T).reshape(shape)
    return x if order is None else x[..., np.asarray(order)]
