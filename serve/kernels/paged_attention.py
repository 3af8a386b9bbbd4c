"""Decode attention over a paged KV cache: a Pallas kernel and a pure-JAX reference with the same signature.

Shape letters are model/kernels/flash_attention.py's legend (its "serving" lines: Np, Ps, W, Ns, Ws, Wp, Pc, Gp).

One query token per sequence. q [B, H, Dh]; one layer's cache k_pages, v_pages [K, Np, Ps, Dh] (kv heads, pages,
slots per page, head dim); block_tables [B, W] the page ids of each sequence in order (unused entries 0: the null
page, whose contents are garbage and never reach the output); lengths [B] the tokens in the cache (the current
token's K/V already written), so attention covers positions [0, length). A length-0 row (padding of a bucketed
batch) yields zeros. H = K * G: grouped-query attention, G query heads per kv head.

Kernel. Grid (B, K, Ns), Ns = `num_splits`. Program (b, h, s) holds the G query heads of kv head h as one [Gp, Dh]
tile (Gp = max(16, next power of two >= G); the padded rows are zero and dropped afterwards), and walks split s of
sequence b's pages: the block table is blocked per (sequence, split), the page pools per kv head ([Np, Ps, Dh], the
whole pool of that head). Each loop iteration takes `pages_per_chunk` = Pc page ids from the table and gathers
those Pc pages of K and V as one [Sk, Dh] tile (Sk = Pc * Ps), so the scores and the weighted sum are
[Gp, Dh] x [Dh, Sk] and [Gp, Sk] x [Sk, Dh] matmuls. The loop runs cdiv(live tokens of this split, Sk) times (a
dynamic bound): no chunk past the sequence's last page is loaded. Inside a chunk, positions >= length are masked:
scores by `jnp.where` to -inf, V rows by `jnp.where` to zero, so stale, NaN or Inf data in a freed page, the null
page or the tail of the last page cannot reach the output (0 * NaN never happens). An online softmax keeps the
running max, sum and [Gp, Dh] accumulator in float32 whatever the input dtype. Each split writes its partial
(accumulator, max, sum) in float32; they are merged in plain JAX (flash-decoding). With Ns = 1 the merge is
acc / sum.

Constraints. Always: q [B, H, Dh], pools [K, Np, Ps, Dh] alike, H % K == 0, tables [B, W], lengths [B]; positive
integers for pages_per_chunk and num_splits. Compiled (interpret=False, the Triton lowering, whose tensors must
have power-of-two sizes and whose `dot` needs every dimension >= 16): Dh a power of two >= 16, Ps and Pc powers of
two, Pc * Ps >= 16. Violations raise ValueError naming the value before anything is lowered. Lengths beyond W * Ps
are clipped to W * Ps. On GPU the kernel asks for the Triton lowering explicitly (Triton compiler params): JAX's
default there is Mosaic GPU, which its page gathers do not target.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.checks import check_int, is_power_of_two
from model.kernels.triton import compiler_params, triton_deprecation_ignored

MIN_DOT = 16  # Triton's `dot` needs M, N, K >= 16
_TOKENS_PER_CHUNK = 128  # default chunk: about this many tokens per loop iteration
_NUM_WARPS, _NUM_STAGES = 4, 2
PRECISION = jax.lax.Precision.HIGHEST  # float32: IEEE, not TF32, in the Triton dot; no effect on bf16


def paged_prefill_attention(q_BxTxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                            positions_BxT: jax.Array, lengths_B: jax.Array, block_tables_BxW: jax.Array, *,
                            scale: float | None = None) -> jax.Array:
    """T queries per sequence at absolute `positions_BxT` over its pages (which already hold their K/V): key j is
    visible to a query at position p iff j <= p and j < length. Pages are gathered into a dense [B, K, S, Dh]
    range (S = W * Ps); masked keys and values are selected away (never multiplied), so NaN in unused slots cannot
    leak; the softmax is in float32; a query that sees no key gives zeros. The engine's prefill path, and (with
    T = 1) the reference for the decode kernel."""
    B, T, H, Dh = q_BxTxHxDh.shape
    K, _, Ps, _ = k_pages_KxNpxPsxDh.shape
    G, W = H // K, block_tables_BxW.shape[1]
    S = W * Ps
    scale = Dh ** -0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    k_BxKxSxDh = jnp.moveaxis(k_pages_KxNpxPsxDh[:, block_tables_BxW], 0, 1).reshape(B, K, S, Dh)
    v_BxKxSxDh = jnp.moveaxis(v_pages_KxNpxPsxDh[:, block_tables_BxW], 0, 1).reshape(B, K, S, Dh)
    key_pos_S = jnp.arange(S)
    valid_BxS = key_pos_S[None, :] < lengths_B[:, None]
    k_BxKxSxDh = jnp.where(valid_BxS[:, None, :, None], k_BxKxSxDh, 0)
    v_BxKxSxDh = jnp.where(valid_BxS[:, None, :, None], v_BxKxSxDh, 0).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bksd->bkgts", q_BxTxHxDh.reshape(B, T, K, G, Dh), k_BxKxSxDh,
                        preferred_element_type=jnp.float32, precision=hi) * scale
    visible = (valid_BxS[:, None, :] & (key_pos_S[None, None, :] <= positions_BxT[:, :, None]))[:, None, None]
    probs = masked_softmax(scores, visible)
    # [B, K, G, T, Dh] then moved: asked for in [B, T, K, G, Dh] order directly, XLA:CPU computes V^T P, a dot its
    # matmul library does not take (4x slower attention in a 16-row decode step, docs/BENCHMARKS.md)
    out = jnp.moveaxis(jnp.einsum("bkgts,bksd->bkgtd", probs, v_BxKxSxDh, precision=hi), 3, 1)
    return out.reshape(B, T, H, Dh).astype(q_BxTxHxDh.dtype)


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """The float32 softmax over the last axis of `scores` where `visible` (broadcast against it); hidden entries
    are selected away (NaN there cannot leak), and a row that sees nothing gives zeros."""
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a query that sees nothing: every score is -inf
    probs = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(total > 0, total, 1.0)


def split_live_tokens(lengths_ref, tables_ref, page_size: int) -> jax.Array:
    """Inside a decode kernel's (sequence, ..., split) program: how many of the sequence's tokens fall in this
    split's pages."""
    split_tokens = tables_ref.shape[0] * page_size
    return jnp.clip(lengths_ref[0] - pl.program_id(2) * split_tokens, 0, split_tokens)


