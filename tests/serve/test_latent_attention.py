"""The latent (MLA, absorbed) paged decode-attention kernel (Pallas, interpret mode on CPU) against its pure-JAX
reference; the reference against an independent numpy computation (each sequence's latent and rotary-key pages
concatenated, cut to its length, a plain softmax over [c; pe] keys with c as the value, per head); and the
reference tied to MLA itself: a small random `model.mla.MLA` layer's latents written into pages, W_UK folded into
the query, the context through W_UV equal to `absorbed_attention`'s last query.

Cases: page sizes 4 to 32, lengths that are not multiples of the page size (1 and 0 included), pages shuffled
across the pool, head counts needing padding (5, 20) and more than one head block, several chunk sizes, splits
and head blocks, and the null page, every free page and the unused tail of each last page filled with NaN (or
Inf). Tolerances: float32 1e-5 (both sides accumulate in float32, only the summation order differs); bfloat16
2e-2 (inputs and output rounded to 8 mantissa bits, and the kernel rounds the probabilities to bfloat16 for the
second matmul).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import MLAConfig, ModelConfig
from model.layers import rope_tables
from model.mla import MLA, absorbed_attention
from serve.kernels.latent_attention import (
    default_heads_per_block,
    default_latent_pages_per_chunk,
    latent_attention,
)
from serve.kernels.latent_attention import latent_attention_reference as _reference
from serve.kernels.latent_attention import latent_prefill_attention as _prefill
from tests.serve.paged_case import (
    DTYPE_TOLERANCES,
    assert_finite_and_close,
    assert_lowers_to_triton,
    assert_stale_pages_unreachable,
    close,
    random_pages,
)

# jitted: one compile, not one per op
latent_attention_reference = jax.jit(_reference, static_argnames="scale")
latent_prefill_attention = jax.jit(_prefill, static_argnames="scale")

SCALE = 0.2


def make_case(page_size, heads, lengths, *, latent=32, rope=16, dtype=jnp.float32, poison=np.nan, seed=0):
    """Random q_c, q_p and pools where only each sequence's live slots hold data; everything else is `poison`."""
    rng = np.random.default_rng(seed)
    q_c = rng.normal(size=(len(lengths), heads, latent)).astype(np.float32)
    q_p = rng.normal(size=(len(lengths), heads, rope)).astype(np.float32)
    tables, pools = random_pages(rng, page_size, lengths, {"c": (1, latent), "pe": (1, rope)}, poison)
    c, pe = pools["c"], pools["pe"]
    q_c, q_p, c, pe = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q_c, q_p, c, pe))
    args = (*(jnp.asarray(x, dtype) for x in (q_c, q_p, c, pe)), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(tables))
    return args, (q_c, q_p, c, pe, np.asarray(lengths), tables)


def numpy_latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE):
    B, H, Dc = q_c.shape
    P = c.shape[2]
    out = np.zeros((B, H, Dc), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        pages = tables[b, :-(-n // P)]
        latents = np.concatenate([c[0, p] for p in pages])[:n].astype(np.float64)  # [n, Dc]
        rope_keys = np.concatenate([pe[0, p] for p in pages])[:n].astype(np.float64)  # [n, Dp]
        for h in range(H):
            scores = (latents @ q_c[b, h] + rope_keys @ q_p[b, h]) * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ latents / weights.sum()
    return out


# (page size, query heads, lengths)
CASES = [(8, 4, [13, 1, 0]), (16, 16, [31, 16, 7]), (4, 5, [9, 2]), (32, 20, [33, 0, 64])]


@pytest.mark.parametrize("page_size, heads, lengths", CASES)
def test_reference_matches_numpy(page_size, heads, lengths):
    args, raw = make_case(page_size, heads, lengths)
    close(latent_attention_reference(*args, scale=SCALE), numpy_latent_attention(*raw), 1e-5)


def test_prefill_queries_see_their_own_prefix():
    """T queries at positions p: each equals the decode reference over a cache cut to length p + 1."""
    args, raw = make_case(8, 4, [19, 11], seed=1)
    q_c, q_p, c, pe, lengths, tables = args
    positions = jnp.asarray([[0, 7, 8, 18], [3, 10, 10, 10]], jnp.int32)
    q_c_t = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 32)), jnp.float32)
    q_p_t = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 16)), jnp.float32)
    out = latent_prefill_attention(q_c_t, q_p_t, c, pe, positions, lengths, tables, scale=SCALE)
    assert out.shape == (2, 4, 4, 32)
    for t in range(4):
        cut = raw[:4] + (np.asarray(positions[:, t]) + 1, raw[5])
        close(out[:, t], numpy_latent_attention(np.asarray(q_c_t[:, t]), np.asarray(q_p_t[:, t]), *cut[2:]), 1e-5)


