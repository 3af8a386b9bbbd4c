"""Shared by the decode-kernel tests: random paged-cache contents (block tables of shuffled pages, pools whose live
slots hold N(0, 1) data and whose every other slot, the null page, free pages and the tails of last pages, holds
`poison`), and the checks both kernels take: closeness at a tolerance, stale pages unreachable, CUDA lowering."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# The compiled kernels' dtypes and tolerances (the test modules' docstrings give the reasons)
DTYPE_TOLERANCES = [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]


def random_pages(rng: np.random.Generator, page_size: int, lengths: list[int], pools: dict[str, tuple[int, int]],
                 poison: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(block tables [B, M] int32, {name: pool [heads, Np, page_size, dim] float32}) for `pools` = {name: (heads,
    dim)}: sequence b's `lengths[b]` tokens on its pages, in table order, one spare table entry per row."""
    pages_of = [-(-n // page_size) for n in lengths]
    B, M = len(lengths), max(1, *pages_of) + 1
    n_pages = 1 + sum(pages_of) + 3  # the null page, the sequences' pages, 3 free ones
    out = {name: np.full((heads, n_pages, page_size, dim), poison, np.float32) for name, (heads, dim) in pools.items()}
    tables = np.zeros((B, M), np.int32)
    free = rng.permutation(np.arange(1, n_pages))  # shuffled: a sequence's pages are not contiguous
    for b, n in enumerate(lengths):
        pages, free = free[:pages_of[b]], free[pages_of[b]:]
        tables[b, :len(pages)] = pages
        for i, page in enumerate(pages):
            filled = min(page_size, n - i * page_size)
            for name, (heads, dim) in pools.items():
                out[name][:, page, :filled] = rng.normal(size=(heads, filled, dim))
    return tables, out


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def assert_finite_and_close(out, dtype, tol, *expected):
    """`out` is of `dtype`, finite, and within `tol` of each of `expected`."""
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    for want in expected:
        close(out, want, tol)


def assert_stale_pages_unreachable(kernel: Callable, make_case: Callable) -> np.ndarray:
    """`kernel(*args)` on the same live data (page size 8, 4 heads a group, lengths 21, 0, 8, 1) with NaN, +Inf and
    -Inf in every stale slot is bitwise its output with zeros there; returns that output."""
    lengths = [21, 0, 8, 1]
    clean = np.asarray(kernel(*make_case(8, 4, lengths, poison=0.0)[0]))
    for value in (np.nan, np.inf, -np.inf):
        out = kernel(*make_case(8, 4, lengths, poison=value)[0])
        np.testing.assert_array_equal(np.asarray(out), clean, err_msg=f"poison {value}")
    return clean


def assert_lowers_to_triton(kernel: Callable, args, name: str):
    """`kernel` jitted for `args`' shapes lowers for CUDA (Pallas -> Triton IR) on any machine, the text naming
    `name`."""
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    assert name in jax.jit(kernel).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
