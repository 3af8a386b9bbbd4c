"""The draft-model proposer of speculative decoding: a smaller model with the target's vocabulary drafts k tokens per
decoding sequence on the device, and the target verifies them in the same step's forward.

The draft model keeps its own paged KV cache with the target's page ids: a sequence's block table indexes both
pools, so allocation, preemption, prefix sharing and the roll-back of rejected tokens need nothing of their own. The
draft catches up lazily: `RequestState.num_draft_computed` tokens of a sequence have draft K/V (reset to 0 when it
is admitted or preempted, since shared or recycled pages may hold another sequence's draft K/V); before drafting,
the draft runs its missing tokens -- the whole prompt the first time, then the one or two tokens the last
verification added -- samples the first draft token from the last one's logits, and then decodes k - 1 more tokens in
a `jax.lax.scan` (compiled per decode rows and table width); the outputs (drafts [Bd, k] and their draft
distributions q [Bd, k, V]) stay on the device for the target's step. A catch-up (`catch_up_batch`) runs each row's
last two tokens at most as a decode row of a step with the target's Bd rows, and any older ones first, as prefill
steps of at most `Engine.max_tiles` tiles each (the most a target step has), so its shapes are the target's buckets:
(Bd, W) for the step and drafting, (Nt, W) for the prefills, which `DraftRunner.warmup` compiles up front (called
from `Engine.warmup`).
Drafted positions the target rejects are beyond the sequence's length afterwards; the count `min(num_draft_computed,
num_computed)` leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import for_inference
from serve.compiled import shared_compiled
from serve.forward import StepGraph, StepParams, model_step, split_for_serving
from serve.kv_cache import CacheShape, KVCache, init_cache
from serve.sampling import filtered_logits, row_key
from serve.scheduler import ScheduledChunk
from serve.step_batch import Row, StepInputs, StepLayout, build_step, padding_step, tiles_for

if TYPE_CHECKING:
    from serve.engine import Engine

DraftState = TypeVar("DraftState")  # what a drafter's step carries: a KV cache, or a head's (g, pool)


def sample_draft(logits_BxV: jax.Array, seeds_B: jax.Array, counters_B: jax.Array, temperature_B: jax.Array,
                 top_k_B: jax.Array, top_p_B: jax.Array, min_p_B: jax.Array, j: jax.Array | int
                 ) -> tuple[jax.Array, jax.Array]:
    """Draft token j of each row and its draft distribution q [B, V] (the row's own filtered distribution; greedy
    rows take the argmax, their q is unused). The key is the row's draw key folded with 1 + j, apart from the ones
    verification uses. An all-greedy batch skips the filtering's sort of the vocabulary (as `sample_rows` does);
    its q is zeros, which verification's greedy rule never reads."""
    def one(logits_V: jax.Array, seed: jax.Array, counter: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array, min_p: jax.Array) -> tuple[jax.Array, jax.Array]:
        filtered_V = filtered_logits(logits_V, temperature, top_k, top_p, min_p)
        drawn = jax.random.categorical(jax.random.fold_in(row_key(seed, counter), 1 + j), filtered_V)
        token = jnp.where(temperature == 0, jnp.argmax(logits_V), drawn).astype(jnp.int32)
        return token, jax.nn.softmax(filtered_V)

    def drawn() -> tuple[jax.Array, jax.Array]:
        return jax.vmap(one)(logits_BxV, seeds_B, counters_B, temperature_B, top_k_B, top_p_B, min_p_B)

    def greedy() -> tuple[jax.Array, jax.Array]:
        return (jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32),
                jnp.zeros(logits_BxV.shape, jnp.float32))

    return jax.lax.cond(jnp.any(temperature_B != 0), drawn, greedy)


