"""The paged decode-attention kernel (Pallas, interpret mode on CPU) against its pure-JAX reference, and the
reference against an independent numpy computation (each sequence's pages concatenated, cut to its length,
plain softmax attention per head), so the reference itself can fail.

Cases: page sizes 8 to 64, lengths that are not multiples of the page size (1 and 0 included), pages shuffled
across the pool, GQA ratios 1, 4 and 8, several chunk sizes and splits, and the null page, every free page and
the unused tail of each last page filled with NaN (or Inf). Tolerances: float32 1e-5 (both sides accumulate in
float32, only the summation order differs); bfloat16 2e-2 (inputs and output rounded to 8 mantissa bits, and
the kernel rounds the probabilities to bfloat16 for the second matmul).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.kernels.paged_attention import default_pages_per_chunk, paged_attention, paged_attention_reference
from tests.serve.paged_case import (
    DTYPE_TOLERANCES,
    assert_finite_and_close,
    assert_lowers_to_triton,
    assert_stale_pages_unreachable,
    close,
    random_pages,
)


def make_case(page_size, group, lengths, *, kv_heads=2, head_dim=16, dtype=jnp.float32, poison=np.nan, seed=0):
    """Random q and a pool where only each sequence's live slots hold data; everything else is `poison`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(len(lengths), kv_heads * group, head_dim)).astype(np.float32)
    tables, pools = random_pages(rng, page_size, lengths, {"k": (kv_heads, head_dim), "v": (kv_heads, head_dim)},
                                 poison)
    k, v = pools["k"], pools["v"]
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))  # what the kernel sees
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(tables))
    return args, (q, k, v, np.asarray(lengths), tables)


