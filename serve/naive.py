"""Naive batched generation: every step recomputes the whole (fixed-size) window, no KV cache.

Slow but obviously correct, and one compiled shape for the whole run: the reference decoder that faster engines
are tested against, and the demo's generator until the paged engine arrives."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import for_inference
from serve.sampling import sample_rows


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens (fewer if a `stop_ids` token is produced, which is
    kept); with temperature > 0 every row draws from the stream of `seed` (serve/sampling.py `sample_rows`).
    Raises ValueError if a prompt is empty or prompt + new tokens exceeds the model's context."""
    model = for_inference(model)
    max_len = model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"context of {max_len}")
    graphdef, params = nnx.split(model)
    width = max(len(p) for p in prompts) + max_new_tokens
    buf = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)

    B = len(prompts)
    per_row = (jnp.full(B, seed, jnp.uint32), jnp.full(B, temperature, jnp.float32), jnp.full(B, top_k, jnp.int32),
               jnp.full(B, top_p, jnp.float32))

    @jax.jit
    def step(params, tokens_BxW, lengths_B, t):
        logits_BxWxV = nnx.merge(graphdef, params)(tokens_BxW)
        last_BxV = jnp.take_along_axis(logits_BxWxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        seeds, temperatures, top_ks, top_ps = per_row
        return sample_rows(last_BxV, seeds, jnp.full(B, t, jnp.int32), temperatures, top_ks, top_ps)

    done = np.zeros(len(prompts), bool)
    stops = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    tokens = jnp.asarray(buf)
    for t in range(max_new_tokens):
        new = np.asarray(step(params, tokens, jnp.asarray(lengths), t))
        for i in np.flatnonzero(~done):
            outputs[i].append(int(new[i]))
            done[i] = int(new[i]) in stops
        tokens = tokens.at[np.arange(len(prompts)), lengths].set(jnp.asarray(new))  # finished rows: ignored
        lengths = np.minimum(lengths + 1, width - 1)
        if done.all():
            break
    return outputs