def decode_inputs(token_B: jax.Array, pos_B: jax.Array, tables_BxW: jax.Array, page_size: int) -> StepInputs:
    """A decode-only step's inputs on the device: row b's `token_B[b]` at `pos_B[b]` (-1: a pad row). A position
    past its block table (a row drafting beyond its lookahead) writes the null page."""
    B, W = tables_BxW.shape
    index_B = pos_B // page_size
    page_B = jnp.take_along_axis(tables_BxW, jnp.clip(index_B, 0, W - 1)[:, None], axis=1)[:, 0]
    page_B = jnp.where((pos_B >= 0) & (index_B < W), page_B, 0)
    return StepInputs(token_B, pos_B, page_B, jnp.maximum(pos_B, 0) % page_size, tables_BxW,
                      jnp.where(pos_B >= 0, pos_B + 1, 0), jnp.zeros((0, W), jnp.int32), jnp.zeros(0, jnp.int32),
                      jnp.arange(B, dtype=jnp.int32), jnp.full(B, -1, jnp.int32), jnp.zeros((B, 0), jnp.int32))


class CatchUp(NamedTuple):
    """A proposer's catch-up on the host: the prefill steps of its rows' older tokens (`fills`, run first, in order,
    for their K/V only), then the step of each row's last tokens (`step`: one decode row each), each row's sampling
    slot of its last token in that step [Bd] and its sampling parameters [Bd]."""

    fills: list[StepInputs]
    step: StepInputs
    row_slots: np.ndarray
    sampling: tuple[np.ndarray, ...]


def catch_up_batch(decodes: Sequence[ScheduledChunk], starts: Sequence[int], layout: StepLayout, Bd: int,
                   width: int, max_tiles: int, shift: int = 0) -> CatchUp:
    """A proposer's catch-up on the host: each decoding sequence's positions from `starts[i]` on, holding its
    tokens from `starts[i] + shift` to its last one (a draft head's pair i holds token i + 1), with the sampling
    parameters of its request. Each row's last `width` tokens at most (what one verification adds) are a decode row
    `width` tokens wide of a step with the target step's Bd rows, so the catch-up compiles one shape per (Bd, W)
    whatever each row accepted; the tokens before them (a prompt, after admission or after plain steps) fill
    prefill tiles of steps of at most `max_tiles` tiles (`fill_steps`), which compile per (Nt, W) like the target's
    prefills. Host arrays: a compiled call takes them with one transfer each."""
    rows, older = [], []
    for chunk, start in zip(decodes, starts, strict=True):
        seq, s = chunk.seq, chunk.seq.sampling
        ids = seq.all_ids[start + shift:seq.num_tokens]
        cut = max(0, len(ids) - width)
        if cut:
            older.append(Row(ids[:cut], start, seq.block_table))
        rows.append(Row(ids[cut:cut + 1], start + cut, seq.block_table, seed=s.seed, counter=len(seq.output_ids),
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                        drafts=ids[cut + 1:]))
    step, sampling, slots = build_step(rows, [], layout, width - 1, decode_rows=Bd)
    row_slots = np.zeros(Bd, np.int32)
    row_slots[:len(rows)] = [slot + len(row.drafts) for row, slot in zip(rows, slots, strict=True)]
    sampling_B = [np.zeros(Bd, a.dtype) for a in sampling[:-1]]
    for a, full in zip(sampling_B, sampling[:-1], strict=True):
        a[:len(rows)] = full[row_slots[:len(rows)]]
    return CatchUp(fill_steps(older, layout, max_tiles), step, row_slots, tuple(sampling_B))


def fill_steps(rows: Sequence[Row], layout: StepLayout, max_tiles: int) -> list[StepInputs]:
    """Prefill steps of `rows`' tokens, at most `max_tiles` tiles each (a longer row continues in the next step,
    after its earlier tokens' K/V is written), so a catch-up's prefill compiles only the target's tile buckets."""
    steps, batch, room = [], [], max_tiles
    for row in rows:
        ids, start = list(row.token_ids), row.start
        while ids:
            n = min(len(ids), room * layout.tile)
            batch.append(Row(ids[:n], start, row.block_table))
            ids, start, room = ids[n:], start + n, room - tiles_for([n], layout.tile)
            if room == 0:
                steps.append(build_step([], batch, layout)[0])
                batch, room = [], max_tiles
    if batch:
        steps.append(build_step([], batch, layout)[0])
    return steps


