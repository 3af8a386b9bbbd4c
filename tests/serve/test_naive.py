"""Sampling rules and the naive generator, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.presets import get_preset
from model.transformer import create_model
from serve.naive import generate
from serve.sampling import sample_rows


def sample(logits, seed=0, temperature=1.0, top_k=0, top_p=1.0):
    """Every row with the same parameters, each from its own stream (seed + row)."""
    B = logits.shape[0]
    return sample_rows(logits, jnp.arange(B, dtype=jnp.uint32) + seed, jnp.zeros(B, jnp.int32),
                       jnp.full(B, temperature), jnp.full(B, top_k), jnp.full(B, top_p))


def test_greedy_is_argmax():
    logits = jnp.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]


def test_top_k_and_top_p_only_draw_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    top2 = np.asarray(sample(logits, top_k=2))
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is below 0.7, so the nucleus is {0, 1}; their renormalised odds are 5:3.
    nucleus = np.asarray(sample(logits, top_p=0.7))
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(np.mean(nucleus == 0) - 0.625) < 0.03  # 4000 draws: std ~0.008
    everything = np.asarray(sample(logits))
    np.testing.assert_allclose(np.bincount(everything, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_greedy_generation_matches_step_by_step_argmax():
    model = create_model(get_preset("tiny").replace(dtype="float32"), seed=3)
    prompts = [[5, 6, 7, 8, 9], [100, 101]]
    outs = generate(model, prompts, 6, temperature=0.0)
    forward = jax.jit(lambda tokens: model(tokens))  # eager op-by-op dispatch of the layer loop costs ~20 s
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt)
        for _ in range(6):  # the reference: the whole sequence, unpadded, one token at a time
            seq.append(int(jnp.argmax(forward(jnp.array([seq]))[0, -1])))
        assert out == seq[len(prompt):]


def test_generation_rejects_empty_and_too_long_prompts():
    model = create_model(get_preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, [[1] * 60], 10)
