"""Attention for one step's flat ragged batch (serve/step_batch.py): Bd decode rows of Td tokens, then Nt tiles of Tt
prefill tokens, each attending over its own row's pages.

One function handles every mix: the decode tokens go to a decode attention -- the Pallas kernel
(serve/kernels/paged_attention.py) on GPU, its plain-JAX reference elsewhere -- and the tiles to
`paged_prefill_attention` with one block table per tile, causal by absolute position (vLLM's FlashInfer backend
splits a batch the same way: decodes first, then prefill tokens). Decode rows that verify drafted tokens (Td > 1)
are tiles of Td tokens themselves. All read only W pages per row, W the step's bucketed block-table width, so the
cost follows the live tokens.

Shapes (the legend of model/kernels/flash_attention.py): q [T, H, Dh], pools [K, Np, Ps, Dh], tables [rows, W],
T = Bd * Td + Nt * Tt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def ragged_paged_attention(q_TxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                           positions_T: jax.Array, decode_tables_BxW: jax.Array, decode_lengths_B: jax.Array,
                           tile_tables_NtxW: jax.Array, tile_lengths_Nt: jax.Array, *, decode_impl: str = "reference",
                           decode_width: int = 1) -> jax.Array:
    """Attention output [T, H, Dh] of the step's tokens over their rows' cached K/V (their own K/V written
    already). A pad token (a pad decode row of length 0, a tile token at position -1) gives zeros."""
    T, H, Dh = q_TxHxDh.shape
    Bd, Nt, Td = decode_tables_BxW.shape[0], tile_tables_NtxW.shape[0], decode_width
    Tt = (T - Bd * Td) // Nt if Nt else 0
    parts = []
    if Bd and Td > 1:
        q_BxTdxHxDh = q_TxHxDh[:Bd * Td].reshape(Bd, Td, H, Dh)
        out = paged_prefill_attention(q_BxTdxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh,
                                      positions_T[:Bd * Td].reshape(Bd, Td), decode_lengths_B, decode_tables_BxW)
        parts.append(out.reshape(Bd * Td, H, Dh))
    elif Bd:
        q_BxHxDh = q_TxHxDh[:Bd]
        if decode_impl == "pallas":
            out = paged_attention(q_BxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh, decode_lengths_B, decode_tables_BxW,
                                  interpret=jax.default_backend() == "cpu")
        else:
            out = paged_attention_reference(q_BxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh, decode_lengths_B,
                                            decode_tables_BxW)
        parts.append(out)
    if Nt:
        q_NtxTtxHxDh = q_TxHxDh[Bd * Td:].reshape(Nt, Tt, H, Dh)
        out = paged_prefill_attention(q_NtxTtxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh,
                                      positions_T[Bd * Td:].reshape(Nt, Tt), tile_lengths_Nt, tile_tables_NtxW)
        parts.append(out.reshape(Nt * Tt, H, Dh))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