def positions_of(values: Sequence[int], Bd: int) -> np.ndarray:
    """`values` padded with -1 (pad rows) to Bd, int32."""
    out = np.full(Bd, -1, np.int32)
    out[:len(values)] = values
    return out


def padding_catch_up(bd: int, w: int, tile: int, width: int) -> CatchUp:
    """An all-padding catch-up of Bd rows `width` tokens wide and W pages (a warm-up's: it writes only the null
    page)."""
    step, sampling = padding_step(bd, 0, w, tile, width - 1)
    return CatchUp([], step, np.zeros(bd, np.int32), tuple(a[:bd] for a in sampling[:-1]))


def warm_drafter(layout: StepLayout, max_tiles: int, widths: Sequence[int], ks: Sequence[int], catch_up_width: int,
                 fill: Callable[[StepInputs], None], run: Callable[[CatchUp, np.ndarray, np.ndarray, int], object]
                 ) -> None:
    """A proposer's warm-up: `fill` (its catch-up's prefill) for every tile bucket up to `max_tiles`, and `run`
    (its catch-up step, `catch_up_width` tokens a row, then drafting k of `ks`) for every decode-row bucket, at
    each width in `widths` (the shapes the target's warm-up covers), on all-padding inputs, which write only the
    null page of the proposer's pool."""
    for w in widths:
        for nt in layout.tile_buckets(max_tiles):
            fill(padding_step(layout.max_decode_rows, nt, w, layout.tile)[0])
        for bd in layout.decode_buckets():
            for k in ks:
                run(padding_catch_up(bd, w, layout.tile, catch_up_width), positions_of([], bd),
                    np.zeros((bd, w), np.int32), k)


def _fill(graph: StepGraph, decode_impl: str, params: StepParams, cache: KVCache, inputs: StepInputs) -> KVCache:
    """Write the draft K/V of a catch-up's older tokens (`inputs`, prefill tiles); no logits are needed."""
    return model_step(graph, params, cache, inputs, decode_impl=decode_impl)[1]