@pytest.mark.parametrize("page_size, heads, lengths", CASES)
def test_kernel_matches_reference_float32(page_size, heads, lengths):
    args, _ = make_case(page_size, heads, lengths)
    out = latent_attention(*args, scale=SCALE, interpret=True)
    assert out.shape == args[0].shape and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    close(out, latent_attention_reference(*args, scale=SCALE), 1e-5)


@pytest.mark.parametrize("page_size, heads, lengths", [(16, 8, [40, 5, 16]), (8, 3, [17, 0])])
def test_bfloat16_kernel_reference_and_numpy_agree(page_size, heads, lengths):
    args, raw = make_case(page_size, heads, lengths, latent=64, dtype=jnp.bfloat16)
    out, ref = latent_attention(*args, scale=SCALE, interpret=True), latent_attention_reference(*args, scale=SCALE)
    assert out.dtype == ref.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref, 2e-2)
    close(ref, numpy_latent_attention(*raw), 2e-2)


@pytest.mark.parametrize("pages_per_chunk, num_splits, heads_per_block",
                         [(1, 1, None), (3, 1, 16), (4, 1, 8), (1, 2, 4), (2, 3, 16), (8, 8, 2)])
def test_chunks_splits_and_head_blocks_do_not_change_the_result(pages_per_chunk, num_splits, heads_per_block):
    """(8, 8, 2): more splits than most sequences have pages (many splits are empty), and 10 heads in 5 blocks;
    heads_per_block 4 and 8 leave a partly padded last block."""
    args, raw = make_case(8, 10, [45, 3, 0, 17])
    out = latent_attention(*args, scale=SCALE, pages_per_chunk=pages_per_chunk, num_splits=num_splits,
                           heads_per_block=heads_per_block, interpret=True)
    close(out, numpy_latent_attention(*raw), 1e-5)


def test_stale_pages_are_unreachable():
    """The same live data with NaN, +Inf or -Inf everywhere else (null page, free pages, page tails) and with
    zeros: bitwise the same result from the kernel, the same from the reference, finite, length-0 rows zero."""
    clean = assert_stale_pages_unreachable(
        lambda *a: latent_attention(*a, scale=SCALE, num_splits=2, interpret=True), make_case)
    assert_stale_pages_unreachable(lambda *a: latent_attention_reference(*a, scale=SCALE), make_case)
    assert np.isfinite(clean).all() and not clean[1].any()


def test_all_padding_rows_give_zeros_under_jit():
    args, _ = make_case(16, 8, [0, 0])
    assert not np.asarray(latent_attention(*args, scale=SCALE, interpret=True)).any()
    assert not np.asarray(latent_attention_reference(*args, scale=SCALE)).any()
    args, raw = make_case(16, 2, [19, 40], seed=4)
    out = jax.jit(lambda *a: latent_attention(*a, scale=0.3, interpret=True))(*args)
    close(out, numpy_latent_attention(*raw, scale=0.3), 1e-5)


def test_defaults_are_powers_of_two_of_at_least_16():
    assert [default_heads_per_block(h) for h in (1, 16, 20, 64, 128)] == [16, 16, 32, 64, 64]
    assert default_latent_pages_per_chunk(8, 100) == 4  # 32 tokens
    assert default_latent_pages_per_chunk(16, 1) == 1  # no more than a split holds
    assert default_latent_pages_per_chunk(4, 1) == 4  # but never under 16 tokens
    assert default_latent_pages_per_chunk(64, 10) == 1


