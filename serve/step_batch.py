"""The host side of one device step: the rows a step computes, laid out as one flat, ragged token batch.

A step's T tokens are Bd decode rows of Td = Nd + 1 tokens each (one token, or with speculative decoding the last
token and up to Nd drafted ones to verify) followed by Nt prefill tiles of Tt tokens; a prefill chunk of n tokens
fills ceil(n / Tt) consecutive tiles, its last tile padded (pad tokens sit at position -1, see nothing and write to
the null page; a decode row with fewer drafts than Nd is padded the same way). Linear layers and the MLP see only
the flat [T] batch; attention reads each decode row's and each tile's pages through its own block table
(serve/ragged_attention.py). Every decode row has Td sampling slots (the target's distribution at each of its
positions: serve/speculative.py verifies the drafts with them) and every prefill chunk one; the Rs = Bd * Td + Nt
slots are the step's output rows (letters: the legend of model/kernels/flash_attention.py).

Shapes are bucketed so the step compiles for a small fixed set: Bd a power of two up to the running limit (when a
step has prefill tiles, Bd is that limit, so mixed steps vary in Nt only), Nt a power of two, and the block-table
width W a power of two of pages, at least `min_pages`, covering the longest row of this step -- never the model's
context. The step's cost follows the live tokens, not `max_seq_len`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class StepInputs(NamedTuple):
    """Device inputs of one step (see the module docstring); pad slots write to page 0 and have length 0."""

    tokens_T: np.ndarray            # int32 token ids
    positions_T: np.ndarray         # int32 absolute positions (-1: a pad token in a prefill tile)
    pages_T: np.ndarray             # int32 page of each token's K/V slot (0: the null page)
    offsets_T: np.ndarray           # int32 offset in that page
    decode_tables_BxW: np.ndarray   # int32 block table of each decode row
    decode_lengths_B: np.ndarray    # int32 tokens in the cache after this step (0: a pad row)
    tile_tables_NtxW: np.ndarray     # int32 block table of each prefill tile's row
    tile_lengths_Nt: np.ndarray      # int32 that row's tokens in the cache after this step
    last_Rs: np.ndarray              # int32 index in T of each sampling slot's last token
    from_prev_T: np.ndarray         # int32 the previous step's sampling slot whose token this is (-1: tokens_T's)
    drafts_BxNd: np.ndarray         # int32 each decode row's drafted tokens (-1: none); Nd = 0 without speculation


class SamplingInputs(NamedTuple):
    """Each sampling slot's parameters (serve/sampling.py `sample_rows`)."""

    seeds_Rs: np.ndarray        # uint32
    counters_Rs: np.ndarray     # int32: the request's output tokens so far (its random stream's position)
    temperature_Rs: np.ndarray  # float32
    top_k_Rs: np.ndarray        # int32
    top_p_Rs: np.ndarray        # float32
    min_p_Rs: np.ndarray        # float32
    logprobs_Rs: np.ndarray     # bool: the slot's request wants log-probabilities


