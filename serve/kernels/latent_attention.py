"""Decode attention over MLA's latent paged cache (DeepSeek-V3, absorbed form): a Pallas kernel and a pure-JAX
reference with the same signature.

Shape letters are model/kernels/flash_attention.py's legend (its "serving" lines: Np, Ps, W, Ns, Ws, Wp, Pc), and
beyond it: Dc the key/value latent (kv_lora_rank), Dp the rotary key dims shared by all heads (qk_rope_head_dim),
Hb query heads per program (heads_per_block), Nh head blocks (cdiv(H, Hb)), Hp = Nh * Hb (H padded).

The cache keeps per token, per layer, not K/V per head but the latent c [Dc] and one rotary key pe [Dp]. With W_UK
folded into the query (model/mla.py's `absorbed_attention`), head h has q_c [Dc] and q_p [Dp], and
score(h, j) = (q_c[h] . c_j + q_p[h] . pe_j) * scale, out[h] = sum_j softmax_j c_j: an [H, Dc] latent context
(the caller applies W_UV and W_O). That is multi-query attention with one kv "head" whose key is [c; pe] and whose
value is c. The pools are two arrays, c_pages [1, Np, Ps, Dc] and pe_pages [1, Np, Ps, Dp] (the leading 1 is the
kv-head axis, laid out like the dense cache's [K, Np, Ps, Dh]; each width a power of two on GPU, as FlashMLA's
512 + 64). block_tables [B, W] the page ids of each sequence in order (unused entries 0: the null page, garbage
that never reaches the output); lengths [B] the tokens in the cache (the current token already written), so
attention covers positions [0, length). A length-0 row yields zeros.

Kernel. Grid (B, Nh, Ns), Ns = `num_splits`. Program (b, g, s) holds query heads [g Hb, (g + 1) Hb) as [Hb, Dc]
and [Hb, Dp] tiles (Hb = `heads_per_block`, default min(64, max(16, next power of two >= H)): the cap keeps the
float32 accumulator at [64, 512] for DeepSeek-V3's 128 heads; the padded heads are zero and dropped afterwards)
and walks split s of sequence b's pages as paged_attention.py's kernel does: Pc pages per loop iteration gathered as one
[Sk, Dc] and one [Sk, Dp] tile (Sk = Pc * Ps), scores = q_c c^T + q_p pe^T, an online softmax in float32 and the
accumulator [Hb, Dc] += p c. Each latent page is read once, for the key and the value alike (the point of this
kernel over passing c twice to the dense one). The loop bound is dynamic (no chunk past the sequence's last page is
loaded); positions >= length are selected away with `jnp.where` (latent rows to zero before both matmuls, scores
to -inf), so stale, NaN or Inf data in a freed page, the null page or a page's tail cannot reach the output. The
splits' float32 partials are merged by paged_attention.py's `merge_splits` (head blocks in the place of kv heads).

Constraints. Always: q_c [B, H, Dc] and q_p [B, H, Dp], pools [1, Np, Ps, Dc] and [1, Np, Ps, Dp], tables [B, W],
lengths [B]; positive integers for pages_per_chunk, num_splits and heads_per_block. Compiled (interpret=False, the
Triton lowering: power-of-two tensor sizes, `dot` dimensions >= 16): Dc and Dp powers of two >= 16, Ps a power of
two, Pc a power of two with Pc * Ps >= 16, Hb a power of two >= 16. Violations raise ValueError naming the value
before anything is lowered. Lengths beyond W * Ps are clipped to W * Ps. The default chunk is smaller than the
dense kernel's (about 32 tokens, at least 16): a [Sk, 512] latent tile per iteration next to a [64, 512]
accumulator. These defaults (and 8 warps) are chosen, not yet measured: the kernel has been checked in interpret
mode and lowered to Triton IR, not yet run compiled on a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.checks import check_int, is_number, is_power_of_two
from model.kernels.triton import compiler_params, triton_deprecation_ignored
from serve.kernels.paged_attention import (
    MIN_DOT,
    PRECISION,
    check_compiled_pages,
    check_tables,
    default_pages_per_chunk,
    masked_softmax,
    merge_splits,
    next_power_of_two,
    online_softmax_init,
    online_softmax_step,
    partials_out,
    split_live_tokens,
    split_tables,
    store_partials,
    table_specs,
)

_MAX_HEADS_PER_BLOCK = 64  # the default Hb's cap: a [64, 512] float32 accumulator per program
_TOKENS_PER_CHUNK = 32  # the default chunk's cap: a [32, 512] latent tile per loop iteration
_NUM_WARPS, _NUM_STAGES = 8, 2  # 8 warps: the [Hb, Dc] accumulator spread over 256 threads


def latent_prefill_attention(q_c_BxTxHxDc: jax.Array, q_p_BxTxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
                             pe_pages_1xNpxPsxDp: jax.Array, positions_BxT: jax.Array, lengths_B: jax.Array,
                             block_tables_BxW: jax.Array, *, scale: float) -> jax.Array:
    """T absorbed queries per sequence at absolute `positions_BxT` over its latent pages: key j is visible to a
    query at position p iff j <= p and j < length. Pages are gathered into dense [B, S, Dc] and [B, S, Dp] ranges
    (S = W * Ps); masked slots are selected away (never multiplied), so NaN in unused slots cannot leak; the softmax
    is in float32; a query that sees no key gives zeros. Returns the latent context [B, T, H, Dc] in q_c's dtype;
    with T = 1, the reference for the decode kernel."""
    B, T, H, Dc = q_c_BxTxHxDc.shape
    _, _, Ps, Dp = pe_pages_1xNpxPsxDp.shape
    S = block_tables_BxW.shape[1] * Ps
    hi = jax.lax.Precision.HIGHEST
    c_BxSxDc = c_pages_1xNpxPsxDc[0][block_tables_BxW].reshape(B, S, Dc)
    pe_BxSxDp = pe_pages_1xNpxPsxDp[0][block_tables_BxW].reshape(B, S, Dp)
    key_pos_S = jnp.arange(S)
    valid_BxS = key_pos_S[None, :] < lengths_B[:, None]
    c_BxSxDc = jnp.where(valid_BxS[:, :, None], c_BxSxDc, 0)
    pe_BxSxDp = jnp.where(valid_BxS[:, :, None], pe_BxSxDp, 0)
    scores = (jnp.einsum("bthc,bsc->bhts", q_c_BxTxHxDc, c_BxSxDc, preferred_element_type=jnp.float32, precision=hi)
              + jnp.einsum("bthp,bsp->bhts", q_p_BxTxHxDp, pe_BxSxDp, preferred_element_type=jnp.float32,
                           precision=hi)) * scale
    visible = (valid_BxS[:, None, :] & (key_pos_S[None, None, :] <= positions_BxT[:, :, None]))[:, None]
    probs = masked_softmax(scores, visible)
    # [B, H, T, Dc] then moved: asked for in [B, T, H, Dc] order directly, XLA:CPU computes C^T P, a dot its
    # matmul library does not take (as in paged_attention.py's `paged_prefill_attention`)
    out = jnp.moveaxis(jnp.einsum("bhts,bsc->bhtc", probs, c_BxSxDc.astype(jnp.float32), precision=hi), 2, 1)
    return out.astype(q_c_BxTxHxDc.dtype)


def latent_attention_reference(q_c_BxHxDc: jax.Array, q_p_BxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
                               pe_pages_1xNpxPsxDp: jax.Array, lengths_B: jax.Array, block_tables_BxW: jax.Array, *,
                               scale: float) -> jax.Array:
    """The decode kernel's reference: `latent_prefill_attention` of one query at position length - 1 (a length-0
    row sees nothing and gives zeros). [B, H, Dc] in q_c's dtype."""
    positions_Bx1 = (lengths_B - 1)[:, None]
    return latent_prefill_attention(q_c_BxHxDc[:, None], q_p_BxHxDp[:, None], c_pages_1xNpxPsxDc,
                                    pe_pages_1xNpxPsxDp, positions_Bx1, lengths_B, block_tables_BxW,
                                    scale=scale)[:, 0]