def test_bad_arguments_are_named_before_lowering():
    """interpret=False on CPU: every check fires before the (GPU-only) lowering would be reached."""
    args, _ = make_case(8, 4, [5, 9])
    q_c, q_p, c, pe, lengths, tables = args
    with pytest.raises(ValueError, match="need q_c \\[B, H, Dc\\].*got q_c \\(2, 3, 32\\)"):
        latent_attention(q_c[:, :3], q_p, c, pe, lengths, tables, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="c_pages \\(2, "):
        latent_attention(q_c, q_p, jnp.concatenate([c, c]), pe, lengths, tables, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="pe_pages \\(1, \\d+, 8, 8\\)"):
        latent_attention(q_c, q_p, c, pe[..., :8], lengths, tables, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="lengths"):
        latent_attention(q_c, q_p, c, pe, lengths[:1], tables, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="block_tables \\(2,\\)"):
        latent_attention(q_c, q_p, c, pe, lengths, tables[:, 0], scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="scale must be a number, got None"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=None, interpret=True)
    with pytest.raises(ValueError, match="num_splits must be a positive integer, got 0"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, num_splits=0, interpret=True)
    with pytest.raises(ValueError, match="heads_per_block must be a positive integer, got -1"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, heads_per_block=-1, interpret=True)
    with pytest.raises(ValueError, match="pages_per_chunk must be a positive integer, got 0"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, pages_per_chunk=0, interpret=True)
    with pytest.raises(ValueError, match="Dc\\) a power of two >= 16, got 24"):
        latent_attention(q_c[..., :24], q_p, c[..., :24], pe, lengths, tables, scale=SCALE)
    with pytest.raises(ValueError, match="Dp\\) a power of two >= 16, got 8"):
        latent_attention(q_c, q_p[..., :8], c, pe[..., :8], lengths, tables, scale=SCALE)
    with pytest.raises(ValueError, match="page_size a power of two, got 12"):
        latent_attention(q_c, q_p, c[:, :, :6].repeat(2, 2), pe[:, :, :6].repeat(2, 2), lengths, tables,
                         scale=SCALE)
    with pytest.raises(ValueError, match="got 1 \\(page_size 8\\)"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, pages_per_chunk=1)
    with pytest.raises(ValueError, match="got 3 \\(page_size 8\\)"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, pages_per_chunk=3)
    with pytest.raises(ValueError, match="heads_per_block a power of two >= 16, got 8"):
        latent_attention(q_c, q_p, c, pe, lengths, tables, scale=SCALE, heads_per_block=8)