def paged_attention_reference(q_BxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                              lengths_B: jax.Array, block_tables_BxW: jax.Array, *,
                              scale: float | None = None) -> jax.Array:
    """The decode kernel's reference: `paged_prefill_attention` of one query at position length - 1 (a length-0
    row sees nothing and gives zeros)."""
    positions_Bx1 = (lengths_B - 1)[:, None]
    return paged_prefill_attention(q_BxHxDh[:, None], k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh, positions_Bx1, lengths_B,
                                   block_tables_BxW, scale=scale)[:, 0]


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, acc_ref, max_ref, sum_ref, *, page_size: int,
            pages_per_chunk: int, scale: float):
    """One (sequence, kv head, split): the online softmax over the split's live chunks of Pc pages (Sk tokens)."""
    Sk = pages_per_chunk * page_size
    live = split_live_tokens(lengths_ref, tables_ref, page_size)
    q_GpxDh = q_ref[...].astype(k_ref.dtype)
    Gp, Dh = q_GpxDh.shape

    def chunk(c, carry):
        pages_Pc = tables_ref[pl.ds(c * pages_per_chunk, pages_per_chunk)]
        k_SkxDh = k_ref[pages_Pc].reshape(Sk, Dh)
        v_SkxDh = v_ref[pages_Pc].reshape(Sk, Dh)
        live_Sk = c * Sk + jnp.arange(Sk) < live
        s_GpxSk = jax.lax.dot_general(q_GpxDh, k_SkxDh, (((1,), (1,)), ((), ())), precision=PRECISION,
                                    preferred_element_type=jnp.float32) * scale
        s_GpxSk = jnp.where(live_Sk[None, :], s_GpxSk, -jnp.inf)
        v_SkxDh = jnp.where(live_Sk[:, None], v_SkxDh, jnp.zeros((), v_SkxDh.dtype))
        return online_softmax_step(carry, s_GpxSk, v_SkxDh)

    carry = jax.lax.fori_loop(0, (live + Sk - 1) // Sk, chunk, online_softmax_init(Gp, Dh))
    store_partials(carry, acc_ref, max_ref, sum_ref)


def online_softmax_init(rows: int, dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's starting (running max -inf, sum 0, accumulator [rows, dim] 0), in float32."""
    return (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, dim), jnp.float32))