def _kernel(lengths_ref, tables_ref, q_c_ref, q_p_ref, c_ref, pe_ref, acc_ref, max_ref, sum_ref, *, page_size: int,
            pages_per_chunk: int, scale: float):
    """One (sequence, head block, split): the online softmax over the split's live chunks of Pc pages (Sk
    tokens), each latent chunk read once for both matmuls."""
    Sk = pages_per_chunk * page_size
    live = split_live_tokens(lengths_ref, tables_ref, page_size)
    q_c_HbxDc = q_c_ref[...].astype(c_ref.dtype)
    q_p_HbxDp = q_p_ref[...].astype(pe_ref.dtype)
    Hb, Dc = q_c_HbxDc.shape
    Dp = q_p_HbxDp.shape[1]
    qk_dims = (((1,), (1,)), ((), ()))

    def chunk(i, carry):
        pages_Pc = tables_ref[pl.ds(i * pages_per_chunk, pages_per_chunk)]
        live_Sk = i * Sk + jnp.arange(Sk) < live
        c_SkxDc = c_ref[pages_Pc].reshape(Sk, Dc)
        c_SkxDc = jnp.where(live_Sk[:, None], c_SkxDc, jnp.zeros((), c_SkxDc.dtype))  # key and value alike
        pe_SkxDp = pe_ref[pages_Pc].reshape(Sk, Dp)
        s_HbxSk = (jax.lax.dot_general(q_c_HbxDc, c_SkxDc, qk_dims, precision=PRECISION,
                                       preferred_element_type=jnp.float32)
                   + jax.lax.dot_general(q_p_HbxDp, pe_SkxDp, qk_dims, precision=PRECISION,
                                         preferred_element_type=jnp.float32)) * scale
        s_HbxSk = jnp.where(live_Sk[None, :], s_HbxSk, -jnp.inf)  # stale pe (NaN, Inf) selected away here
        return online_softmax_step(carry, s_HbxSk, c_SkxDc)

    carry = jax.lax.fori_loop(0, (live + Sk - 1) // Sk, chunk, online_softmax_init(Hb, Dc))
    store_partials(carry, acc_ref, max_ref, sum_ref)


def default_heads_per_block(heads: int) -> int:
    """Hb: the heads padded to a power of two >= 16, at most 64 (so H = 128 takes two blocks)."""
    return min(_MAX_HEADS_PER_BLOCK, max(MIN_DOT, next_power_of_two(heads)))


def default_latent_pages_per_chunk(page_size: int, pages_per_split: int) -> int:
    """paged_attention.py's `default_pages_per_chunk`, capped at about 32 tokens (a whole page when pages are
    larger) but never under 16: a chunk's latent tile is Dc wide."""
    pages = default_pages_per_chunk(page_size, pages_per_split)
    cap = max(1, _TOKENS_PER_CHUNK // page_size, next_power_of_two(math.ceil(MIN_DOT / page_size)))
    return min(pages, cap)


def _check(q_c_BxHxDc: jax.Array, q_p_BxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
           pe_pages_1xNpxPsxDp: jax.Array, lengths_B: jax.Array, block_tables_BxW: jax.Array, scale: object,
           pages_per_chunk: int | None, num_splits: int, heads_per_block: int | None, interpret: bool) -> None:
    q_c, q_p, c, pe = q_c_BxHxDc.shape, q_p_BxHxDp.shape, c_pages_1xNpxPsxDc.shape, pe_pages_1xNpxPsxDp.shape
    if (len(q_c) != 3 or len(q_p) != 3 or len(c) != 4 or len(pe) != 4 or q_c[:2] != q_p[:2] or c[0] != 1
            or c[:3] != pe[:3] or c[3] != q_c[2] or pe[3] != q_p[2]):
        raise ValueError(f"need q_c [B, H, Dc], q_p [B, H, Dp], c_pages [1, Np, Ps, Dc] and pe_pages [1, Np, Ps, Dp]; "
                         f"got q_c {q_c}, q_p {q_p}, c_pages {c}, pe_pages {pe}")
    (B, Dc), Dp, Ps = (q_c[0], q_c[2]), q_p[2], c[2]
    check_tables(lengths_B, block_tables_BxW, B)
    if not is_number(scale):
        raise ValueError(f"scale must be a number, got {scale!r}")
    check_int("pages_per_chunk", 1 if pages_per_chunk is None else pages_per_chunk)
    check_int("num_splits", num_splits)
    check_int("heads_per_block", 1 if heads_per_block is None else heads_per_block)
    if interpret:
        return
    for name, dim in (("kv_lora_rank (Dc)", Dc), ("rope dim (Dp)", Dp)):
        if not is_power_of_two(dim) or dim < MIN_DOT:
            raise ValueError(f"the compiled kernel needs {name} a power of two >= {MIN_DOT}, got {dim}")
    check_compiled_pages(Ps, pages_per_chunk)
    if heads_per_block is not None and (not is_power_of_two(heads_per_block) or heads_per_block < MIN_DOT):
        raise ValueError(f"the compiled kernel needs heads_per_block a power of two >= {MIN_DOT}, got "
                         f"{heads_per_block}")


def latent_attention(q_c_BxHxDc: jax.Array, q_p_BxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
                     pe_pages_1xNpxPsxDp: jax.Array, lengths_B: jax.Array, block_tables_BxW: jax.Array, *,
                     scale: float, pages_per_chunk: int | None = None, num_splits: int = 1,
                     heads_per_block: int | None = None, interpret: bool = False) -> jax.Array:
    """The Pallas kernel (see the module docstring): the latent context [B, H, Dc] in q_c's dtype.
    `pages_per_chunk`: pages gathered per loop iteration (default: about 32 tokens); `num_splits` > 1 spreads each
    sequence's pages over that many programs, merged afterwards; `heads_per_block`: query heads per program
    (default min(64, H padded to a power of two >= 16)). `interpret=True` runs it on CPU."""
    _check(q_c_BxHxDc, q_p_BxHxDp, c_pages_1xNpxPsxDc, pe_pages_1xNpxPsxDp, lengths_B, block_tables_BxW, scale,
           pages_per_chunk, num_splits, heads_per_block, interpret)
    with triton_deprecation_ignored():
        return _latent_attention(q_c_BxHxDc, q_p_BxHxDp, c_pages_1xNpxPsxDc, pe_pages_1xNpxPsxDp, lengths_B,
                                 block_tables_BxW, scale=float(scale), pages_per_chunk=pages_per_chunk,
                                 num_splits=num_splits, heads_per_block=heads_per_block, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_chunk", "num_splits", "heads_per_block",
                                             "interpret"))
def _latent_attention(q_c_BxHxDc: jax.Array, q_p_BxHxDp: jax.Array, c_pages_1xNpxPsxDc: jax.Array,
                      pe_pages_1xNpxPsxDp: jax.Array, lengths_B: jax.Array, block_tables_BxW: jax.Array, *,
                      scale: float, pages_per_chunk: int | None, num_splits: int, heads_per_block: int | None,
                      interpret: bool) -> jax.Array:
    B, H, Dc = q_c_BxHxDc.shape
    Dp = q_p_BxHxDp.shape[2]
    _, Np, Ps, _ = c_pages_1xNpxPsxDc.shape
    W, Ns = block_tables_BxW.shape[1], num_splits
    Hb = heads_per_block or default_heads_per_block(H)
    Nh = math.ceil(H / Hb)
    Pc = pages_per_chunk or default_latent_pages_per_chunk(Ps, math.ceil(W / Ns))
    Ws, tables_BxWp, lengths_B = split_tables(block_tables_BxW, lengths_B, Ps, Pc, Ns)
    q_c_BxHpxDc = jnp.pad(q_c_BxHxDc, ((0, 0), (0, Nh * Hb - H), (0, 0)))
    q_p_BxHpxDp = jnp.pad(q_p_BxHxDp, ((0, 0), (0, Nh * Hb - H), (0, 0)))
    kernel = functools.partial(_kernel, page_size=Ps, pages_per_chunk=Pc, scale=scale)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, Nh, Ns),
        in_specs=[*table_specs(Ws),
                  pl.BlockSpec((None, Hb, Dc), lambda b, g, s: (b, g, 0)),
                  pl.BlockSpec((None, Hb, Dp), lambda b, g, s: (b, g, 0)),
                  pl.BlockSpec((None, Np, Ps, Dc), lambda b, g, s: (0, 0, 0, 0)),
                  pl.BlockSpec((None, Np, Ps, Dp), lambda b, g, s: (0, 0, 0, 0))],
        **partials_out(B, Nh, Ns, Hb, Dc),
        compiler_params=compiler_params(_NUM_WARPS, _NUM_STAGES),
        interpret=interpret,
        name="latent_attention",
    )(lengths_B, tables_BxWp, q_c_BxHpxDc, q_p_BxHpxDp, c_pages_1xNpxPsxDc, pe_pages_1xNpxPsxDp)
    return merge_splits(acc, m, l).reshape(B, Nh * Hb, Dc)[:, :H].astype(q_c_BxHxDc.dtype)
