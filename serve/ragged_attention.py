"""Attention for one step's flat ragged batch (serve/step_batch.py): Bd decode rows of Td tokens, then Nt tiles of Tt
prefill tokens, each attending over its own row's pages.

One function handles every mix: the decode tokens go to a decode attention -- the Pallas kernel
(serve/kernels/paged_attention.py) on GPU, its plain-JAX reference elsewhere -- and the tiles to
`paged_prefill_attention` with one block table per tile, causal by absolute position (vLLM's FlashInfer backend
splits a batch the same way: decodes first, then prefill tokens). Decode rows that verify drafted tokens (Td > 1)
are tiles of Td tokens themselves. All read only W pages per row, W the step's bucketed block-table width, so the
cost follows the live tokens.

Shapes (the legend of model/kernels/flash_attention.py): q [T, H, Dh], pools [K, Np, Ps, Dh], tables [rows, W],
T = Bd * Td + Nt * Tt. MLA's latent cache (serve/kv_cache.py) is attended the same way by `ragged_latent_attention`
(Dc the latent's width, Dp the rotary key's).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from serve.kernels.latent_attention import latent_attention, latent_attention_reference, latent_prefill_attention
from serve.kernels.paged_attention import paged_attention, paged_attention_reference, paged_prefill_attention

DECODE_IMPLS = ("auto", "pallas", "reference")


def resolve_decode_impl(decode_impl: str, backend: str | None = None) -> str:
    """"auto" is the Pallas kernel on GPU and the plain-JAX reference elsewhere (Pallas interpret mode on CPU is
    for tests: it is orders of magnitude slower)."""
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
    if decode_impl != "auto":
        return decode_impl
    return "pallas" if (backend or jax.default_backend()) == "gpu" else "reference"


DecodeFn = Callable[..., jax.Array]  # (queries [B, H, *] ..., lengths_B, tables_BxW) -> out [B, H, Do]
PrefillFn = Callable[..., jax.Array]  # (queries [B, T, H, *] ..., positions_BxT, lengths_B, tables_BxW) -> out


def by_row_kind(qs_T: tuple[jax.Array, ...], positions_T: jax.Array, decode_tables_BxW: jax.Array,
                decode_lengths_B: jax.Array, tile_tables_NtxW: jax.Array, tile_lengths_Nt: jax.Array,
                decode_width: int, decode: DecodeFn, prefill: PrefillFn) -> jax.Array:
    """Split the step's queries (each [T, H, *]) into its decode rows and prefill tiles, attend each kind with its
    function (decode rows of several tokens, verifying drafts, are tiles themselves), and join the outputs
    [T, H, Do] back in step order."""
    T, H = qs_T[0].shape[:2]
    Bd, Nt, Td = decode_tables_BxW.shape[0], tile_tables_NtxW.shape[0], decode_width
    Tt = (T - Bd * Td) // Nt if Nt else 0

    def rows(start: int, n: int, width: int) -> list[jax.Array]:
        return [q[start:start + n * width].reshape(n, width, H, *q.shape[2:]) for q in qs_T]

    parts = []
    if Bd and Td > 1:
        out = prefill(*rows(0, Bd, Td), positions_T[:Bd * Td].reshape(Bd, Td), decode_lengths_B, decode_tables_BxW)
        parts.append(out.reshape(Bd * Td, H, -1))
    elif Bd:
        parts.append(decode(*(q[:Bd] for q in qs_T), decode_lengths_B, decode_tables_BxW))
    if Nt:
        out = prefill(*rows(Bd * Td, Nt, Tt), positions_T[Bd * Td:].reshape(Nt, Tt), tile_lengths_Nt,
                      tile_tables_NtxW)
        parts.append(out.reshape(Nt * Tt, H, -1))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def ragged_paged_attention(q_TxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                           positions_T: jax.Array, decode_tables_BxW: jax.Array, decode_lengths_B: jax.Array,
                           tile_tables_NtxW: jax.Array, tile_lengths_Nt: jax.Array, *, decode_impl: str = "reference",
                           decode_width: int = 1) -> jax.Array:
    """Attention output [T, H, Dh] of the step's tokens over their rows' cached K/V (their own K/V written
    already). A pad token (a pad decode row of length 0, a tile token at position -1) gives zeros."""
    pools = (k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh)

    def decode(q_BxHxDh: jax.Array, lengths_B: jax.Array, tables_BxW: jax.Array) -> jax.Array:
        if decode_impl == "pallas":
            return paged_attention(q_BxHxDh, *pools, lengths_B, tables_BxW, interpret=jax.default_backend() == "cpu")
        return paged_attention_reference(q_BxHxDh, *pools, lengths_B, tables_BxW)

    def prefill(q_BxTxHxDh: jax.Array, positions_BxT: jax.Array, lengths_B: jax.Array, tables_BxW: jax.Array
                ) -> jax.Array:
        return paged_prefill_attention(q_BxTxHxDh, *pools, positions_BxT, lengths_B, tables_BxW)

    return by_row_kind((q_TxHxDh,), positions_T, decode_tables_BxW, decode_lengths_B, tile_tables_NtxW,
                       tile_lengths_Nt, decode_width, decode, prefill)


def ragged_latent_attention(q_c_TxHxDc: jax.Array, q_p_TxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
                            pe_pages_1xNpxPsxDp: jax.Array, positions_T: jax.Array, decode_tables_BxW: jax.Array,
                            decode_lengths_B: jax.Array, tile_tables_NtxW: jax.Array, tile_lengths_Nt: jax.Array, *,
                            scale: float, decode_impl: str = "reference", decode_width: int = 1) -> jax.Array:
    """`ragged_paged_attention` for MLA's absorbed form over a latent cache (serve/kernels/latent_attention.py):
    each head's softmax-weighted latent context [T, H, Dc]."""
    pools = (c_pages_1xNpxPsxDc, pe_pages_1xNpxPsxDp)

    def decode(q_c_BxHxDc: jax.Array, q_p_BxHxDp: jax.Array, lengths_B: jax.Array, tables_BxW: jax.Array
               ) -> jax.Array:
        if decode_impl == "pallas":
            return latent_attention(q_c_BxHxDc, q_p_BxHxDp, *pools, lengths_B, tables_BxW, scale=scale,
                                    interpret=jax.default_backend() == "cpu")
        return latent_attention_reference(q_c_BxHxDc, q_p_BxHxDp, *pools, lengths_B, tables_BxW, scale=scale)

    def prefill(q_c_BxTxHxDc: jax.Array, q_p_BxTxHxDp: jax.Array, positions_BxT: jax.Array, lengths_B: jax.Array,
                tables_BxW: jax.Array) -> jax.Array:
        return latent_prefill_attention(q_c_BxTxHxDc, q_p_BxTxHxDp, *pools, positions_BxT, lengths_B, tables_BxW,
                                        scale=scale)

    return by_row_kind((q_c_TxHxDc, q_p_TxHxDp), positions_T, decode_tables_BxW, decode_lengths_B, tile_tables_NtxW,
                       tile_lengths_Nt, decode_width, decode, prefill)
