"""One model step over the paged KV cache: the flat ragged token batch of serve/step_batch.py through the model,
K/V written into their pages, attention over each row's cached sequence, logits of each sampling slot.

The model's own blocks run (`model.transformer.Block` with an `attend` hook), so serving computes exactly the
math of training; only attention changes: it reads keys and values from the pages
(serve/ragged_attention.py). MLA layers get a `model.mla.LatentAttend` hook instead: they cache each token's
latent and rotary key, and attend in the absorbed form (W_UK folded into the query, W_UV applied to the latent
context) for decode rows and prefill tiles alike; an unabsorbed prefill (expanding K/V per head from the cached
latents, as vLLM does for long prompts: fewer FLOPs when T is large) is a later optimisation. The whole cache
(serve/kv_cache.py: all layers in one pool, layer l's pages offset by l * num_pages) is threaded through the
layers and updated in place. The layers run one of two ways, decided by the structure of the block weights
(`StepParams.stacks`; see `split_for_serving`, `unstacked`):
- stacked (leading layer axis): one `jax.lax.scan`, so the compile time does not grow with depth;
- a tuple of per-layer weights: a Python loop, one copy of the block per layer in the program. XLA:CPU copies
  each layer's weights out of a stack before its matmuls (its dot library takes whole buffers), which the loop
  avoids, at the price of a compile time that grows with depth: 3.5x for SmolLM2's 30 layers, for a decode step
  7% faster on a quiet 2-core CPU (docs/BENCHMARKS.md), so the scan is the default.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import rope_tables
from model.mla import LatentAttend, softmax_scale
from model.transformer import Attend, dense_layers
from serve.kv_cache import KVCache, layer_pages, write_pages
from serve.ragged_attention import ragged_latent_attention, ragged_paged_attention
from serve.step_batch import StepInputs

LAYER_LOOPS = ("scan", "unrolled")  # see the module docstring


class StepGraph(NamedTuple):
    """The static structure of a served model: the model without its blocks, and one block of each stack (an MoE
    model with dense first layers has two: `Transformer.dense_blocks`, then `Transformer.blocks`)."""

    model: nnx.GraphDef
    blocks: tuple[nnx.GraphDef, ...]


class StepParams(NamedTuple):
    """A served model's weights: everything but the blocks, and each stack's blocks, stacked or one State per
    layer."""

    rest: nnx.State
    stacks: tuple[nnx.State | tuple[nnx.State, ...], ...]


def split_for_serving(model: nnx.Module) -> tuple[StepGraph, StepParams]:
    """The static structure and the weights of `model` (a `model.transformer.Transformer`) for `model_step`, its
    blocks stacked (the scanned loop; `unstacked` gives the unrolled loop's weights)."""
    graphdef, state = nnx.split(model)
    shell = nnx.merge(graphdef, state)  # a copy whose blocks can be taken out without touching `model`
    names = ("dense_blocks", "blocks") if dense_layers(model.cfg) else ("blocks",)
    graphs, stacks = [], []
    for name in names:
        block_graphdef, stacked = nnx.split(getattr(shell, name))
        setattr(shell, name, None)
        graphs.append(block_graphdef)
        stacks.append(stacked)
    rest_graphdef, rest = nnx.split(shell)
    return StepGraph(rest_graphdef, tuple(graphs)), StepParams(rest, tuple(stacks))


def unstacked(params: StepParams) -> StepParams:
    """The same weights with the blocks as one State per layer (new arrays: the unrolled loop's)."""

    def layers(stacked: nnx.State) -> tuple[nnx.State, ...]:
        n_layers = jax.tree.leaves(stacked)[0].shape[0]
        return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers))

    return params._replace(stacks=tuple(layers(stacked) for stacked in params.stacks))


