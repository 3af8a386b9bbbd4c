"""scripts/bench_verify_cost: the matrices it multiplies are the model's weights, every byte once (the 1-D norm
scales aside), one per layer and weight."""

from __future__ import annotations

import math

import jax
from flax import nnx

from model.presets import get_preset
from model.transformer import create_model
from scripts.bench_verify_cost import weight_matrices


def test_the_matrices_are_the_models_weights_once_each():
    cfg = get_preset("tiny")
    params = nnx.state(create_model(cfg), nnx.Param)
    matrices = weight_matrices(params)
    leaves = jax.tree.leaves(params)
    assert sum(m.size for m in matrices) == sum(x.size for x in leaves if x.ndim >= 2)
    assert len(matrices) == cfg.n_layers * sum(x.ndim >= 3 for x in leaves) + sum(x.ndim == 2 for x in leaves)
    assert all(m.ndim == 2 and math.prod(m.shape) == m.size for m in matrices)
    assert (cfg.d_model, cfg.vocab_size) in {m.shape for m in matrices}  # the tied head, as the step uses it