def test_reference_and_kernel_equal_mla_absorbed_attention():
    """A small random MLA layer: its latents and rotary keys written into shuffled pages (NaN elsewhere), W_UK
    folded into the last query, the latent context through W_UV against `absorbed_attention`'s last query over
    the same sequence (float32, 1e-5)."""
    mla = MLAConfig(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=8)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, dtype="float32",
                      mla=mla)
    rng = np.random.default_rng(0)
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: MLA(cfg, nnx.Rngs(params=0))))  # no initialiser compiles

    def draw(path, shape):  # weights N(0, 0.3); norm scales 1 + N(0, 0.3), so the norms are not the identity
        return jnp.asarray(any("scale" in str(key) for key in path) + rng.normal(0, 0.3, shape.shape), jnp.float32)

    module = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, shapes))
    lengths, page_size, T = [12, 5, 9], 4, 12
    x_BxTxD = jnp.asarray(rng.normal(size=(3, T, cfg.d_model)), jnp.float32)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(T), (3, T)), mla.qk_rope_head_dim, cfg.rope_theta)

    def layer(m):  # each sequence cut to its length: `absorbed_attention`'s last query is its decode step
        (q_nope, q_pe), (c, k_pe) = m.queries(x_BxTxD, cos, sin), m.latent(x_BxTxD, cos, sin)
        last = [absorbed_attention(q_nope[b:b + 1, :n], q_pe[b:b + 1, :n], c[b:b + 1, :n], k_pe[b:b + 1, :n],
                                   m.wkv_b[...], causal=True)[0, -1] for b, n in enumerate(lengths)]
        return (q_nope, q_pe), (c, k_pe), jnp.stack(last)

    (q_nope, q_pe), (c_BxTxDc, k_pe_BxTxDp), expected_BxHxDv = nnx.jit(layer)(module)
    wkv_b = np.asarray(module.wkv_b[...])
    w_uk_DcxHxDn, w_uv_DcxHxDv = wkv_b[..., :mla.qk_nope_head_dim], wkv_b[..., mla.qk_nope_head_dim:]

    # The cache: each sequence's first `length` latents in shuffled pages; everything else NaN.
    n_pages = 1 + sum(-(-n // page_size) for n in lengths) + 2
    c_pages = np.full((1, n_pages, page_size, mla.kv_lora_rank), np.nan, np.float32)
    pe_pages = np.full((1, n_pages, page_size, mla.qk_rope_head_dim), np.nan, np.float32)
    tables = np.zeros((3, 4), np.int32)
    free = list(rng.permutation(np.arange(1, n_pages)))
    for b, n in enumerate(lengths):
        for i in range(-(-n // page_size)):
            page = tables[b, i] = free.pop()
            filled = min(page_size, n - i * page_size)
            c_pages[0, page, :filled] = np.asarray(c_BxTxDc)[b, i * page_size:i * page_size + filled]
            pe_pages[0, page, :filled] = np.asarray(k_pe_BxTxDp)[b, i * page_size:i * page_size + filled]

    last = np.asarray(lengths) - 1  # each sequence's decode query: its last token
    q_nope_BxHxDn, q_pe_BxHxDp = np.asarray(q_nope)[np.arange(3), last], np.asarray(q_pe)[np.arange(3), last]
    q_c_BxHxDc = jnp.asarray(np.einsum("bhn,chn->bhc", q_nope_BxHxDn, w_uk_DcxHxDn))  # W_UK folded in
    cache = (jnp.asarray(c_pages), jnp.asarray(pe_pages), jnp.asarray(lengths, jnp.int32), jnp.asarray(tables))
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    for ctx_BxHxDc in (latent_attention_reference(q_c_BxHxDc, jnp.asarray(q_pe_BxHxDp), *cache, scale=scale),
                       latent_attention(q_c_BxHxDc, jnp.asarray(q_pe_BxHxDp), *cache, scale=scale, interpret=True)):
        out_BxHxDv = np.einsum("bhc,chv->bhv", np.asarray(ctx_BxHxDc), w_uv_DcxHxDv)  # then W_UV
        np.testing.assert_allclose(out_BxHxDv, expected_BxHxDv, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(expected_BxHxDv).max()))


GPU_CASES = [(8, 4, [13, 1, 0]), (16, 16, [31, 16, 7]), (32, 20, [33, 0, 64])]


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, heads, lengths", GPU_CASES)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_compiled_kernel_matches_reference_on_gpu(page_size, heads, lengths, dtype, tol, num_splits):
    """The same cases compiled for real (Triton lowering) against the reference and numpy."""
    args, raw = make_case(page_size, heads, lengths, latent=64, dtype=dtype)
    assert_finite_and_close(latent_attention(*args, scale=SCALE, num_splits=num_splits), dtype, tol,
                            latent_attention_reference(*args, scale=SCALE), numpy_latent_attention(*raw))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", DTYPE_TOLERANCES)
def test_compiled_kernel_deepseek_shapes_on_gpu(dtype, tol):
    """DeepSeek-V3's decode shapes: 128 heads (two blocks of 64), Dc 512, Dp 64, 64-token pages, one split."""
    args, _ = make_case(64, 128, [200, 1, 0, 64], latent=512, rope=64, dtype=dtype)
    out = latent_attention(*args, scale=SCALE)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    close(out, latent_attention_reference(*args, scale=SCALE), tol)


@pytest.mark.gpu
def test_compiled_kernel_ignores_stale_pages_on_gpu():
    assert_stale_pages_unreachable(lambda *a: latent_attention(*a, scale=SCALE, num_splits=2), make_case)


@pytest.mark.parametrize("page_size, heads, lengths, latent, rope",
                         [(8, 4, [13, 1, 0], 32, 16), (32, 20, [33, 0, 64], 64, 16), (64, 128, [200, 1], 512, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_lowers_to_triton_without_a_gpu(page_size, heads, lengths, latent, rope, num_splits):
    """The compiled path lowered for CUDA (Pallas -> Triton IR) on this machine, so Triton lowering errors show
    up in CI and not only on a lent GPU; DeepSeek-V3's shapes (128 heads, Dc 512, Dp 64) included."""
    args, _ = make_case(page_size, heads, lengths, latent=latent, rope=rope, dtype=jnp.bfloat16)
    assert_lowers_to_triton(lambda *a: latent_attention(*a, scale=SCALE, num_splits=num_splits), args,
                            "latent_attention")
