"""The draft-head proposer of speculative decoding: an EAGLE-style head (model/draft_head.py) drafts k tokens per
decoding sequence from the target's own last hidden states, and the target verifies them in its next step.

The target's step writes every token's last hidden state (its feature f_i) into a feature pool beside its KV cache
(`KVCache.features`, the same page slots). The head is one decoder layer over pairs [f_i, e(x_{i+1})] at position i;
its K/V lives in a one-layer paged pool over the target's page ids, like a draft model's (serve/draft_model.py), so
allocation, preemption and prefix sharing need nothing of their own. `RequestState.num_draft_computed` counts the
pairs whose head K/V was made from the target's real features; before drafting, the head catches up on the pairs
[num_draft_computed, N - 1) of a sequence of N tokens (the features of the tokens the target computed since: the
prompt the first time, then those the last verification accepted; serve/draft_model.py `catch_up_batch`: the older
pairs as prefill steps, each row's last k + 1 at most as one decode row, in shapes `HeadRunner.warmup` compiles up
front), whose last pair's output g_{N-2} predicts f_{N-1} and, through the target's final norm and LM head, the
first draft d_1. Then k - 1 steps feed the head its own output: pair N-2+j is [g_{N-3+j}, e(d_j)], giving d_{j+1}
(EAGLE's feature autoregression). Those pairs were made from predicted features, so they do not count: the next
catch-up recomputes them from the target's real ones.

Method "mtp" runs the same way with the target's own depth-1 multi-token prediction module as the head
(`model.draft_head.mtp_draft_head`: a head of style "mtp", whose own output norm precedes the target's LM head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.draft_head import DraftHead, check_compatible
from serve.compiled import shared_compiled
from serve.draft_model import CatchUp, catch_up_batch, draft_tokens, positions_of, warm_drafter
from serve.forward import StepGraph, paged_attend
from serve.kv_cache import CacheShape, KVCache, init_cache
from serve.scheduler import ScheduledChunk
from serve.step_batch import StepInputs

if TYPE_CHECKING:
    from serve.engine import Engine


def _head_forward(head_graph: nnx.GraphDef, head_params: nnx.State, target_graph: StepGraph, target_rest: nnx.State,
                  pool: KVCache, inputs: StepInputs, features_TxD: jax.Array, decode_impl: str
                  ) -> tuple[jax.Array, jax.Array, KVCache]:
    """The head over a ragged batch of pairs (`inputs.tokens_T` the next tokens, `features_TxD` the features):
    (g [T, D], the head's logits of each sampling slot's g [Rs, V] (`DraftHead.logits`), the head's pool)."""
    head = nnx.merge(head_graph, head_params)
    target = nnx.merge(target_graph.model, target_rest)
    pools = [pool.k, pool.v]
    attend = paged_attend(head.cfg.block_config, pools, inputs, 0, pool.k.shape[1], decode_impl)
    g_1xTxD = head(features_TxD[None], target.embed_tokens(inputs.tokens_T[None]),
                   jnp.maximum(inputs.positions_T, 0)[None], attend)
    logits_RsxV = head.logits(target, g_1xTxD[:, inputs.last_Rs])[0]
    return g_1xTxD[0], logits_RsxV, KVCache(pools[0], pools[1])


def _fill(head_graph: nnx.GraphDef, target_graph: StepGraph, decode_impl: str, head_params: nnx.State,
          pool: KVCache, target_rest: nnx.State, features: jax.Array, inputs: StepInputs) -> KVCache:
    """Write the head K/V of a catch-up's older pairs (`inputs`, prefill tiles; features read from the target's
    pool at the pairs' own slots); no logits are needed."""
    features_TxD = features[0, inputs.pages_T, inputs.offsets_T]
    return _head_forward(head_graph, head_params, target_graph, target_rest, pool, inputs, features_TxD,
                         decode_impl)[2]


def _catch_up(head_graph: nnx.GraphDef, target_graph: StepGraph, decode_impl: str, head_params: nnx.State,
              pool: KVCache, target_rest: nnx.State, features: jax.Array, catch_up: StepInputs, row_slots_B: jax.Array
              ) -> tuple[jax.Array, jax.Array, KVCache]:
    """The pairs the head has not made from real features (`catch_up`; features read from the target's pool at
    the pairs' own slots). Returns each row's last pair's logits [B, V] and output g [B, D], and the pool."""
    features_TxD = features[0, catch_up.pages_T, catch_up.offsets_T]
    g_TxD, logits_RsxV, pool = _head_forward(head_graph, head_params, target_graph, target_rest, pool, catch_up,
                                             features_TxD, decode_impl)
    return logits_RsxV[row_slots_B], g_TxD[catch_up.last_Rs[row_slots_B]], pool


def _draft_k(head_graph: nnx.GraphDef, target_graph: StepGraph, decode_impl: str, page_size: int, k: int,
             head_params: nnx.State, pool: KVCache, target_rest: nnx.State, logits_BxV: jax.Array, g_BxD: jax.Array,
             positions_B: jax.Array, tables_BxW: jax.Array, sampling_B: tuple[jax.Array, ...]
             ) -> tuple[jax.Array, jax.Array, KVCache]:
    """k drafts per row from its last real pair (at `positions_B[b]`; -1: a pad row): the first from `logits_BxV`,
    then pairs [g, e(d_j)] one position further each. Returns drafts [B, k], q [B, k, V], the pool."""
    def step(state: tuple[jax.Array, KVCache], inputs: StepInputs) -> tuple[jax.Array, tuple[jax.Array, KVCache]]:
        g_BxD, pool = state
        g_out_BxD, logits, pool = _head_forward(head_graph, head_params, target_graph, target_rest, pool, inputs,
                                                g_BxD, decode_impl)
        return logits, (g_out_BxD, pool)

    drafts_BxK, q_BxKxV, (_, pool) = draft_tokens(step, (g_BxD, pool), logits_BxV, positions_B, tables_BxW,
                                                  page_size, k, sampling_B)
    return drafts_BxK, q_BxKxV, pool


class HeadRunner:
    """A draft head beside an engine: its weights, its one-layer pool over the engine's page ids, and the feature
    pool it adds to the engine's cache."""

    def __init__(self, head: DraftHead, engine: Engine, ks: Sequence[int]):
        check_compatible(head.cfg, engine.model_cfg)
        cfg = head.cfg.block_config
        self.engine, self.max_k = engine, max(ks)
        self.head_graph, self.head_params = nnx.split(head)
        ps, num_pages = engine.cfg.page_size, engine.cache_shape.num_pages
        dtype = str(engine.model_cfg.compute_dtype)
        self.pool = init_cache(CacheShape.for_model(cfg, ps, num_pages, dtype))
        engine.cache = engine.cache._replace(features=jnp.zeros((1, num_pages, ps, engine.model_cfg.d_model), dtype))
        self.layout, self.max_tiles = engine.layout, engine.max_tiles
        self._fill = shared_compiled(_fill, self.head_graph, engine.graph, engine.decode_impl)
        self._catch_up = shared_compiled(_catch_up, self.head_graph, engine.graph, engine.decode_impl)
        self._draft_k = {k: shared_compiled(_draft_k, self.head_graph, engine.graph, engine.decode_impl, ps, k)
                         for k in ks if k}

    def draft(self, decodes: Sequence[ScheduledChunk], inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        """Draft k tokens (the target step's drafts per row) for each decode row of the target's step `inputs`
        (rows in `decodes` order, padded to its Bd): (drafts [Bd, k], q [Bd, k, V]) on the device."""
        Bd, k = inputs.drafts_BxNd.shape
        # pairs [start, N - 1): the tokens after them, x_{start+1} .. x_{N-1}, at the pairs' positions
        starts = [min(c.seq.num_draft_computed, c.seq.num_tokens - 2) for c in decodes]
        for chunk in decodes:
            chunk.seq.num_draft_computed = chunk.seq.num_tokens - 1
        # after a verification the head lacks the pairs of the accepted tokens and the bonus: at most k + 1 for
        # the largest k the engine drafts (one catch-up shape whatever k the last step drafted)
        catch_up = catch_up_batch(decodes, starts, self.layout, Bd, self.max_k + 1, self.max_tiles, shift=1)
        return self._run(catch_up, positions_of([c.seq.num_tokens - 2 for c in decodes], Bd),
                         inputs.decode_tables_BxW, k)

    def _run(self, catch_up: CatchUp, positions_B: np.ndarray, tables_BxW: np.ndarray, k: int
             ) -> tuple[jax.Array, jax.Array]:
        """The catch-up's fills and step, then k drafts from each row's last pair (at `positions_B`)."""
        rest, features = self.engine.params.rest, self.engine.cache.features
        for fill in catch_up.fills:
            self._write(fill)
        logits_BxV, g_BxD, self.pool = self._catch_up(self.head_params, self.pool, rest, features, catch_up.step,
                                                      catch_up.row_slots)
        drafts, q, self.pool = self._draft_k[k](self.head_params, self.pool, rest, logits_BxV, g_BxD, positions_B,
                                                tables_BxW, catch_up.sampling)
        return drafts, q

    def _write(self, fill: StepInputs) -> None:
        """Write the head K/V of a catch-up's older pairs (prefill tiles; features from the target's pool)."""
        self.pool = self._fill(self.head_params, self.pool, self.engine.params.rest, self.engine.cache.features, fill)

    def warmup(self, widths: Sequence[int]) -> None:
        """Compile the catch-up (k_max + 1 pairs a row) and drafting of each k at each width in `widths`
        (`serve.draft_model.warm_drafter`)."""
        warm_drafter(self.layout, self.max_tiles, widths, tuple(self._draft_k), self.max_k + 1, self._write, self._run)

    @property
    def compile_count(self) -> int:
        """Shapes compiled for this head structure (catch-up prefills and steps, and drafting)."""
        return self._fill.count + self._catch_up.count + sum(d.count for d in self._draft_k.values())