def _catch_up(graph: StepGraph, decode_impl: str, params: StepParams, cache: KVCache, catch_up: StepInputs,
              row_slots_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Run the tokens the draft has not seen (`catch_up`, a ragged step); the logits [B, V] of each row's last
    known token (its slot `row_slots_B[b]`)."""
    logits_SxV, cache = model_step(graph, params, cache, catch_up, decode_impl=decode_impl)
    return logits_SxV[row_slots_B], cache


def _draft_k(graph: StepGraph, decode_impl: str, page_size: int, k: int, params: StepParams, cache: KVCache,
             logits_BxV: jax.Array, positions_B: jax.Array, tables_BxW: jax.Array, sampling_B: tuple[jax.Array, ...]
             ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Draft k tokens per row from its last known token's logits (at `positions_B[b]`; -1: a pad row): the first
    sampled from `logits_BxV`, the rest decoded one position at a time. Returns drafts [B, k], q [B, k, V], cache."""
    def step(cache: KVCache, inputs: StepInputs) -> tuple[jax.Array, KVCache]:
        return model_step(graph, params, cache, inputs, decode_impl=decode_impl)

    return draft_tokens(step, cache, logits_BxV, positions_B, tables_BxW, page_size, k, sampling_B)


def draft_tokens(step: Callable[[DraftState, StepInputs], tuple[jax.Array, DraftState]], state: DraftState,
                 logits_BxV: jax.Array, positions_B: jax.Array, tables_BxW: jax.Array, page_size: int, k: int,
                 sampling_B: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, DraftState]:
    """k drafts per row (at `positions_B[b]`; -1: a pad row): the first sampled from `logits_BxV`, each next one
    from `step(state, inputs)` -> (logits [B, V], state) run on the draft before it, one position further. Shared
    by the draft model and the draft head. Returns drafts [B, k], q [B, k, V] and the last state."""
    first, q_first = sample_draft(logits_BxV, *sampling_B, 0)

    def body(carry: tuple[jax.Array, DraftState], j: jax.Array) -> tuple[tuple[jax.Array, DraftState], tuple]:
        token_B, state = carry
        inputs = decode_inputs(token_B, jnp.where(positions_B >= 0, positions_B + j, -1), tables_BxW, page_size)
        logits, state = step(state, inputs)
        token_B, q_BxV = sample_draft(logits, *sampling_B, j)
        return (token_B, state), (token_B, q_BxV)

    (_, state), (tokens_KxB, q_KxBxV) = jax.lax.scan(body, (first, state), jnp.arange(1, k))
    drafts_BxK = jnp.concatenate([first[:, None], tokens_KxB.T], axis=1)
    q_BxKxV = jnp.concatenate([q_first[:, None], jnp.moveaxis(q_KxBxV, 0, 1)], axis=1)
    return drafts_BxK, q_BxKxV, state


class DraftRunner:
    """A draft model beside an engine: its weights, its cache over the engine's page ids, its compiled steps."""

    def __init__(self, model: nnx.Module, engine: Engine, ks: Sequence[int]):
        model = for_inference(model)
        target = engine.model_cfg
        if model.cfg.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.cfg.vocab_size}) must be the target's "
                             f"({target.vocab_size})")
        self.cfg = model.cfg
        self.graph, self.params = split_for_serving(model)
        ps = engine.cfg.page_size
        self.cache = init_cache(CacheShape.for_model(model.cfg, ps, engine.cache_shape.num_pages))
        self.layout, self.max_tiles = engine.layout, engine.max_tiles
        self._fill = shared_compiled(_fill, self.graph, engine.decode_impl)
        self._catch_up = shared_compiled(_catch_up, self.graph, engine.decode_impl)
        self._draft_k = {k: shared_compiled(_draft_k, self.graph, engine.decode_impl, ps, k) for k in ks if k}

    def draft(self, decodes: Sequence[ScheduledChunk], inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        """Draft k tokens (the target step's drafts per row) for each decode row of the target's step `inputs`
        (rows in `decodes` order, padded to its Bd): (drafts [Bd, k], q [Bd, k, V]) on the device. Advances each
        sequence's `num_draft_computed`."""
        Bd, k = inputs.drafts_BxNd.shape
        starts = [min(c.seq.num_draft_computed, c.seq.num_computed) for c in decodes]
        for chunk in decodes:
            chunk.seq.num_draft_computed = chunk.seq.num_tokens - 1 + k
        # after a verification the draft lacks one token, or two when every draft was accepted
        catch_up = catch_up_batch(decodes, starts, self.layout, Bd, 2, self.max_tiles)
        return self._run(catch_up, positions_of([c.seq.num_tokens - 1 for c in decodes], Bd),
                         inputs.decode_tables_BxW, k)

    def _run(self, catch_up: CatchUp, positions_B: np.ndarray, tables_BxW: np.ndarray, k: int
             ) -> tuple[jax.Array, jax.Array]:
        """The catch-up's fills and step, then k drafts from each row's last position (`positions_B`)."""
        for fill in catch_up.fills:
            self._write(fill)
        logits_BxV, self.cache = self._catch_up(self.params, self.cache, catch_up.step, catch_up.row_slots)
        drafts, q, self.cache = self._draft_k[k](self.params, self.cache, logits_BxV, positions_B, tables_BxW,
                                                 catch_up.sampling)
        return drafts, q

    def _write(self, fill: StepInputs) -> None:
        """Write the draft K/V of a catch-up's older tokens (prefill tiles)."""
        self.cache = self._fill(self.params, self.cache, fill)

    def warmup(self, widths: Sequence[int]) -> None:
        """Compile the catch-up (two tokens a row) and drafting of each k at each width in `widths`
        (`warm_drafter`)."""
        warm_drafter(self.layout, self.max_tiles, widths, tuple(self._draft_k), 2, self._write, self._run)

    @property
    def compile_count(self) -> int:
        """Shapes compiled for this draft model structure (catch-up prefills and steps, and drafting)."""
        return self._fill.count + self._catch_up.count + sum(d.count for d in self._draft_k.values())