def paged_attend(cfg: ModelConfig, pools: list[jax.Array], inputs: StepInputs, layer: jax.Array | int,
                 num_pages: int, decode_impl: str) -> Attend | LatentAttend:
    """The attention hook of layer `layer` of a model (`cfg`) whose cache pools are `pools` ([k, v], replaced in
    the list as the hook writes them): it writes this step's tokens' K/V (MLA: latent and rotary key) at their
    slots and attends over each row's pages; `model_step` passes one per layer, a draft head one for its layer."""
    pages_1xT = layer_pages(inputs.pages_T, layer, num_pages)[None]
    offsets_1xT = inputs.offsets_T[None]
    tables = (inputs.positions_T, layer_pages(inputs.decode_tables_BxW, layer, num_pages), inputs.decode_lengths_B,
              layer_pages(inputs.tile_tables_NtxW, layer, num_pages), inputs.tile_lengths_Nt)
    decode_width = inputs.drafts_BxNd.shape[1] + 1

    def attend(q_1xTxHxDh: jax.Array, k_1xTxKxDh: jax.Array, v_1xTxKxDh: jax.Array) -> jax.Array:
        pools[0] = write_pages(pools[0], k_1xTxKxDh, pages_1xT, offsets_1xT)
        pools[1] = write_pages(pools[1], v_1xTxKxDh, pages_1xT, offsets_1xT)
        return ragged_paged_attention(q_1xTxHxDh[0], *pools, *tables, decode_impl=decode_impl,
                                      decode_width=decode_width)[None]

    def attend_latent(q_c_1xTxHxDc: jax.Array, q_p_1xTxHxDp: jax.Array, c_1xTxDc: jax.Array,
                      k_pe_1xTxDp: jax.Array) -> jax.Array:
        pools[0] = write_pages(pools[0], c_1xTxDc[:, :, None], pages_1xT, offsets_1xT)
        pools[1] = write_pages(pools[1], k_pe_1xTxDp[:, :, None], pages_1xT, offsets_1xT)
        return ragged_latent_attention(q_c_1xTxHxDc[0].astype(pools[0].dtype), q_p_1xTxHxDp[0], *pools, *tables,
                                       scale=softmax_scale(cfg), decode_impl=decode_impl,
                                       decode_width=decode_width)[None]

    return LatentAttend(attend_latent) if cfg.mla.enabled else attend


def model_step(graph: StepGraph, params: StepParams, cache: KVCache, inputs: StepInputs, *,
               decode_impl: str = "reference") -> tuple[jax.Array, KVCache]:
    """Run `inputs` through the model, writing their K/V (MLA: latents and rotary keys) into `cache` (and their
    last hidden states into `cache.features` if it has that pool). Returns the float32 logits [Rs, V] of each
    sampling slot's last token and the updated cache. `decode_impl` is "pallas" or "reference"
    (serve/ragged_attention.py `resolve_decode_impl` turns "auto" into one of them)."""
    if decode_impl not in ("pallas", "reference"):
        raise ValueError(f"model_step needs decode_impl 'pallas' or 'reference', got {decode_impl!r}")
    model = nnx.merge(graph.model, params.rest)
    cfg = model.cfg
    num_pages = cache.k.shape[1] // cfg.n_layers
    x_1xTxD = model.embed_tokens(inputs.tokens_T[None])
    cos, sin = rope_tables(jnp.maximum(inputs.positions_T[None], 0), cfg.rope_dim, cfg.rope_theta,
                           cfg.rope_scaling)

    def layer(block: nnx.GraphDef, x_1xTxD: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
              layer_state: nnx.State, index: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
        pools = [k_pool, v_pool]
        hook = paged_attend(cfg, pools, inputs, index, num_pages, decode_impl)
        x_1xTxD, _ = nnx.merge(block, layer_state)(x_1xTxD, cos, sin, hook)
        return x_1xTxD, pools[0], pools[1]

    k_pool, v_pool, first = cache.k, cache.v, 0
    for block, stack in zip(graph.blocks, params.stacks, strict=True):
        if isinstance(stack, tuple):
            for index, layer_state in enumerate(stack, start=first):
                x_1xTxD, k_pool, v_pool = layer(block, x_1xTxD, k_pool, v_pool, layer_state, index)
            first += len(stack)
        else:
            def body(carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[nnx.State, jax.Array],
                     block: nnx.GraphDef = block) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
                return layer(block, *carry, *xs), None

            n_stack = jax.tree.leaves(stack)[0].shape[0]
            (x_1xTxD, k_pool, v_pool), _ = jax.lax.scan(body, (x_1xTxD, k_pool, v_pool),
                                                        (stack, first + jnp.arange(n_stack)))
            first += n_stack
    features = cache.features
    if features is not None:  # the last hidden state of every token, for a draft head
        features = write_pages(features, x_1xTxD[:, :, None], inputs.pages_T[None], inputs.offsets_T[None])
    last_1xRsxD = x_1xTxD[:, inputs.last_Rs]
    return model.logits(last_1xRsxD)[0], KVCache(k_pool, v_pool, features)
