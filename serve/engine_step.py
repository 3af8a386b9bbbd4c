"""The engine's device step: one model forward over a flat ragged batch (serve/forward.py), then each row's next
token sampled (serve/sampling.py) or, for decode rows with drafted tokens, verified (serve/speculative.py), on the
device. Compiled once per step shape and shared by every engine, and by static batching (serve/static.py), serving
the same model structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from serve.compiled import CompiledPerShape, shared_compiled
from serve.forward import StepGraph, StepParams, model_step
from serve.kv_cache import KVCache
from serve.sampling import sample_rows, token_logprobs
from serve.speculative import verify_rows
from serve.step_batch import SamplingInputs, StepInputs


def device_step(graph: StepGraph, decode_impl: str, params: StepParams, cache: KVCache,
                 prev_tokens: jax.Array, inputs: StepInputs, sampling: SamplingInputs,
                 draft: tuple[jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array], KVCache, jax.Array]:
    """The model step and the sampler. Tokens marked `from_prev_T` >= 0 are the previous step's sampled tokens
    (`prev_tokens`, that step's output padded to a fixed length), which the host has not read yet. Decode rows with
    drafted tokens (`inputs.drafts_BxNd`, or `draft`'s tokens [Bd, Nd] and their draft probabilities [Bd, Nd, V]
    from a draft model, still on the device) are verified (serve/speculative.py): their Td = Nd + 1 slots hold the
    tokens they emit, -1 past the last. Returns the tokens [Rs], their log-probabilities and the top ones
    (serve/sampling.py `token_logprobs`; zeros when no slot asked), the cache, and the tokens padded for the next
    step."""
    from_prev_T = inputs.from_prev_T
    tokens_T = jnp.where(from_prev_T >= 0, prev_tokens[jnp.maximum(from_prev_T, 0)], inputs.tokens_T)
    Bd, Nd = inputs.drafts_BxNd.shape
    Td = Nd + 1
    drafts_BxNd, draft_probs = inputs.drafts_BxNd, None
    if draft is not None:
        drafts_BxNd = jnp.where(drafts_BxNd >= 0, draft[0], -1)
        draft_probs = draft[1]
        decode_BxTd = tokens_T[:Bd * Td].reshape(Bd, Td).at[:, 1:].set(jnp.maximum(drafts_BxNd, 0))
        tokens_T = jnp.concatenate([decode_BxTd.reshape(-1), tokens_T[Bd * Td:]])
    logits_RsxV, cache = model_step(graph, params, cache, inputs._replace(tokens_T=tokens_T),
                                   decode_impl=decode_impl)
    if Nd == 0:
        tokens_Rs = sample_rows(logits_RsxV, *sampling[:-1])
    else:
        rows = [a[:Bd * Td:Td] for a in sampling[:-1]]  # a decode row's Td slots share its parameters
        seeds, counters, temperature, top_k, top_p, min_p = rows
        emitted_BxTd = verify_rows(logits_RsxV[:Bd * Td].reshape(Bd, Td, -1), drafts_BxNd, draft_probs, seeds,
                                   counters, temperature, top_k, top_p, min_p)
        parts = [emitted_BxTd.reshape(-1)]
        if logits_RsxV.shape[0] > Bd * Td:
            parts.append(sample_rows(logits_RsxV[Bd * Td:], *(a[Bd * Td:] for a in sampling[:-1])))
        tokens_Rs = jnp.concatenate(parts)
    logprobs = token_logprobs(logits_RsxV, jnp.maximum(tokens_Rs, 0), jnp.any(sampling.logprobs_Rs))
    Rs = min(tokens_Rs.shape[0], prev_tokens.shape[0])
    return tokens_Rs, logprobs, cache, jnp.zeros_like(prev_tokens).at[:Rs].set(tokens_Rs[:Rs])


def compiled_steps(graph: StepGraph, decode_impl: str) -> CompiledPerShape:
    """The engine step of this model structure and decode implementation, compiled once per step shape and shared
    by every engine serving that structure (serve/compiled.py); the cache and the previous tokens are donated.
    Callers pass every argument, `draft` too (None without a draft model): the shapes of what is passed are the
    key."""
    return shared_compiled(device_step, graph, decode_impl, donate=(1, 2))