def online_softmax_step(carry: tuple[jax.Array, jax.Array, jax.Array], s_RxSk: jax.Array, v_SkxD: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk of a decode kernel's online softmax: scores [R, Sk] (masked ones -inf, at least one live per
    chunk) against values [Sk, D] (masked rows already zero). The running max, sum and accumulator stay float32;
    the weighted sum is a [R, Sk] x [Sk, D] matmul in the values' dtype."""
    m_R, l_R, acc_RxD = carry
    m_new = jnp.maximum(m_R, jnp.max(s_RxSk, axis=1))  # finite: every chunk run has a live token
    p_RxSk = jnp.exp(s_RxSk - m_new[:, None])  # masked: exp(-inf) = 0
    alpha_R = jnp.exp(m_R - m_new)  # first chunk: exp(-inf) = 0
    pv_RxD = jax.lax.dot_general(p_RxSk.astype(v_SkxD.dtype), v_SkxD, (((1,), (0,)), ((), ())),
                                 precision=PRECISION, preferred_element_type=jnp.float32)
    return m_new, alpha_R * l_R + jnp.sum(p_RxSk, axis=1), alpha_R[:, None] * acc_RxD + pv_RxD


def store_partials(carry: tuple[jax.Array, jax.Array, jax.Array], acc_ref, max_ref, sum_ref) -> None:
    """Write a program's (accumulator, max, sum) for `merge_splits`."""
    m_R, l_R, acc_RxD = carry
    acc_ref[...] = acc_RxD
    max_ref[...] = m_R
    sum_ref[...] = l_R


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_pages_per_chunk(page_size: int, pages_per_split: int) -> int:
    """About 128 tokens per chunk, a power of two, at least 16 tokens, no more pages than a split holds (rounded
    up to a power of two)."""
    pages = max(1, _TOKENS_PER_CHUNK // page_size)
    pages = 1 << (pages.bit_length() - 1)  # round down to a power of two
    pages = min(pages, next_power_of_two(pages_per_split))
    return max(pages, next_power_of_two(math.ceil(MIN_DOT / page_size)))


def check_tables(lengths_B: jax.Array, block_tables_BxW: jax.Array, batch: int) -> None:
    """Raise unless lengths is [B] and block_tables [B, W] for B = `batch` (shared by the paged kernels)."""
    if lengths_B.shape != (batch,) or block_tables_BxW.ndim != 2 or block_tables_BxW.shape[0] != batch:
        raise ValueError(f"need lengths [B] and block_tables [B, W] with B = {batch}; got lengths {lengths_B.shape}, "
                         f"block_tables {block_tables_BxW.shape}")


def check_compiled_pages(page_size: int, pages_per_chunk: int | None) -> None:
    """Raise unless the compiled kernel can tile these pages: page_size a power of two, and a chunk of pages
    (when given) a power of two at least MIN_DOT tokens long."""
    if not is_power_of_two(page_size):
        raise ValueError(f"the compiled kernel needs page_size a power of two, got {page_size}")
    if pages_per_chunk is not None and (not is_power_of_two(pages_per_chunk)
                                        or pages_per_chunk * page_size < MIN_DOT):
        raise ValueError(f"the compiled kernel needs pages_per_chunk a power of two with pages_per_chunk * "
                         f"page_size >= {MIN_DOT}, got {pages_per_chunk} (page_size {page_size})")


def _check(q_BxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array, lengths_B: jax.Array,
           block_tables_BxW: jax.Array, pages_per_chunk: int | None, num_splits: int, interpret: bool) -> None:
    if q_BxHxDh.ndim != 3 or k_pages_KxNpxPsxDh.ndim != 4 or v_pages_KxNpxPsxDh.shape != k_pages_KxNpxPsxDh.shape:
        raise ValueError(f"need q [B, H, Dh] and k_pages, v_pages [K, Np, Ps, Dh] alike; got q {q_BxHxDh.shape}, "
                         f"k_pages {k_pages_KxNpxPsxDh.shape}, v_pages {v_pages_KxNpxPsxDh.shape}")
    (B, H, Dh), (K, _, Ps, Dk) = q_BxHxDh.shape, k_pages_KxNpxPsxDh.shape
    if H % K or Dk != Dh:
        raise ValueError(f"need H % K == 0 and equal head dims; got q {q_BxHxDh.shape}, k_pages "
                         f"{k_pages_KxNpxPsxDh.shape}")
    check_tables(lengths_B, block_tables_BxW, B)
    check_int("pages_per_chunk", 1 if pages_per_chunk is None else pages_per_chunk)
    check_int("num_splits", num_splits)
    if interpret:
        return
    if not is_power_of_two(Dh) or Dh < MIN_DOT:
        raise ValueError(f"the compiled kernel needs head_dim a power of two >= {MIN_DOT}, got {Dh}")
    check_compiled_pages(Ps, pages_per_chunk)


def paged_attention(q_BxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                    lengths_B: jax.Array, block_tables_BxW: jax.Array, *, scale: float | None = None,
                    pages_per_chunk: int | None = None, num_splits: int = 1, interpret: bool = False) -> jax.Array:
    """The Pallas kernel (see the module docstring). `pages_per_chunk`: pages gathered per loop iteration
    (default: about 128 tokens); `num_splits` > 1 spreads each sequence's pages over that many programs (for long
    contexts with few sequences), merged afterwards. `interpret=True` runs it on CPU."""
    _check(q_BxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh, lengths_B, block_tables_BxW, pages_per_chunk, num_splits,
           interpret)
    with triton_deprecation_ignored():
        return _paged_attention(q_BxHxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh, lengths_B, block_tables_BxW,
                                scale=scale, pages_per_chunk=pages_per_chunk, num_splits=num_splits,
                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_chunk", "num_splits", "interpret"))
def _paged_attention(q_BxHxDh: jax.Array, k_pages_KxNpxPsxDh: jax.Array, v_pages_KxNpxPsxDh: jax.Array,
                     lengths_B: jax.Array, block_tables_BxW: jax.Array, *, scale: float | None,
                     pages_per_chunk: int | None, num_splits: int, interpret: bool) -> jax.Array:
    B, H, Dh = q_BxHxDh.shape
    K, Np, Ps, _ = k_pages_KxNpxPsxDh.shape
    W, Ns = block_tables_BxW.shape[1], num_splits
    G, Gp = H // K, max(MIN_DOT, next_power_of_two(H // K))
    Pc = pages_per_chunk or default_pages_per_chunk(Ps, math.ceil(W / Ns))
    Ws, tables_BxWp, lengths_B = split_tables(block_tables_BxW, lengths_B, Ps, Pc, Ns)
    q_BxKxGpxDh = jnp.pad(q_BxHxDh.reshape(B, K, G, Dh), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    kernel = functools.partial(_kernel, page_size=Ps, pages_per_chunk=Pc,
                               scale=Dh ** -0.5 if scale is None else scale)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, Ns),
        in_specs=[*table_specs(Ws),
                  pl.BlockSpec((None, None, Gp, Dh), lambda b, h, s: (b, h, 0, 0)),
                  pl.BlockSpec((None, Np, Ps, Dh), lambda b, h, s: (h, 0, 0, 0)),
                  pl.BlockSpec((None, Np, Ps, Dh), lambda b, h, s: (h, 0, 0, 0))],
        **partials_out(B, K, Ns, Gp, Dh),
        compiler_params=compiler_params(_NUM_WARPS, _NUM_STAGES),
        interpret=interpret,
        name="paged_attention",
    )(lengths_B, tables_BxWp, q_BxKxGpxDh, k_pages_KxNpxPsxDh, v_pages_KxNpxPsxDh)
    return merge_splits(acc, m, l)[:, :, :G].reshape(B, H, Dh).astype(q_BxHxDh.dtype)


def split_tables(block_tables_BxW: jax.Array, lengths_B: jax.Array, page_size: int, pages_per_chunk: int,
                 num_splits: int) -> tuple[int, jax.Array, jax.Array]:
    """(Ws the pages of a split, a whole number of chunks so that no chunk crosses a split; the block tables padded
    with the null page to Ns * Ws; the lengths as int32 clipped to the table's tokens)."""
    W = block_tables_BxW.shape[1]
    Ws = math.ceil(math.ceil(W / num_splits) / pages_per_chunk) * pages_per_chunk
    tables_BxWp = jnp.pad(block_tables_BxW.astype(jnp.int32), ((0, 0), (0, num_splits * Ws - W)))
    return Ws, tables_BxWp, jnp.clip(lengths_B.astype(jnp.int32), 0, W * page_size)


def table_specs(Ws: int) -> list:
    """`pallas_call`'s in_specs of a decode kernel's first two inputs on a grid (B, groups, Ns): the sequence's
    length and the Ws pages of its split (`split_tables`)."""
    return [pl.BlockSpec((1,), lambda b, g, s: (b,)), pl.BlockSpec((None, Ws), lambda b, g, s: (b, s))]


def partials_out(B: int, groups: int, Ns: int, rows: int, dim: int) -> dict:
    """`pallas_call`'s out_specs and out_shape for a grid (B, groups, Ns) whose programs each write `store_partials`
    of `rows` query rows: (accumulator [rows, dim], max [rows], sum [rows]) in float32, for `merge_splits`."""
    index = (lambda b, g, s: (b, g, s, 0, 0), lambda b, g, s: (b, g, s, 0))
    return {"out_specs": [pl.BlockSpec((None, None, None, rows, dim), index[0]),
                          pl.BlockSpec((None, None, None, rows), index[1]),
                          pl.BlockSpec((None, None, None, rows), index[1])],
            "out_shape": [jax.ShapeDtypeStruct((B, groups, Ns, rows, dim), jnp.float32),
                          jax.ShapeDtypeStruct((B, groups, Ns, rows), jnp.float32),
                          jax.ShapeDtypeStruct((B, groups, Ns, rows), jnp.float32)]}


def merge_splits(acc_BxKxNsxGpxDh: jax.Array, max_BxKxNsxGp: jax.Array, sum_BxKxNsxGp: jax.Array) -> jax.Array:
    """Combine the splits' float32 partials: weight each by exp(its max - the overall max); empty splits (max -inf)
    weigh 0, and a row with no tokens at all gives zeros."""
    top = jnp.max(max_BxKxNsxGp, axis=2, keepdims=True)
    w_BxKxNsxGp = jnp.exp(max_BxKxNsxGp - jnp.where(jnp.isfinite(top), top, 0.0))
    total_BxKxGp = jnp.sum(w_BxKxNsxGp * sum_BxKxNsxGp, axis=2)
    out_BxKxGpxDh = jnp.sum(w_BxKxNsxGp[..., None] * acc_BxKxNsxGpxDh, axis=2)
    return out_BxKxGpxDh / jnp.where(total_BxKxGp > 0, total_BxKxGp, 1.0)[..., None]
