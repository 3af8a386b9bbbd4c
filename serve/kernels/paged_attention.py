"""Decode attention over a paged KV cache: a Pallas kernel and a pure-JAX reference with the same signature.

One query token per sequence. q [B, H, D]; one layer's cache k_pages, v_pages [K, N, P, D] (kv heads, pages,
slots per page, head dim); block_tables [B, M] the page ids of each sequence in order (unused entries 0: the null
page, whose contents are garbage and never reach the output); lengths [B] the tokens in the cache (the current
token's K/V already written), so attention covers positions [0, length). A length-0 row (padding of a bucketed
batch) yields zeros. H = K * G: grouped-query attention, G query heads per kv head.

Kernel. Grid (B, K, S), S = `num_splits`. Program (b, h, s) holds the G query heads of kv head h as one [R, D]
tile (R = max(16, next power of two >= G); the padded rows are zero and dropped afterwards), and walks split s of
sequence b's pages: the block table is blocked per (sequence, split), the page pools per kv head ([N, P, D], the
whole pool of that head). Each loop iteration takes `pages_per_chunk` = C page ids from the table and gathers
those C pages of K and V as one [C * P, D] tile, so the scores and the weighted sum are [R, D] x [D, C * P] and
[R, C * P] x [C * P, D] matmuls. The loop runs cdiv(live tokens of this split, C * P) times (a dynamic bound): no
chunk past the sequence's last page is loaded. Inside a chunk, positions >= length are masked: scores by
`jnp.where` to -inf, V rows by `jnp.where` to zero, so stale, NaN or Inf data in a freed page, the null page or
the tail of the last page cannot reach the output (0 * NaN never happens). An online softmax keeps the running
max, sum and [R, D] accumulator in float32 whatever the input dtype. Each split writes its partial (accumulator,
max, sum) in float32; they are merged in plain JAX (flash-decoding). With S = 1 the merge is acc / sum.

Constraints. Always: q [B, H, D], pools [K, N, P, D] alike, H % K == 0, tables [B, M], lengths [B]; positive
integers for pages_per_chunk and num_splits. Compiled (interpret=False, the Triton lowering, whose tensors must
have power-of-two sizes and whose `dot` needs every dimension >= 16): D a power of two >= 16, P and C powers of
two, C * P >= 16. Violations raise ValueError naming the value before anything is lowered. Lengths beyond M * P
are clipped to M * P. On GPU the kernel asks for the Triton lowering explicitly (Triton compiler params): JAX's
default there is Mosaic GPU, which its page gathers do not target.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.checks import is_power_of_two
from model.kernels.triton import compiler_params, triton_deprecation_ignored

_MIN_DOT = 16  # Triton's `dot` needs M, N, K >= 16
_TOKENS_PER_CHUNK = 128  # default chunk: about this many tokens per loop iteration
_NUM_WARPS, _NUM_STAGES = 4, 2


def paged_prefill_attention(q_BxCxHxD: jax.Array, k_pages_KxNxPxD: jax.Array, v_pages_KxNxPxD: jax.Array,
                            positions_BxC: jax.Array, lengths_B: jax.Array, block_tables_BxM: jax.Array, *,
                            scale: float | None = None) -> jax.Array:
    """C queries per sequence at absolute `positions_BxC` over its pages (which already hold their K/V): key j is
    visible to a query at position p iff j <= p and j < length. Pages are gathered into a dense [B, K, M * P, D]
    range; masked keys and values are selected away (never multiplied), so NaN in unused slots cannot leak; the
    softmax is in float32; a query that sees no key gives zeros. The engine's prefill path, and (with C = 1)
    the reference for the decode kernel."""
    B, C, H, D = q_BxCxHxD.shape
    K, _, P, _ = k_pages_KxNxPxD.shape
    G, M = H // K, block_tables_BxM.shape[1]
    scale = D ** -0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    k_BxKxSxD = jnp.moveaxis(k_pages_KxNxPxD[:, block_tables_BxM], 0, 1).reshape(B, K, M * P, D)
    v_BxKxSxD = jnp.moveaxis(v_pages_KxNxPxD[:, block_tables_BxM], 0, 1).reshape(B, K, M * P, D)
    key_pos_S = jnp.arange(M * P)
    valid_BxS = key_pos_S[None, :] < lengths_B[:, None]
    k_BxKxSxD = jnp.where(valid_BxS[:, None, :, None], k_BxKxSxD, 0)
    v_BxKxSxD = jnp.where(valid_BxS[:, None, :, None], v_BxKxSxD, 0).astype(jnp.float32)
    scores = jnp.einsum("bckgd,bksd->bkgcs", q_BxCxHxD.reshape(B, C, K, G, D), k_BxKxSxD,
                        preferred_element_type=jnp.float32, precision=hi) * scale
    visible = (valid_BxS[:, None, :] & (key_pos_S[None, None, :] <= positions_BxC[:, :, None]))[:, None, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a query that sees nothing: every score is -inf
    probs = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgcs,bksd->bckgd", probs, v_BxKxSxD, precision=hi)
    return out.reshape(B, C, H, D).astype(q_BxCxHxD.dtype)


def paged_attention_reference(q_BxHxD: jax.Array, k_pages_KxNxPxD: jax.Array, v_pages_KxNxPxD: jax.Array,
                              lengths_B: jax.Array, block_tables_BxM: jax.Array, *,
                              scale: float | None = None) -> jax.Array:
    """The decode kernel's reference: `paged_prefill_attention` of one query at position length - 1 (a length-0
    row sees nothing and gives zeros)."""
    positions_Bx1 = (lengths_B - 1)[:, None]
    return paged_prefill_attention(q_BxHxD[:, None], k_pages_KxNxPxD, v_pages_KxNxPxD, positions_Bx1, lengths_B,
                                   block_tables_BxM, scale=scale)[:, 0]


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, acc_ref, max_ref, sum_ref, *, page_size: int,
            pages_per_chunk: int, scale: float):
    """One (sequence, kv head, split): the online softmax over the split's live chunks of C pages."""
    tokens = pages_per_chunk * page_size
    split_tokens = tables_ref.shape[0] * page_size
    live = jnp.clip(lengths_ref[0] - pl.program_id(2) * split_tokens, 0, split_tokens)  # this split's tokens
    q_RxD = q_ref[...].astype(k_ref.dtype)
    R, D = q_RxD.shape
    precision = jax.lax.Precision.HIGHEST  # float32: IEEE, not TF32, in the Triton dot; no effect on bf16

    def chunk(c, carry):
        m_R, l_R, acc_RxD = carry
        pages_C = tables_ref[pl.ds(c * pages_per_chunk, pages_per_chunk)]
        k_TxD = k_ref[pages_C].reshape(tokens, D)
        v_TxD = v_ref[pages_C].reshape(tokens, D)
        live_T = c * tokens + jnp.arange(tokens) < live
        s_RxT = jax.lax.dot_general(q_RxD, k_TxD, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32) * scale
        s_RxT = jnp.where(live_T[None, :], s_RxT, -jnp.inf)
        m_new = jnp.maximum(m_R, jnp.max(s_RxT, axis=1))  # finite: every chunk run has a live token
        p_RxT = jnp.exp(s_RxT - m_new[:, None])  # masked: exp(-inf) = 0
        alpha_R = jnp.exp(m_R - m_new)  # first chunk: exp(-inf) = 0
        v_TxD = jnp.where(live_T[:, None], v_TxD, jnp.zeros((), v_TxD.dtype))
        pv_RxD = jax.lax.dot_general(p_RxT.astype(v_TxD.dtype), v_TxD, (((1,), (0,)), ((), ())),
                                     precision=precision, preferred_element_type=jnp.float32)
        return m_new, alpha_R * l_R + jnp.sum(p_RxT, axis=1), alpha_R[:, None] * acc_RxD + pv_RxD

    init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, D), jnp.float32))
    m_R, l_R, acc_RxD = jax.lax.fori_loop(0, (live + tokens - 1) // tokens, chunk, init)
    acc_ref[...] = acc_RxD
    max_ref[...] = m_R
    sum_ref[...] = l_R


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_pages_per_chunk(page_size: int, pages_per_split: int) -> int:
    """About 128 tokens per chunk, a power of two, at least 16 tokens, no more pages than a split holds (rounded
    up to a power of two)."""
    pages = max(1, _TOKENS_PER_CHUNK // page_size)
    pages = 1 << (pages.bit_length() - 1)  # round down to a power of two
    pages = min(pages, _next_power_of_two(pages_per_split))
    return max(pages, _next_power_of_two(math.ceil(_MIN_DOT / page_size)))


def _check(q_BxHxD: jax.Array, k_pages_KxNxPxD: jax.Array, v_pages_KxNxPxD: jax.Array, lengths_B: jax.Array,
           block_tables_BxM: jax.Array, pages_per_chunk: int | None, num_splits: int, interpret: bool) -> None:
    if q_BxHxD.ndim != 3 or k_pages_KxNxPxD.ndim != 4 or v_pages_KxNxPxD.shape != k_pages_KxNxPxD.shape:
        raise ValueError(f"need q [B, H, D] and k_pages, v_pages [K, N, P, D] alike; got q {q_BxHxD.shape}, "
                         f"k_pages {k_pages_KxNxPxD.shape}, v_pages {v_pages_KxNxPxD.shape}")
    (B, H, D), (K, _, P, Dk) = q_BxHxD.shape, k_pages_KxNxPxD.shape
    if H % K or Dk != D:
        raise ValueError(f"need H % K == 0 and equal head dims; got q {q_BxHxD.shape}, k_pages "
                         f"{k_pages_KxNxPxD.shape}")
    if lengths_B.shape != (B,) or block_tables_BxM.ndim != 2 or block_tables_BxM.shape[0] != B:
        raise ValueError(f"need lengths [B] and block_tables [B, M] with B = {B}; got lengths {lengths_B.shape}, "
                         f"block_tables {block_tables_BxM.shape}")
    for name, value in (("pages_per_chunk", 1 if pages_per_chunk is None else pages_per_chunk),
                        ("num_splits", num_splits)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if interpret:
        return
    if not is_power_of_two(D) or D < _MIN_DOT:
        raise ValueError(f"the compiled kernel needs head_dim a power of two >= {_MIN_DOT}, got {D}")
    if not is_power_of_two(P):
        raise ValueError(f"the compiled kernel needs page_size a power of two, got {P}")
    if pages_per_chunk is not None and (not is_power_of_two(pages_per_chunk) or pages_per_chunk * P < _MIN_DOT):
        raise ValueError(f"the compiled kernel needs pages_per_chunk a power of two with pages_per_chunk * "
                         f"page_size >= {_MIN_DOT}, got {pages_per_chunk} (page_size {P})")


def paged_attention(q_BxHxD: jax.Array, k_pages_KxNxPxD: jax.Array, v_pages_KxNxPxD: jax.Array,
                    lengths_B: jax.Array, block_tables_BxM: jax.Array, *, scale: float | None = None,
                    pages_per_chunk: int | None = None, num_splits: int = 1, interpret: bool = False) -> jax.Array:
    """The Pallas kernel (see the module docstring). `pages_per_chunk`: pages gathered per loop iteration
    (default: about 128 tokens); `num_splits` > 1 spreads each sequence's pages over that many programs (for long
    contexts with few sequences), merged afterwards. `interpret=True` runs it on CPU."""
    _check(q_BxHxD, k_pages_KxNxPxD, v_pages_KxNxPxD, lengths_B, block_tables_BxM, pages_per_chunk, num_splits,
           interpret)
    with triton_deprecation_ignored():
        return _paged_attention(q_BxHxD, k_pages_KxNxPxD, v_pages_KxNxPxD, lengths_B, block_tables_BxM,
                                scale=scale, pages_per_chunk=pages_per_chunk, num_splits=num_splits,
                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_chunk", "num_splits", "interpret"))
def _paged_attention(q_BxHxD: jax.Array, k_pages_KxNxPxD: jax.Array, v_pages_KxNxPxD: jax.Array,
                     lengths_B: jax.Array, block_tables_BxM: jax.Array, *, scale: float | None,
                     pages_per_chunk: int | None, num_splits: int, interpret: bool) -> jax.Array:
    B, H, D = q_BxHxD.shape
    K, N, P, _ = k_pages_KxNxPxD.shape
    M, S = block_tables_BxM.shape[1], num_splits
    G, R = H // K, max(_MIN_DOT, _next_power_of_two(H // K))
    C = pages_per_chunk or default_pages_per_chunk(P, math.ceil(M / S))
    per_split = math.ceil(math.ceil(M / S) / C) * C  # a whole number of chunks, so no chunk crosses a split
    tables_BxT = jnp.pad(block_tables_BxM.astype(jnp.int32), ((0, 0), (0, S * per_split - M)))  # null page
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, M * P)
    q_BxKxRxD = jnp.pad(q_BxHxD.reshape(B, K, G, D), ((0, 0), (0, 0), (0, R - G), (0, 0)))
    kernel = functools.partial(_kernel, page_size=P, pages_per_chunk=C,
                               scale=D ** -0.5 if scale is None else scale)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, S),
        in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                  pl.BlockSpec((None, per_split), lambda b, h, s: (b, s)),
                  pl.BlockSpec((None, None, R, D), lambda b, h, s: (b, h, 0, 0)),
                  pl.BlockSpec((None, N, P, D), lambda b, h, s: (h, 0, 0, 0)),
                  pl.BlockSpec((None, N, P, D), lambda b, h, s: (h, 0, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, None, R, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, S, R, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, S, R), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, S, R), jnp.float32)],
        compiler_params=compiler_params(_NUM_WARPS, _NUM_STAGES),
        interpret=interpret,
        name="paged_attention",
    )(lengths_B, tables_BxT, q_BxKxRxD, k_pages_KxNxPxD, v_pages_KxNxPxD)
    return merge_splits(acc, m, l)[:, :, :G].reshape(B, H, D).astype(q_BxHxD.dtype)


def merge_splits(acc_BxKxSxRxD: jax.Array, max_BxKxSxR: jax.Array, sum_BxKxSxR: jax.Array) -> jax.Array:
    """Combine the splits' float32 partials: weight each by exp(its max - the overall max); empty splits (max -inf)
    weigh 0, and a row with no tokens at all gives zeros."""
    top = jnp.max(max_BxKxSxR, axis=2, keepdims=True)
    w_BxKxSxR = jnp.exp(max_BxKxSxR - jnp.where(jnp.isfinite(top), top, 0.0))
    total_BxKxR = jnp.sum(w_BxKxSxR * sum_BxKxSxR, axis=2)
    out_BxKxRxD = jnp.sum(w_BxKxSxR[..., None] * acc_BxKxSxRxD, axis=2)
    return out_BxKxRxD / jnp.where(total_BxKxR > 0, total_BxKxR, 1.0)[..., None]
