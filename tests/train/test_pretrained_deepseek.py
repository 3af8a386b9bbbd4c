"""`train.init = hf:DIR` from a DeepSeek-V3 checkpoint (multi-head latent attention with interleaved rotary rows,
a dense first layer, MoE layers with a selection bias): the run's parameters give transformers' logits.

Tolerance as tests/train/test_pretrained.py: float32 on both sides, 2e-4 absolute on logits of order 1."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from parallel.mesh import MeshConfig
from tests.model.test_hf_deepseek import TOKENS, _hf_model
from tests.train.test_pretrained import loaded_params, run_config


@pytest.mark.slow
def test_init_from_a_deepseek_checkpoint_gives_transformers_logits(tmp_path):
    hf_model = _hf_model()
    hf_model.save_pretrained(tmp_path)
    plan, params = loaded_params(run_config(tmp_path), MeshConfig(data=1), jax.devices()[:1])
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(TOKENS)).logits.numpy()
    logits = np.asarray(nnx.merge(plan.graphdef, params)(jax.numpy.asarray(TOKENS.astype(np.int32))))
    np.testing.assert_allclose(logits, expected, atol=2e-4)