@dataclasses.dataclass(frozen=True)
class Row:
    """Compute `token_ids` at positions [start, start + len) of a sequence whose pages are `block_table`, then
    sample with (seed, counter, temperature, top_k, top_p, min_p), with log-probabilities if `logprobs`. With
    `prev_slot`, the last token is still on the device (the engine's overlap), and `token_ids[-1]` is a stand-in.
    A decode row's `drafts` follow its one token at the next positions, to be verified (speculative decoding)."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    seed: int = 0
    counter: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: bool = False
    prev_slot: int = -1  # >= 0: the last token is the previous step's sampled token in this slot, not read back
    drafts: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """The bucket sizes: `max_decode_rows` (a power of two), the prefill tile `tile`, the smallest block-table
    width `min_pages` and the widest `max_pages`, with `page_size` tokens per page."""

    page_size: int
    max_decode_rows: int
    tile: int
    min_pages: int
    max_pages: int

    def shape(self, num_decodes: int, num_tiles: int, num_pages: int) -> tuple[int, int, int]:
        """The (Bd, Nt, W) bucket for a step with these counts (W from the widest row's pages)."""
        np_ = bucket(num_tiles) if num_tiles else 0
        bd = self.max_decode_rows if np_ else (bucket(num_decodes) if num_decodes else 0)
        w = min(max(bucket(num_pages), self.min_pages), self.max_pages)
        return bd, np_, w

    def shape_of(self, inputs: StepInputs) -> tuple[int, int, int]:
        """The (Bd, Nt, W) bucket of built inputs."""
        return inputs.decode_tables_BxW.shape[0], inputs.tile_tables_NtxW.shape[0], inputs.decode_tables_BxW.shape[1]

    def widths(self, widest: int | None = None) -> list[int]:
        """Every block-table width bucket W, up to `widest` pages (default: all of them)."""
        return [w for w in sorted({min(max(1 << i, self.min_pages), self.max_pages)
                                   for i in range(bucket(self.max_pages).bit_length())})
                if widest is None or w <= widest]

    def decode_buckets(self) -> list[int]:
        """Every decode-row bucket Bd of a step without prefill tiles."""
        return [1 << i for i in range(self.max_decode_rows.bit_length())]

    @staticmethod
    def tile_buckets(max_tiles: int) -> list[int]:
        """Every prefill-tile bucket Nt of a step with at most `max_tiles` tiles."""
        return [1 << i for i in range(bucket(max_tiles).bit_length())]

    def all_shapes(self, max_tiles: int) -> list[tuple[int, int, int]]:
        """Every (Bd, Nt, W) bucket a step can take with at most `max_tiles` prefill tiles."""
        widths = self.widths()
        return ([(b, 0, w) for w in widths for b in self.decode_buckets()]
                + [(self.max_decode_rows, n, w) for w in widths for n in self.tile_buckets(max_tiles)])


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= max(n, smallest)."""
    return 1 << max(0, math.ceil(math.log2(max(n, smallest))))


def tiles_for(lengths: Sequence[int], tile: int) -> int:
    """Prefill tiles the chunks of these lengths fill."""
    return sum(-(-n // tile) for n in lengths)


def padding_step(bd: int, nt: int, w: int, tile: int, num_drafts: int = 0) -> tuple[StepInputs, SamplingInputs]:
    """All-padding inputs of one (Bd, Nt, W) bucket with `num_drafts` drafted tokens per decode row: every token
    sits at position -1 and writes the null page, every row has length 0 (a warm-up compiles a shape with these
    and changes no sequence's K/V)."""
    Td = num_drafts + 1
    T, Rs = bd * Td + nt * tile, bd * Td + nt
    z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    inputs = StepInputs(z(T), np.full(T, -1, np.int32), z(T), z(T), z(bd, w), z(bd), z(nt, w), z(nt), z(Rs),
                        np.full(T, -1, np.int32), np.full((bd, num_drafts), -1, np.int32))
    return inputs, SamplingInputs(np.zeros(Rs, np.uint32), z(Rs), np.zeros(Rs, np.float32), z(Rs),
                                  np.ones(Rs, np.float32), np.zeros(Rs, np.float32), np.zeros(Rs, bool))


def build_step(decodes: Sequence[Row], prefills: Sequence[Row], layout: StepLayout, num_drafts: int = 0,
               decode_rows: int = 0) -> tuple[StepInputs, SamplingInputs, list[int]]:
    """The step's inputs for `decodes` (one token each, and up to `num_drafts` drafted tokens after it) and
    `prefills` (chunks), and the first sampling slot of each row (decodes then prefills, in order). With
    `decode_rows`, a step without prefill tiles has at least that many decode rows (a proposer's catch-up takes
    the target step's Bd, so it compiles per the target's buckets)."""
    Tt, Ps, Nd = layout.tile, layout.page_size, num_drafts
    Td = Nd + 1
    if any(len(r.drafts) > Nd for r in decodes):
        raise ValueError(f"a decode row has more than the step's {Nd} drafted tokens")
    if len(decodes) > layout.max_decode_rows:
        raise ValueError(f"{len(decodes)} decode rows, more than the layout's {layout.max_decode_rows}")
    widest = max([len(r.block_table) for r in (*decodes, *prefills)] or [1])
    Bd, Nt, W = layout.shape(max(len(decodes), decode_rows), tiles_for([len(r.token_ids) for r in prefills], Tt),
                             widest)
    if widest > W:
        raise ValueError(f"a row holds {widest} pages, more than the widest block table ({layout.max_pages})")
    T, Rs = Bd * Td + Nt * Tt, Bd * Td + Nt
    tokens, positions = np.zeros(T, np.int32), np.full(T, -1, np.int32)
    pages, offsets = np.zeros(T, np.int32), np.zeros(T, np.int32)
    dec_tables, dec_lengths = np.zeros((Bd, W), np.int32), np.zeros(Bd, np.int32)
    tile_tables, tile_lengths = np.zeros((Nt, W), np.int32), np.zeros(Nt, np.int32)
    last, from_prev = np.zeros(Rs, np.int32), np.full(T, -1, np.int32)
    drafts = np.full((Bd, Nd), -1, np.int32)
    seeds, counters, top_k = np.zeros(Rs, np.uint32), np.zeros(Rs, np.int32), np.zeros(Rs, np.int32)
    temperature, top_p = np.zeros(Rs, np.float32), np.ones(Rs, np.float32)
    min_p, logprobs = np.zeros(Rs, np.float32), np.zeros(Rs, bool)
    slots_of_rows = []

    def place(row: Row, at: int, slot: int, width: int = 1) -> None:
        ids = [*row.token_ids, *row.drafts]
        n = len(ids)
        pos = np.arange(row.start, row.start + n)
        table = np.asarray(row.block_table, np.int32)
        tokens[at:at + n], positions[at:at + n] = ids, pos
        pages[at:at + n], offsets[at:at + n] = table[pos // Ps], pos % Ps
        from_prev[at + len(row.token_ids) - 1] = row.prev_slot
        sl = slice(slot, slot + width)
        last[sl] = at + len(row.token_ids) - 1 + np.arange(width)
        seeds[sl], counters[sl], top_k[sl] = np.uint32(row.seed), row.counter, row.top_k
        temperature[sl], top_p[sl] = row.temperature, row.top_p
        min_p[sl], logprobs[sl] = row.min_p, row.logprobs
        slots_of_rows.append(slot)

    for b, row in enumerate(decodes):
        place(row, b * Td, b * Td, Td)
        dec_tables[b, :len(row.block_table)] = row.block_table
        dec_lengths[b] = row.start + 1 + len(row.drafts)
        drafts[b, :len(row.drafts)] = row.drafts
    tile_index = 0
    for row in prefills:
        n = len(row.token_ids)
        place(row, Bd * Td + tile_index * Tt, Bd * Td + tile_index)
        for t in range(tile_index, tile_index + -(-n // Tt)):
            tile_tables[t, :len(row.block_table)] = row.block_table
            tile_lengths[t] = row.start + n
        tile_index += -(-n // Tt)
    inputs = StepInputs(tokens, positions, pages, offsets, dec_tables, dec_lengths, tile_tables, tile_lengths, last,
                        from_prev, drafts)
    return inputs, SamplingInputs(seeds, counters, temperature, top_k, top_p, min_p, logprobs), slots_of_rows