def numpy_attention(q, k, v, lengths, tables, scale=None):
    B, H, D = q.shape
    K, _, P, _ = k.shape
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((B, H, D), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        pages = tables[b, :-(-n // P)]
        keys = np.concatenate([k[:, p] for p in pages], axis=1)[:, :n].astype(np.float64)  # [K, n, D]
        values = np.concatenate([v[:, p] for p in pages], axis=1)[:, :n].astype(np.float64)
        for h in range(H):
            scores = keys[h // (H // K)] @ q[b, h] * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values[h // (H // K)] / weights.sum()
    return out


# (page size, GQA group, lengths)
CASES = [(8, 1, [13, 1, 0]), (16, 4, [31, 16, 7]), (32, 8, [70, 2]), (64, 4, [65, 0, 130]), (8, 8, [9, 24])]


@pytest.mark.parametrize("page_size, group, lengths", CASES)
def test_reference_matches_numpy(page_size, group, lengths):
    args, raw = make_case(page_size, group, lengths)
    close(paged_attention_reference(*args), numpy_attention(*raw), 1e-5)


@pytest.mark.parametrize("page_size, group, lengths", CASES)
def test_kernel_matches_reference_float32(page_size, group, lengths):
    args, _ = make_case(page_size, group, lengths)
    out = paged_attention(*args, interpret=True)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    close(out, paged_attention_reference(*args), 1e-5)


@pytest.mark.parametrize("page_size, group, lengths", [(16, 4, [40, 5, 16]), (8, 1, [17, 0])])
def test_bfloat16_kernel_reference_and_numpy_agree(page_size, group, lengths):
    args, raw = make_case(page_size, group, lengths, head_dim=32, dtype=jnp.bfloat16)
    out, ref = paged_attention(*args, interpret=True), paged_attention_reference(*args)
    assert out.dtype == ref.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref, 2e-2)
    close(ref, numpy_attention(*raw), 2e-2)


@pytest.mark.parametrize("pages_per_chunk, num_splits", [(1, 1), (3, 1), (4, 1), (1, 2), (2, 3), (8, 8)])
def test_chunks_and_splits_do_not_change_the_result(pages_per_chunk, num_splits):
    """(8, 8): more splits than most sequences have pages, so many splits are empty."""
    args, raw = make_case(8, 4, [45, 3, 0, 17])
    out = paged_attention(*args, pages_per_chunk=pages_per_chunk, num_splits=num_splits, interpret=True)
    close(out, numpy_attention(*raw), 1e-5)


def test_stale_pages_are_unreachable():
    """The same live data with NaN, +Inf or -Inf everywhere else (null page, free pages, page tails) and with
    zeros: bitwise the same result, finite, and length-0 rows exactly zero."""
    clean = assert_stale_pages_unreachable(lambda *a: paged_attention(*a, num_splits=2, interpret=True), make_case)
    assert np.isfinite(clean).all() and not clean[1].any()


def test_all_padding_rows_give_zeros_and_scale_is_used():
    args, _ = make_case(16, 8, [0, 0])
    assert not np.asarray(paged_attention(*args, interpret=True)).any()
    assert not np.asarray(paged_attention_reference(*args)).any()
    args, raw = make_case(16, 2, [19, 40], head_dim=32)
    out = jax.jit(lambda *a: paged_attention(*a, scale=0.3, interpret=True))(*args)
    close(out, numpy_attention(*raw, scale=0.3), 1e-5)


def test_default_chunk_is_a_power_of_two_of_at_least_16_tokens():
    assert default_pages_per_chunk(16, 100) == 8
    assert default_pages_per_chunk(16, 3) == 4
    assert default_pages_per_chunk(8, 1) == 2
    assert default_pages_per_chunk(64, 1) == 1
    assert default_pages_per_chunk(256, 10) == 1


def test_bad_arguments_are_named_before_lowering():
    """interpret=False on CPU: every check fires before the (GPU-only) lowering would be reached."""
    args, _ = make_case(8, 4, [5, 9])
    q, k, v, lengths, tables = args
    with pytest.raises(ValueError, match="need H % K == 0"):
        paged_attention(q[:, :3], k, v, lengths, tables, interpret=True)
    with pytest.raises(ValueError, match="num_splits must be a positive integer, got 0"):
        paged_attention(q, k, v, lengths, tables, num_splits=0, interpret=True)
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(q, k, v, lengths[:1], tables, interpret=True)
    with pytest.raises(ValueError, match="head_dim a power of two >= 16, got 24"):
        paged_attention(q[..., :12].repeat(2, -1), k[..., :12].repeat(2, -1), v[..., :12].repeat(2, -1),
                        lengths, tables)
    with pytest.raises(ValueError, match="page_size a power of two, got 12"):
        paged_attention(q, k[:, :, :6].repeat(2, 2), v[:, :, :6].repeat(2, 2), lengths, tables)
    with pytest.raises(ValueError, match="got 1 \\(page_size 8\\)"):
        paged_attention(q, k, v, lengths, tables, pages_per_chunk=1)
    with pytest.raises(ValueError, match="got 3 \\(page_size 8\\)"):
        paged_attention(q, k, v, lengths, tables, pages_per_chunk=3)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, group, lengths", CASES)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_compiled_kernel_matches_reference_on_gpu(page_size, group, lengths, dtype, tol, num_splits):
    """The same cases compiled for real (Triton lowering) against the reference and numpy."""
    args, raw = make_case(page_size, group, lengths, head_dim=32, dtype=dtype)
    assert_finite_and_close(paged_attention(*args, num_splits=num_splits), dtype, tol,
                            paged_attention_reference(*args), numpy_attention(*raw))


@pytest.mark.gpu
def test_compiled_kernel_ignores_stale_pages_on_gpu():
    assert_stale_pages_unreachable(lambda *a: paged_attention(*a, num_splits=2), make_case)


@pytest.mark.parametrize("page_size, group, lengths", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_lowers_to_triton_without_a_gpu(page_size, group, lengths, num_splits):
    """The compiled path lowered for CUDA (Pallas -> Triton IR) on this machine, so Triton lowering errors show
    up in CI and not only on a lent GPU."""
    args, _ = make_case(page_size, group, lengths, head_dim=32, dtype=jnp.bfloat16)
    assert_lowers_to_triton(lambda *a: paged_attention(*a, num_splits=num_splits), args, "paged_attention")
